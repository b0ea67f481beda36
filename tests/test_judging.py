"""The LLM-judge stage against real HTTP servers on loopback (no mock of the HTTP layer): a llama.cpp
server with the embedded 135M model (plumbing only: its judgments are meaningless) and a faulty
server of our own that answers 429, 500, timeouts and malformed JSON on purpose."""

import json
import logging
import math
from pathlib import Path

import pytest
from conftest import EXAMPLE_DATA
from judge_servers import FaultyJudgeServer

import philo_dataflow
from philo_dataflow.stages import judging
from philo_dataflow.lib import judge_client, judge_protocol
from philo_dataflow.lib.generation import GREEDY
from philo_dataflow.lib.scores import MODELS

CANARY_KEY = "sk-canary-7f3c9a1e5b2d4c6e8a0b"
KEY_ENV = "PHILO_TEST_JUDGE_KEY"


def _synthetic_rows(count: int) -> list[dict]:
    """``hold_out_set_predictions`` rows from the example data (reference cut to its first sentence)
    with short made-up answers: the base answer is a 5-word stock phrase, the fine-tuned one the
    reference's first 12 words (so it is the longer)."""
    records = [json.loads(line) for line in EXAMPLE_DATA.read_text().splitlines()]
    by_school: dict = {}
    for record in records:
        by_school.setdefault(record["school"], []).append(record)
    schools = sorted(by_school)[:4]
    picked = [by_school[schools[i % len(schools)]][i // len(schools)] for i in range(count)]
    return [{
        "question": r["instruction"],
        "category": r["school"],
        "reference": r["output"].split(". ")[0].rstrip(".") + ".",  # one sentence: a short judge prompt
        "base_prediction": "It depends on the person." if i % 3 else "Philosophy asks many questions.",
        "finetuned_prediction": " ".join(r["output"].split()[:12]) + ".",
        "base_ended_on_eos": True, "finetuned_ended_on_eos": True, "base_new_tokens": 6, "finetuned_new_tokens": 20,
    } for i, r in enumerate(picked)]


def _judged_run(output_dir: Path, rows: list[dict], **judge_inputs) -> dict:
    """Every judge output and the metrics and report it joins, through the judged driver, with the
    hold-out rows given and the training facts as overrides (no model is trained)."""
    dr = philo_dataflow.build_driver({"start": "base", "judge": True})
    outputs = [*philo_dataflow.JUDGE_OUTPUTS, "saved_metrics", "saved_report", "saved_report_html", "judge_metrics",
               "rubric_judgments", "pairwise_judgments", "resolved_judge_response_format"]
    return dr.execute(outputs, inputs={"output_dir": str(output_dir), "data_path": "d.jsonl", **judge_inputs}, overrides={
        "hold_out_set_predictions": rows, "fit_trainer_eval_metrics": {}, "base_model_id": "tiny",
        "model_summary": {"trainable_parameters": 1, "total_parameters": 2}, "tokenization_stats": {},
        "split_summary": {"hold_out_set": {"total": len(rows), "per_category": {}}},
        "generation_settings": dict(GREEDY), "overlong_records": {"policy": "truncate_prompt"},
        "records_left_out": {"records": len(rows), "examples": len(rows), "reasons": {}},
        "training_log_history": [], "run_manifest": {"inputs": {"model_id": "tiny"}},
    })


def _calls(result: dict) -> list[dict]:
    return result["rubric_judgments"] + [p[o] for p in result["pairwise_judgments"] for o in judge_protocol.PAIR_ORDERS]


# --- pairwise bookkeeping ------------------------------------------------------------------------

@pytest.mark.parametrize("base_first, finetuned_first, outcome, consistent", [
    ("B", "A", "win", True),      # fine-tuned preferred in both orders
    ("A", "B", "loss", True),     # base preferred in both orders
    ("tie", "tie", "tie", True),
    ("A", "A", "tie", False),     # the answer shown first both times: position bias, not a win
    ("B", "B", "tie", False),     # the answer shown second both times
    ("B", "tie", "tie", False),   # one order only: no win
    ("tie", "B", "tie", False),
    (None, "A", "failed", None),  # an order without a verdict
    ("B", None, "failed", None),
])
def test_pair_outcome_counts_a_win_only_when_both_orders_agree(base_first, finetuned_first, outcome, consistent):
    assert judge_protocol.pair_outcome(base_first, finetuned_first) == (outcome, consistent)


def test_pairwise_summary_rates_and_position_consistency():
    verdicts = [("B", "A")] * 3 + [("A", "B")] * 2 + [("tie", "tie")] + [("A", "A")] * 3 + [("B", "B")] + [(None, "A")]
    records = []
    for index, (first, second) in enumerate(verdicts):
        outcome, consistent = judge_protocol.pair_outcome(first, second)
        records.append({
            "outcome": outcome, "position_consistent": consistent,
            "preferred": {"base_first": judge_protocol.preferred_model("base_first", first),
                          "finetuned_first": judge_protocol.preferred_model("finetuned_first", second)},
            "answer_words": {"base": 5, "finetuned": 10 if index < 3 else 2},
        })
    summary = judge_protocol._pairwise_summary(records)
    assert (summary["questions"], summary["judged"], summary["failed"]) == (11, 10, 1)
    assert (summary["wins"], summary["ties"], summary["losses"]) == (3, 5, 2)
    assert summary["win_rate"] == pytest.approx(0.3) and summary["loss_rate"] == pytest.approx(0.2)
    assert summary["tie_rate"] == pytest.approx(0.5)
    assert summary["position_consistency"] == pytest.approx(0.6)  # 3 wins + 2 losses + 1 agreed tie of 10
    assert summary["first_position_preferred_rate"] == pytest.approx(0.3)
    assert summary["second_position_preferred_rate"] == pytest.approx(0.1)
    assert summary["longer_answer_won_share"] == pytest.approx(1.0)  # the 3 wins and 2 losses went to the longer


def test_pairwise_through_a_server_that_always_prefers_the_first_answer(tmp_path):
    rows = _synthetic_rows(6)
    with FaultyJudgeServer() as server:
        result = _judged_run(tmp_path, rows, judge_model="ok", judge_base_url=server.base_url,
                             judge_api_key_env=KEY_ENV)
        pairwise = result["judge_metrics"]["pairwise"]
        assert (pairwise["ties"], pairwise["position_consistency"], pairwise["first_position_preferred_rate"]) == (6, 0, 1)
        assert all(r["preferred"] == {"base_first": "base", "finetuned_first": "finetuned"}
                   for r in result["pairwise_judgments"])

        longer = _judged_run(tmp_path / "longer", rows, judge_model="prefers-longer",
                             judge_base_url=server.base_url, judge_api_key_env=KEY_ENV)["judge_metrics"]["pairwise"]
    # the fine-tuned answers are the longer ones: consistent wins in both orders
    assert (longer["wins"], longer["position_consistency"], longer["win_rate"]) == (6, 1, 1)


# --- inputs --------------------------------------------------------------------------------------

def test_judge_client_needs_a_key_except_on_loopback(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"judge_api_key_env: the environment variable {KEY_ENV} is unset"):
        judging.judge_client("gpt-4.1", "https://api.example.com/v1", KEY_ENV)
    for url in ("http://127.0.0.1:8080/v1", "http://localhost:11434/v1", "http://[::1]:8000/v1"):
        client = judging.judge_client("local", url, KEY_ENV)
        assert client.client.api_key == judge_client.LOOPBACK_PLACEHOLDER_KEY
    monkeypatch.setenv(KEY_ENV, CANARY_KEY)
    assert judging.judge_client("gpt-4.1", "https://api.example.com/v1", KEY_ENV).client.api_key == CANARY_KEY


def test_invalid_judge_inputs_are_named_together():
    with pytest.raises(ValueError) as error:
        judging.judge_client(" ", "ftp://x", "", judge_timeout=0, judge_max_retries=-1)
    for name in ("judge_model", "judge_base_url", "judge_api_key_env", "judge_timeout", "judge_max_retries"):
        assert name in str(error.value)
    with pytest.raises(ValueError, match="judge_response_format='xml'"):
        judging.resolved_judge_response_format(None, None, "xml")
    with pytest.raises(ValueError, match="hold_out_set_predictions is empty"):
        judging.rubric_judgments([], None)
    with pytest.raises(ValueError, match=r"hold_out_set_predictions: rows lack the key\(s\) \['finetuned_prediction'\]"):
        judging.pairwise_judgments([{"question": "q", "category": "c", "reference": "r", "base_prediction": "b"}], None)
    with pytest.raises(ValueError, match="judge_max_concurrency=0.*judge_max_tokens=0"):
        judging.judge_request(None, None, "json_schema", judge_max_concurrency=0, judge_max_tokens=0)


def test_judge_outputs_resolve_under_both_configs_only_with_a_judge_model():
    inputs = {"data_path": "d.jsonl", "presaved_model_dir": "adapter"}
    for start in philo_dataflow.START_MODES:
        judged = philo_dataflow.build_driver({"start": start, "judge": True})
        judged.validate_execution([*philo_dataflow.FINAL_VARIABLES, *philo_dataflow.JUDGE_OUTPUTS],
                                  inputs={**inputs, "judge_model": "gpt-4.1"})
        with pytest.raises(ValueError, match="judge_model"):
            judged.validate_execution(list(philo_dataflow.DEFAULT_OUTPUTS), inputs=inputs)
        plain = philo_dataflow.build_driver({"start": start})
        plain.validate_execution(list(philo_dataflow.FINAL_VARIABLES), inputs=inputs)
        names = {variable.name for variable in plain.list_available_variables()}
        assert not any(name.startswith("judge_") and name != "judge_results" for name in names)
        assert names.isdisjoint(philo_dataflow.JUDGE_OUTPUTS)


def test_run_py_judges_when_asked_and_says_so_when_not(tmp_path, tiny_model_dir, small_jsonl, monkeypatch, capsys):
    from philo_dataflow import cli

    monkeypatch.delenv(KEY_ENV, raising=False)
    fast = ["--max-steps", "2", "--eval-steps", "1", "--max-new-tokens", "8", "--max-seq-length", "256",
            "--hold-out-fraction", "0.2", "--validation-fraction", "0.2", "--no-graph"]
    base_run = ["--model-id", tiny_model_dir, "--data-path", small_jsonl, *fast]
    judged_dir, plain_dir = tmp_path / "judged", tmp_path / "plain"

    assert cli.main([*base_run, "--output-dir", str(judged_dir), "--judge-model", "gpt-4.1",
                     "--judge-api-key-env", KEY_ENV]) == 2
    assert f"environment variable {KEY_ENV} is unset" in capsys.readouterr().err
    assert not judged_dir.exists(), "a missing key must fail before training"
    assert cli.main([*base_run, "--output-dir", str(judged_dir), "--judge-max-tokens", "64"]) == 2
    assert "add --judge-model" in capsys.readouterr().err

    with FaultyJudgeServer() as server:
        assert cli.main([*base_run, "--output-dir", str(judged_dir), "--judge-model", "ok",
                         "--judge-base-url", server.base_url, "--judge-api-key-env", KEY_ENV]) == 0
    out = capsys.readouterr().out
    assert "LLM judge ok (philo-judge-1)" in out and "fine-tuned wins 0%, ties 100%, loses 0%" in out
    assert "judge position consistency 0%" in out and "correctness" in out
    metrics = json.loads((judged_dir / "metrics.json").read_text())
    assert metrics["judge"]["rubric"]["base"]["correctness"] == 4 and "hold_out" in metrics
    assert "## LLM judge" in (judged_dir / "report.md").read_text()
    assert "school alignment" in (judged_dir / "report.html").read_text() and (judged_dir / "judge_cache").is_dir()

    assert cli.main(["--start", "presaved", "--presaved-model-dir", str(judged_dir / "adapter"),
                     "--output-dir", str(plain_dir), *fast]) == 0
    assert "LLM judge: not run (no judge endpoint configured; pass --judge-model" in capsys.readouterr().out
    assert "judge" not in json.loads((plain_dir / "metrics.json").read_text())


# --- a faulty server: retries and failure records ------------------------------------------------

def _judged_with_faulty(server, cache_dir: Path, model: str, rows: list[dict], **settings) -> tuple[str, list, list]:
    client = judging.judge_client(model, server.base_url, KEY_ENV, judge_timeout=settings.pop("timeout", 5.0),
                                  judge_max_retries=settings.pop("max_retries", 2))
    cache = judging.judge_cache(judge_cache_dir=str(cache_dir))
    mode = judging.resolved_judge_response_format(client, cache, settings.pop("response_format", "json_schema"))
    request = judging.judge_request(client, cache, mode, **settings)
    rubric = judging.rubric_judgments(rows, request)
    pairwise = judging.pairwise_judgments(rows, request)
    return mode, rubric, pairwise


@pytest.mark.parametrize("model, hits_per_call", [
    ("rate-limited-then-ok", 3),  # 429, 429, then 200
    ("error-then-ok", 3),         # 500, 500, then 200
    ("slow-then-ok", 2),          # timed out, then 200
])
def test_client_retries_429_5xx_and_timeouts(tmp_path, model, hits_per_call):
    rows = _synthetic_rows(2)
    with FaultyJudgeServer(slow_seconds=1.5) as server:
        _, rubric, pairwise = _judged_with_faulty(server, tmp_path, model, rows, timeout=0.5, max_retries=2,
                                                  judge_max_concurrency=2)
    calls = rubric + [p[o] for p in pairwise for o in judge_protocol.PAIR_ORDERS]
    assert all(c["status"] == "ok" for c in calls)
    assert server.hits[model] == hits_per_call * len(calls) == hits_per_call * 8


def test_failures_are_recorded_with_raw_text_not_raised(tmp_path):
    rows = _synthetic_rows(2)
    with FaultyJudgeServer() as server:
        results = {model: _judged_with_faulty(server, tmp_path / model, model, rows, max_retries=1,
                                              judge_malformed_retries=2)
                   for model in ("always-429", "garbage-content", "garbage-body", "bad-then-good")}
    for model in ("always-429", "garbage-content", "garbage-body"):
        _, rubric, pairwise = results[model]
        calls = rubric + [p[o] for p in pairwise for o in judge_protocol.PAIR_ORDERS]
        assert all(c["status"] == "failed" and c["judgment"] is None and c["error"] and c["raw"] for c in calls)
        assert all(p["outcome"] == "failed" and p["position_consistent"] is None for p in pairwise)
    always_429 = results["always-429"][1][0]
    assert "RateLimitError" in always_429["error"] and "slow down" in always_429["raw"]
    assert server.hits["always-429"] == 8 * 2  # one try + max_retries=1, no re-ask of an HTTP failure
    garbage = results["garbage-content"][1][0]
    assert garbage["raw"] == "Sure! The answer scores well." and len(garbage["attempts"]) == 3  # 1 + 2 re-asks
    assert server.hits["garbage-content"] == 8 * 3
    assert "<html>" in results["garbage-body"][1][0]["raw"]
    _, rubric, pairwise = results["bad-then-good"]
    assert all(c["status"] == "ok" and len(c["attempts"]) == 2 for c in rubric)
    assert "correctness.score" in rubric[0]["attempts"][0]["error"] and rubric[0]["judgment"]["correctness"]["score"] == 4
    assert "verdict" in pairwise[0]["base_first"]["attempts"][0]["error"]

    metrics = judging.judge_metrics(*results["garbage-content"][1:], judge_settings={})
    assert metrics["rubric"]["base"]["failed"] == 2 and metrics["rubric"]["base"]["judged"] == 0
    assert math.isnan(metrics["rubric"]["base"]["correctness"]), "no judgment must not read as a score"
    assert math.isnan(metrics["pairwise"]["win_rate"]) and metrics["calls"]["failed"] == 8


def test_auto_detection_falls_back_to_json_object_and_is_remembered(tmp_path):
    rows = _synthetic_rows(1)
    with FaultyJudgeServer() as server:
        mode, rubric, _ = _judged_with_faulty(server, tmp_path, "rejects-json-schema", rows, response_format="auto")
        assert mode == "json_object" and rubric[0]["status"] == "ok"
        assert server.formats["json_schema"] == judge_client._PROBE_TRIES  # a 500 must repeat before it counts
        hits = server.hits["rejects-json-schema"]
        again, _, _ = _judged_with_faulty(server, tmp_path, "rejects-json-schema", rows, response_format="auto")
        assert again == "json_object" and server.hits["rejects-json-schema"] == hits  # no probe, no call
        assert _judged_with_faulty(server, tmp_path / "ok", "ok", rows, response_format="auto")[0] == "json_schema"


def test_lenient_parsing_of_replies():
    assert judge_protocol.json_object_text('```json\n{"a": 1}\n```') == {"a": 1}
    assert judge_protocol.json_object_text('Here it is: {"a": {"b": 2}} hope that helps') == {"a": {"b": 2}}
    assert judge_protocol.json_object_text('{"rationale": "two\nlines"}') == {"rationale": "two\nlines"}
    with pytest.raises(ValueError, match="no JSON object"):
        judge_protocol.json_object_text("[1, 2]")
    verdict = judge_protocol.PairwiseJudgment.model_validate({"rationale": "x", "verdict": "[[B]]"})
    assert verdict.verdict == "B"
    assert judge_protocol.PairwiseJudgment.model_validate({"rationale": "x", "verdict": "Tie"}).verdict == "tie"
    score = judge_protocol.CriterionJudgment.model_validate({"rationale": "fine", "score": "5"})
    assert score.score == 5
    for bad in ({"rationale": "fine", "score": 0}, {"rationale": "  ", "score": 3}, {"rationale": "x", "score": 2.5}):
        with pytest.raises(ValueError):
            judge_protocol.CriterionJudgment.model_validate(bad)


# --- key hygiene ---------------------------------------------------------------------------------

def test_api_key_never_reaches_outputs_logs_or_errors(tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv(KEY_ENV, CANARY_KEY)
    caplog.set_level(logging.DEBUG)
    rows = _synthetic_rows(3)
    messages = []
    with FaultyJudgeServer() as server:
        results = {model: _judged_run(tmp_path / model, rows, judge_model=model, judge_base_url=server.base_url,
                                      judge_api_key_env=KEY_ENV, judge_response_format="auto")
                   for model in ("ok", "echoes-key", "echoes-key-in-reply", "bad-then-good")}
        messages += [json.dumps(c) for result in results.values() for c in _calls(result)]
        assert all(c["status"] == "failed" and "[redacted]" in c["raw"] for c in _calls(results["echoes-key"]))
        echoed_in_reply = results["echoes-key-in-reply"]["rubric_judgments"][0]
        assert echoed_in_reply["status"] == "ok"
        assert "(you sent Bearer [redacted])" in echoed_in_reply["judgment"]["coherence"]["rationale"]
        for bad in ({"judge_max_concurrency": 0}, {"judge_response_format": "xml"}, {"judge_base_url": "ftp://x"}):
            with pytest.raises(ValueError) as error:
                _judged_run(tmp_path / "bad", rows, judge_model="ok", judge_api_key_env=KEY_ENV,
                            **{"judge_base_url": server.base_url, **bad})
            messages += [str(error.value), repr(error.value), str(error.value.__cause__ or "")]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "judgments.jsonl" for p in files) and any(p.suffix == ".json" for p in files)
    assert len(caplog.records) > 20  # the openai client's debug logging was captured too
    out, err = capfd.readouterr()
    texts = [p.read_text(errors="replace") for p in files] + [r.getMessage() for r in caplog.records]
    texts += messages + [caplog.text, out, err]
    assert not [t for t in texts if CANARY_KEY in t]
    assert not [t for t in texts if CANARY_KEY[3:15] in t]  # nor a fragment of it


# --- a real OpenAI-compatible server: llama.cpp with the embedded 135M model ---------------------

LLAMA_ROWS = 8  # two per school of four: every call kind and the per-school table, in under a minute
#: Small enough for the 135M model to answer quickly (short rationales, few tokens).
LLAMA_SETTINGS = {"judge_model": "smollm2-135m", "judge_max_tokens": 96, "judge_rationale_max_chars": 32,
                  "judge_max_concurrency": 2, "judge_malformed_retries": 1, "judge_response_format": "auto",
                  "judge_timeout": 60.0}


@pytest.fixture(scope="session")
def llama_judged_runs(llama_server, tmp_path_factory):
    """Two identical judged runs on 20 hold-out rows sharing one cache; the server's request count
    after each."""
    work = tmp_path_factory.mktemp("llama-judged")
    rows = _synthetic_rows(LLAMA_ROWS)
    inputs = {**LLAMA_SETTINGS, "judge_base_url": llama_server.base_url, "judge_cache_dir": str(work / "cache")}
    # The server is the session's (tests/conftest.py): other modules' requests came before these.
    before, failed_before = llama_server.chat_requests_logged(), llama_server.chat_requests_logged("500")
    first = _judged_run(work / "first", rows, **inputs)
    after_first = llama_server.chat_requests_logged() - before
    failed = llama_server.chat_requests_logged("500") - failed_before
    second = _judged_run(work / "second", rows, **inputs)
    return {"first": first, "second": second, "work": work, "failed_requests": failed,
            "requests": (after_first, llama_server.chat_requests_logged() - before)}


def test_llama_cpp_judged_run_completes(llama_judged_runs):
    result, work = llama_judged_runs["first"], llama_judged_runs["work"]
    # llama-cpp-python's server rejects json_schema; auto-detection fell back to json_object
    assert result["resolved_judge_response_format"] == "json_object"
    calls = _calls(result)
    assert len(calls) == 4 * LLAMA_ROWS
    for call in calls:
        assert call["status"] in ("ok", "failed")
        if call["status"] == "ok":
            assert call["judgment"] and call["error"] is None
        else:
            assert call["judgment"] is None and call["error"] and call["raw"] is not None
    assert any(c["status"] == "ok" for c in result["rubric_judgments"])
    metrics = json.loads((work / "first" / "metrics.json").read_text())
    assert metrics["model_id"] == "tiny", "judged metrics must keep the run's metrics"
    judge = metrics["judge"]
    assert judge["settings"]["model"] == "smollm2-135m" and judge["settings"]["temperature"] == 0
    assert judge["settings"]["prompt_version"] == judge_protocol.PROMPT_VERSION and "school_alignment" in judge["settings"]["rubric"]
    for model in MODELS:
        judged = judge["rubric"][model]
        assert judged["judged"] + judged["failed"] == LLAMA_ROWS
        assert judged["judged"] == 0 or all(1 <= judged[c] <= 5 for c in judge_protocol.CRITERIA)
        assert judged["mean_answer_words"] > 0
    pairwise = judge["pairwise"]
    assert pairwise["wins"] + pairwise["ties"] + pairwise["losses"] == pairwise["judged"]
    assert pairwise["judged"] + pairwise["failed"] == LLAMA_ROWS
    assert pairwise["judged"] == 0 or 0 <= pairwise["position_consistency"] <= 1
    assert set(judge["rubric"]["per_school"]) == {r["category"] for r in _synthetic_rows(LLAMA_ROWS)}
    report = (work / "first" / "report.md").read_text()
    assert report.startswith("# Fine-tuning report") and "## LLM judge" in report and "Position consistency" in report
    lines = (work / "first" / "judgments.jsonl").read_text().splitlines()
    assert len(lines) == 2 * LLAMA_ROWS + LLAMA_ROWS  # rubric per answer + pairwise per question
    assert 'id="judge-comparison"' in (work / "first" / "report.html").read_text()


def test_llama_cpp_rerun_is_served_from_the_cache(llama_judged_runs, llama_server):
    after_first, after_second = llama_judged_runs["requests"]
    first, second = llama_judged_runs["first"], llama_judged_runs["second"]
    # the server saw each reply once, plus the probe: json_schema rejected on each try, json_object accepted
    assert after_first == first["judge_metrics"]["calls"]["replies"] + judge_client._PROBE_TRIES + 1
    assert llama_judged_runs["failed_requests"] == judge_client._PROBE_TRIES
    assert after_second == after_first, "the second identical run sent requests"
    assert second["judge_metrics"]["calls"]["replies_from_cache"] == second["judge_metrics"]["calls"]["replies"]
    strip = lambda calls: [{k: v for k, v in c.items() if k != "attempts"} for c in calls]  # noqa: E731
    assert strip(_calls(second)) == strip(_calls(first))
    cache_files = list((llama_judged_runs["work"] / "cache").rglob("*.json"))
    assert len(cache_files) >= 4 * LLAMA_ROWS and not list((llama_judged_runs["work"] / "cache").rglob(".*"))
