"""What a run reports about itself beyond its scores: every record left out by reason (log, metrics.json,
report.md, the report page, the summary), and a verdict that says when the hold-out set is too small to
conclude, with the smallest ROUGE-L difference the hold-out set could detect at every size."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST_INPUTS, REPO, cli_flags

from philo_dataflow.lib.scores import (
    MIN_HOLD_OUT_QUESTIONS, conclusiveness, detectable_difference, minimum_questions, rouge_per_example,
)
from philo_dataflow.stages.loading import raw_records, records_left_out


def _chat(question: str, answer, *more: dict) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}, *more]}


#: Four usable Stoic chats and three records a run must account for: a null answer (record 1), a repeated
#: prompt (record 3) and a conversation ending on a user turn (record 5, kept without that turn).
ROWS = [
    _chat("What did the Stoics mean by virtue?", "Excellence of character, the only good."),
    _chat("How does a Stoic grieve?", None),
    _chat("How does a Stoic face the death of a friend?", "With grief in measure: the friend was lent."),
    _chat("What did the Stoics mean by virtue?", "Another answer to a repeated prompt."),
    _chat("Why do Stoics practise premeditation of evils?", "Picturing losses readies the mind."),
    _chat("What is the Stoic dichotomy of control?", "Judgements are up to us; fortune is not.",
          {"role": "user", "content": "And fame?"}),
]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_model_dir) -> dict:
    """``run.py`` on ``ROWS`` with the tiny model: four examples split 2/1/1, a verdict on one question."""
    work = tmp_path_factory.mktemp("accounting")
    data = work / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    settings = {**FAST_INPUTS, "data_path": str(data), "model_id": tiny_model_dir, "output_dir": str(work / "out")}
    process = subprocess.run([sys.executable, str(REPO / "run.py"), *cli_flags(settings), "--no-graph"], cwd=work,
                             capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr[-3000:]
    return {"out": work / "out", "data": str(data), "stdout": process.stdout, "stderr": process.stderr}


LEFT_OUT_LINE = ("6 record(s) read, 4 example(s) kept; left out: 1 with an empty or null question or answer (record 1); "
                 "1 repeating an earlier prompt (same earlier turns and question) (record 3); 1 ending on a user turn "
                 "with no answer (that turn dropped, the conversation kept) (record 5).")


def test_every_record_left_out_is_counted_by_reason_everywhere(small_run):
    metrics = json.loads((small_run["out"] / "metrics.json").read_text())
    assert metrics["left_out"] == {"records": 6, "examples": 4, "reasons": {
        "empty_question_or_answer": {"count": 1, "records": [1]},
        "repeated_prompt": {"count": 1, "records": [3]},
        "trailing_user_turn": {"count": 1, "records": [5]},
        "oasst_tree_without_reply": {"count": 0, "records": []},
        "other_language": {"count": 0, "records": []}}}
    # the log: its own line (no progress bar before it on that line), once
    log_lines = [line for line in small_run["stderr"].splitlines() if LEFT_OUT_LINE in line]
    assert log_lines == [f"WARNING philo_dataflow.stages.loading: {small_run['data']}: {LEFT_OUT_LINE}"]
    assert f"Records: {LEFT_OUT_LINE}" in small_run["stdout"]
    assert f"Records: {LEFT_OUT_LINE}" in (small_run["out"] / "report.md").read_text()
    page = (small_run["out"] / "report.html").read_text()
    assert f"<p>Records: {LEFT_OUT_LINE}</p>" in page


def test_oasst_reasons_are_counted_with_their_trees():
    path = str(REPO / "tests" / "data_formats" / "oasst.trees.jsonl")
    summary = records_left_out(raw_records(path)[0], path, None, lang="en")
    assert {reason: done for reason, done in summary["reasons"].items() if done["count"]} == {
        "oasst_tree_without_reply": {"count": 1, "records": [6]}, "other_language": {"count": 1, "records": [2]}}


def test_a_verdict_on_one_question_is_not_conclusive(small_run):
    metrics = json.loads((small_run["out"] / "metrics.json").read_text())
    conclusion = metrics["hold_out"]["rougeL_verdict"]
    assert metrics["hold_out"]["base"]["count"] == 1
    assert conclusion["conclusive"] is False and conclusion["questions"] == 1
    assert conclusion["minimum_questions"] == MIN_HOLD_OUT_QUESTIONS == 6
    assert conclusion["detectable_difference"] is None  # one difference has no spread
    assert "1 question(s) are fewer than 6" in conclusion["reason"]
    # everything is still written, and every report says so
    assert (small_run["out"] / "adapter" / "adapter_model.safetensors").is_file()
    assert "verdict NOT CONCLUSIVE: 1 question(s) are fewer than 6" in small_run["stdout"]
    report = (small_run["out"] / "report.md").read_text()
    assert "On 1 hold-out questions the verdict is **not conclusive**: 1 question(s) are fewer than 6" in report
    assert "the fine-tuned model is **" not in report
    assert "the verdict is not conclusive: 1 question(s)" in (small_run["out"] / "report.html").read_text()
    assert "verdict is **not conclusive**" in (small_run["out"] / "adapter" / "README.md").read_text()


def test_a_conclusive_run_states_the_difference_its_questions_could_detect(tiny_run_dir):
    """At every size: the detectable difference recomputed from the saved answers, by the formula."""
    out = Path(tiny_run_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "hold_out_predictions.jsonl").read_text().splitlines()]
    references = [row["reference"] for row in rows]
    base, tuned = (rouge_per_example([row[f"{m}_prediction"] for row in rows], references) for m in ("base", "finetuned"))
    differences = [t["rougeL"] - b["rougeL"] for b, t in zip(base, tuned)]
    conclusion = metrics["hold_out"]["rougeL_verdict"]
    assert conclusion["conclusive"] is True and conclusion["questions"] == len(rows) >= MIN_HOLD_OUT_QUESTIONS
    expected = (1.959964 + 0.841621) * statistics.stdev(differences) / math.sqrt(len(differences))
    assert conclusion["detectable_difference"] == pytest.approx(expected, rel=1e-5)
    line = (f"The smallest ROUGE-L difference these {len(rows)} questions could detect: "
            f"{conclusion['detectable_difference']:.3f} (95% level, 80% power")
    assert line in (out / "report.md").read_text()


def test_minimum_questions_is_where_a_sign_test_can_first_reject():
    assert minimum_questions(0.95) == 6 and minimum_questions(0.99) == 8
    # 5 wins of 5: p = 0.0625; 6 of 6: 0.03125
    assert conclusiveness([0.1] * 5)["conclusive"] is False and conclusiveness([0.1] * 6)["conclusive"] is True


def test_detectable_difference_has_its_power():
    """A true mean difference equal to the detectable difference is found (the 95% normal interval of the
    mean excludes 0) in about 80% of samples of as many questions with the same spread."""
    import random

    observed = [0.1, -0.1] * 20
    n, spread = len(observed), statistics.stdev(observed)
    target = detectable_difference(observed)
    assert target == pytest.approx((1.959964 + 0.841621) * spread / math.sqrt(n), rel=1e-5)
    rng, found = random.Random(0), 0
    for _ in range(4000):
        sample = [rng.gauss(target, spread) for _ in range(n)]
        found += statistics.fmean(sample) - 1.959964 * spread / math.sqrt(n) > 0
    assert 0.77 < found / 4000 < 0.83
