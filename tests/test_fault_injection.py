"""Fault injection: training SIGKILLed in the middle of an epoch resumes to the same result; a judge
server SIGKILLed mid-run loses no judgment it made, and a re-run asks only for the missing ones; an error
while saving (a full disk) leaves the previous outputs byte-identical and no temporary file behind."""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO
from judge_servers import JudgeServerProcess

import philo_dataflow
from philo_dataflow.stages import saving
from philo_dataflow.lib import artifacts
from philo_dataflow.lib.judge_protocol import PAIR_ORDERS
from philo_dataflow.testing import tree
from philo_dataflow.stages.training import resume_checkpoint_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- training killed mid-epoch -------------------------------------------------------------------

#: run.py, with two hooks: it stops for good while checkpoint-$HANG_AT_STEP is being saved (its adapter,
#: optimizer and scheduler written, its RNG and trainer state not yet) so the test can SIGKILL it there,
#: and it records the checkpoint ``Trainer.train`` is asked to resume from in $RESUMED_FROM.
_HOOKED_RUN = """
import os, sys, time
from pathlib import Path
from transformers import Trainer

hang_at = int(os.environ.get("HANG_AT_STEP", "0"))
save_rng_state, train = Trainer._save_rng_state, Trainer.train

def save_rng_state_or_hang(self, output_dir):
    if self.state.global_step == hang_at:
        Path(os.environ["HANG_MARKER"]).write_text(output_dir)
        time.sleep(600)
    return save_rng_state(self, output_dir)

def recorded_train(self, resume_from_checkpoint=None, **kwargs):
    Path(os.environ["RESUMED_FROM"]).write_text(str(resume_from_checkpoint))
    return train(self, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

Trainer._save_rng_state, Trainer.train = save_rng_state_or_hang, recorded_train
from philo_dataflow import cli
sys.exit(cli.main(sys.argv[1:]))
"""

#: Largest accepted difference between the final validation loss (and every logged loss) of the resumed
#: and the uninterrupted run. A checkpoint keeps adapter, optimizer, scheduler, RNG and trainer state
#: (early-stopping counter included), and the resumed run skips the batches already seen, so on CPU it
#: repeats the uninterrupted run's arithmetic: the measured difference is 0.0 (bitwise equal). The
#: tolerance leaves room for another BLAS build only; resuming without the optimizer state moved it by 5e-3.
RESUME_LOSS_TOLERANCE = 1e-6
#: 18 train examples at batch 2: 9 optimizer steps in the epoch; a checkpoint every 2 steps.
_TRAIN_FLAGS = (
    "--num-train-epochs", "1", "--per-device-train-batch-size", "2", "--eval-steps", "2", "--logging-steps", "1",
    "--learning-rate", "1e-2", "--max-seq-length", "256", "--max-new-tokens", "4", "--validation-fraction", "0.2",
    "--hold-out-fraction", "0.2", "--no-graph",
)
_KILL_AT_STEP = 6


def _start_run(output_dir: Path, model_dir: str, data: str, work: Path, *extra: str, **env: str) -> subprocess.Popen:
    command = [sys.executable, "-c", _HOOKED_RUN, "--model-id", model_dir, "--data-path", data,
               "--output-dir", str(output_dir), *_TRAIN_FLAGS, *extra]
    log = open(work / f"{output_dir.name}-{time.monotonic_ns()}.log", "w")  # a pipe could fill and block it
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "RESUMED_FROM": str(work / f"{output_dir.name}.resumed"), **env}
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=environment)
    process.log_path = Path(log.name)
    log.close()
    return process


def _finished(process: subprocess.Popen) -> None:
    assert process.wait(timeout=300) == 0, process.log_path.read_text()[-3000:]


def _losses(output_dir: Path) -> list:
    history = json.loads((output_dir / "adapter" / "training_log_history.json").read_text())
    return [(e["step"], e.get("loss"), e.get("eval_loss")) for e in history if "loss" in e or "eval_loss" in e]


def test_training_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, tiny_model_dir, small_jsonl):
    killed, uninterrupted = tmp_path / "killed", tmp_path / "uninterrupted"
    marker = tmp_path / "hanging"
    process = _start_run(killed, tiny_model_dir, small_jsonl, tmp_path, HANG_AT_STEP=str(_KILL_AT_STEP),
                         HANG_MARKER=str(marker))
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert process.poll() is None, process.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the checkpoint to be killed at"
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    # What was written before the kill is intact: two complete checkpoints, the cut-off one, nothing else.
    checkpoints = killed / "checkpoints"
    assert sorted(p.name for p in killed.iterdir()) == ["checkpoints"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4", f"checkpoint-{_KILL_AT_STEP}"]
    for step in (2, 4):
        state = json.loads((checkpoints / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert state["global_step"] == step and state["epoch"] < 1
        for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
            assert (checkpoints / f"checkpoint-{step}" / name).stat().st_size > 0, name
    cut_off = checkpoints / f"checkpoint-{_KILL_AT_STEP}"
    assert (cut_off / "optimizer.pt").is_file() and not (cut_off / "trainer_state.json").exists()
    with pytest.raises(ValueError, match="stopped while saving it"):
        resume_checkpoint_dir(str(killed), str(cut_off))

    resumed = _start_run(killed, tiny_model_dir, small_jsonl, tmp_path, "--resume-from-checkpoint", "last")
    _finished(resumed)
    assert (tmp_path / "killed.resumed").read_text() == str(checkpoints / "checkpoint-4")  # the newest complete one
    _finished(_start_run(uninterrupted, tiny_model_dir, small_jsonl, tmp_path))
    assert (tmp_path / "uninterrupted.resumed").read_text() == "None"

    final = {d: json.loads((d / "metrics.json").read_text())["validation"] for d in (killed, uninterrupted)}
    assert final[killed]["global_step"] == final[uninterrupted]["global_step"] == 9
    assert abs(final[killed]["eval_loss"] - final[uninterrupted]["eval_loss"]) <= RESUME_LOSS_TOLERANCE
    resumed_curve, reference_curve = _losses(killed), _losses(uninterrupted)
    assert [entry[0] for entry in resumed_curve] == [entry[0] for entry in reference_curve]
    for (_, *got), (_, *expected) in zip(resumed_curve, reference_curve):
        assert got == pytest.approx(expected, abs=RESUME_LOSS_TOLERANCE)
    first_train_loss = reference_curve[0][1]
    assert first_train_loss - final[uninterrupted]["eval_loss"] > 1e-3, "the loss must move for the comparison to mean anything"
    assert (killed / "hold_out_predictions.jsonl").read_text() == (uninterrupted / "hold_out_predictions.jsonl").read_text()


# --- judge server killed mid-run ---------------------------------------------------------------

_QUESTIONS = 6  # 12 rubric requests (2 answers each) + 12 pairwise requests (2 orders each)
_ANSWERED_BEFORE_KILL = 10


def _hold_out_rows() -> list[dict]:
    return [
        {"question": f"What does school {i} teach about virtue?", "category": ("Stoicism", "Taoism")[i % 2],
         "reference": f"Reference answer {i}.", "base_prediction": f"Base answer {i}.",
         "finetuned_prediction": f"A longer fine-tuned answer {i}."}
        for i in range(_QUESTIONS)
    ]


def _judged(dr, server: JudgeServerProcess, output_dir: Path) -> dict:
    inputs = {"output_dir": str(output_dir), "judge_model": "ok", "judge_base_url": server.base_url,
              "judge_response_format": "json_schema", "judge_timeout": 5.0, "judge_max_retries": 0,
              "judge_max_concurrency": 4}
    return dr.execute(["saved_judgments", "judge_metrics"], inputs=inputs,
                      overrides={"hold_out_set_predictions": _hold_out_rows()})


def _failed_calls(judgments_path: Path) -> list[dict]:
    records = [json.loads(line) for line in judgments_path.read_text().splitlines()]
    calls = [r for r in records if r["kind"] == "rubric"] + [r[o] for r in records if r["kind"] == "pairwise"
                                                               for o in PAIR_ORDERS]
    assert len(calls) == 4 * _QUESTIONS
    return [c for c in calls if c["status"] == "failed"]


def test_judge_killed_mid_run_keeps_its_judgments_and_a_rerun_asks_only_the_missing(tmp_path):
    dr = philo_dataflow.build_driver({"start": "base", "judge": True})
    out = tmp_path / "out"
    server = JudgeServerProcess(tmp_path, answer_limit=_ANSWERED_BEFORE_KILL).wait_until_ready()

    def kill_after_answers() -> None:
        deadline = time.monotonic() + 60
        while server.answered() < _ANSWERED_BEFORE_KILL and time.monotonic() < deadline:
            time.sleep(0.05)
        server.kill()  # the requests it is holding are cut off mid-flight

    killer = threading.Thread(target=kill_after_answers)
    killer.start()
    try:
        first = _judged(dr, server, out)
    finally:
        killer.join()
        server.kill()
    total = 4 * _QUESTIONS
    assert server.answered() == _ANSWERED_BEFORE_KILL
    # The run completed and reports the failures, in the metrics and in judgments.jsonl.
    calls = first["judge_metrics"]["calls"]
    assert (calls["judgments"], calls["failed"], calls["replies_from_cache"]) == (total, total - _ANSWERED_BEFORE_KILL, 0)
    failed = _failed_calls(out / "judgments.jsonl")
    assert len(failed) == total - _ANSWERED_BEFORE_KILL
    assert all(f["error"].startswith(("APIConnectionError", "APITimeoutError")) for f in failed), failed[0]["error"]
    # Every judgment the server made is in the cache.
    assert len(list((out / "judge_cache").rglob("*.json"))) == _ANSWERED_BEFORE_KILL

    restarted = JudgeServerProcess(tmp_path, port=server.port).wait_until_ready()  # same URL: same cache keys
    try:
        second = _judged(dr, restarted, out)
    finally:
        restarted.kill()
    assert restarted.answered() == total - _ANSWERED_BEFORE_KILL  # only the missing requests were sent
    calls = second["judge_metrics"]["calls"]
    assert (calls["judgments"], calls["failed"], calls["replies_from_cache"]) == (total, 0, _ANSWERED_BEFORE_KILL)
    assert _failed_calls(out / "judgments.jsonl") == []
    assert second["judge_metrics"]["pairwise"]["judged"] == _QUESTIONS


# --- errors while saving -----------------------------------------------------------------------

class _HalfWritingStream:
    """A text stream that takes the first half of what is written, then fails as a full disk does."""

    def __init__(self, stream):
        self._stream = stream

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stream.close()

    def write(self, text: str) -> int:
        self._stream.write(text[: len(text) // 2])
        self._stream.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


class _FaultyOs:
    """Stands in for the ``os`` module of ``philo_dataflow.stages.saving``: files opened through ``fdopen``
    fill the disk half way through (``full_disk``), or renames of a directory named like ``rename_of``
    fail (``os.replace``); anything else is the real ``os``."""

    def __init__(self, full_disk: bool = False, rename_of: str = ""):
        self._full_disk, self._rename_of = full_disk, rename_of

    def __getattr__(self, name: str):
        return getattr(os, name)

    def fdopen(self, handle: int, *args, **kwargs):
        stream = os.fdopen(handle, *args, **kwargs)
        return _HalfWritingStream(stream) if self._full_disk else stream

    def replace(self, source, destination) -> None:
        name = Path(source).name
        if self._rename_of and name.startswith(self._rename_of) and not name.endswith(".previous"):
            raise OSError(errno.EIO, "Input/output error")
        os.replace(source, destination)


@pytest.fixture(scope="module")
def saving_objects(tiny_model_dir):
    """A small PEFT model and tokenizer, and what each saver writes: ``(saver, keyword arguments)``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    return {"model": model, "tokenizer": AutoTokenizer.from_pretrained(tiny_model_dir)}


def _savers(objects: dict, version: str) -> dict:
    """Each output file's saver with arguments; ``version`` changes every file's content."""
    rows = [{"question": "What is wu wei?", "category": "Taoism", "reference": f"Effortless action ({version}).",
             "base_prediction": "b", "finetuned_prediction": "f"}]
    metrics = {"version": version}
    return {
        "adapter": (saving.save_best_models, dict(finetuned_model=objects["model"], tokenizer=objects["tokenizer"],
                                                  run_manifest={"version": version, "inputs": {"model_id": "tiny"}},
                                                  training_log_history=[])),
        "predictions": (saving.saved_hold_out_predictions, dict(hold_out_set_predictions=rows)),
        "metrics": (saving.saved_metrics, dict(run_metrics=metrics)),
        "report_html": (saving.saved_report_html, dict(report_html=f"<!DOCTYPE html><p>{version}</p>\n")),
        "report": (saving.saved_report, dict(report_markdown=f"# Report {version}\n")),
        "judgments": (saving.saved_judgments, dict(rubric_judgments=rows, pairwise_judgments=[])),
        "run_config": (saving.saved_run_config, dict(run_config={"version": version})),
    }


_FAULTS = [
    ("adapter", "disk full while saving the tokenizer"),
    ("adapter", "rename into place fails"),
    *[(name, "disk full") for name in ("predictions", "metrics", "report_html", "report", "judgments", "run_config")],
]


@pytest.mark.parametrize("output, fault", _FAULTS)
def test_an_error_while_saving_leaves_the_previous_outputs_intact(tmp_path, saving_objects, monkeypatch, output, fault):
    out = tmp_path / "out"
    for saver, arguments in _savers(saving_objects, "previous").values():
        saver(**arguments, output_dir=str(out))
    previous = tree(out)
    assert {"adapter/adapter_model.safetensors", "adapter/philo_dataflow_manifest.json", "metrics.json",
            "judgments.jsonl", "hold_out_predictions.csv", "report.html", "report.md"} <= set(previous)

    saver, arguments = _savers(saving_objects, "new")[output]
    if fault == "disk full while saving the tokenizer":
        def full_disk(directory, *args, **kwargs):  # the adapter's weights are already written by then
            (Path(directory) / "tokenizer.json").write_text('{"truncated')
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(saving_objects["tokenizer"], "save_pretrained", full_disk)
    else:
        faulty_os = _FaultyOs(full_disk=True) if fault == "disk full" else _FaultyOs(rename_of=f".{artifacts.ADAPTER_DIR}.")
        monkeypatch.setattr(saving, "os", faulty_os)
        monkeypatch.setattr(artifacts, "os", faulty_os)
    with pytest.raises(OSError):
        saver(**arguments, output_dir=str(out))
    assert tree(out) == previous  # byte-identical, and no temporary file or directory left
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []

    monkeypatch.undo()
    saver(**arguments, output_dir=str(out))  # without the fault, the same call does replace the files
    assert tree(out) != previous
    assert all(not p.name.startswith(".") for p in out.rglob("*"))


def test_saved_outputs_get_the_usual_permissions_not_owner_only(tmp_path, saving_objects):
    """Temporary files and directories are made owner-only (0600 / 0700); renamed into place they would
    stay so, and a host user could not read what a container wrote to a mounted volume."""
    for saver, arguments in _savers(saving_objects, "v").values():
        saver(**arguments, output_dir=str(tmp_path))
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~artifacts.UMASK}
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o777 & ~artifacts.UMASK
