"""Over-long records (``overlong_policy``): the contrib module's call on support-thread-like data whose
prompts are far above ``max_seq_length`` completes with the defaults, ``drop`` leaves them out, ``error``
refuses them in the preflight; what was shortened or dropped is counted per split, with indices."""

import json
import random
from pathlib import Path

import pytest
from conftest import FAST_INPUTS

import philo_dataflow
from philo_dataflow import preflight

CONTRIB_OUTPUTS = ["save_best_models", "hold_out_set_predictions", "training_and_validation_set_metrics",
                   "finetuned_model_on_validation_set"]
MAX_SEQ_LENGTH = 96


@pytest.fixture(scope="module")
def support_threads(tmp_path_factory) -> str:
    """30 support threads of our own making, keys as the contrib module's example data; every other
    question pastes a long log (about 400 tokens), far above ``MAX_SEQ_LENGTH``."""
    words = ("asset", "store", "sensor", "schedule", "partition", "backfill", "daemon", "queue", "worker", "token",
             "bucket", "region", "credential", "timeout", "retry", "graph", "op", "job", "resource", "config")

    def log(i: int) -> str:  # different words per thread, so that no two threads are near-duplicates
        rng = random.Random(i)
        return "".join(f"12:{n:02d} WARN {' '.join(rng.sample(words, 6))} {rng.randint(1000, 9999)}\n"
                       for n in range(20))

    rows = []
    for i in range(30):
        question = f"My pipeline run {i} fails on the asset store. What should I check?"
        if i % 2 == 0:
            question += "\nHere is the log:\n" + log(i)
        rows.append({"question": question, "gpt4_replies_target": f"Check the credentials of store {i} and retry "
                     "with a longer timeout; the warnings show the store answering slowly."})
    path = tmp_path_factory.mktemp("support") / "support-threads.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return str(path)


def _inputs(data: str, model: str, out: Path, **extra) -> dict:
    return {**FAST_INPUTS, "data_path": data, "model_id": model, "output_dir": str(out), "input_text_key": "question",
            "output_text_key": "gpt4_replies_target", "max_seq_length": MAX_SEQ_LENGTH, **extra}


@pytest.mark.parametrize("policy", ["truncate_prompt", "drop"])
def test_the_contrib_call_completes_and_counts_what_was_cut(policy, support_threads, tiny_model_dir, tmp_path,
                                                             one_torch_thread):
    extra = {} if policy == "truncate_prompt" else {"overlong_policy": policy}  # truncate_prompt is the default
    inputs = _inputs(support_threads, tiny_model_dir, tmp_path / "out", **extra)
    assert preflight.check_run_inputs(inputs) == []
    dr = philo_dataflow.build_driver({"start": "base"})
    result = dr.execute([*CONTRIB_OUTPUTS, "overlong_records", "train_set", "tokenized_train", "saved_metrics",
                         "saved_report"], inputs=inputs)
    done = result["overlong_records"]
    long_in_train = [i for i, q in enumerate(result["train_set"]["input_text"]) if "Here is the log" in q]
    assert long_in_train
    key, other = ("prompt_truncated", "dropped") if policy == "truncate_prompt" else ("dropped", "prompt_truncated")
    assert done["train_set"][key] == long_in_train and done["train_set"][other] == []
    assert all(len(ids) <= MAX_SEQ_LENGTH for ids in result["tokenized_train"]["input_ids"])
    if policy == "truncate_prompt":
        assert len(result["tokenized_train"]) == len(result["train_set"])
    else:
        assert len(result["tokenized_train"]) == len(result["train_set"]) - len(long_in_train)
    metrics = json.loads(Path(result["saved_metrics"]["path"]).read_text())
    assert metrics["overlong"]["train_set"][key] == long_in_train
    assert metrics["splits"]["train_set"]["overlong"][key] == long_in_train  # split_summary counts them too
    report = Path(result["saved_report"]["path"]).read_text()
    assert f"overlong_policy '{policy}'" in report
    # the hold-out answers were generated from the whole questions, logs included
    questions = [row["question"] for row in result["hold_out_set_predictions"]]
    assert any("Here is the log" in q and q.count("WARN") == 20 for q in questions)


def test_error_policy_refuses_in_the_preflight_naming_the_records(support_threads, tiny_model_dir, tmp_path):
    problems = preflight.check_run_inputs(_inputs(support_threads, tiny_model_dir, tmp_path / "out",
                                                  overlong_policy="error"))
    assert len(problems) == 1
    assert "15 of 30 prompts are max_seq_length=96 tokens or longer (records 0, 2, 4, 6" in problems[0].message
    assert "overlong_policy (--overlong-policy) truncate_prompt or drop" in problems[0].message
