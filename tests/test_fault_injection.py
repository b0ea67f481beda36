"""Fault injection: training SIGKILLed in the middle of an epoch resumes to the same result; training stopped
by SIGTERM or SIGINT saves a checkpoint at that step, prints one line with the command that resumes it, and
that command ends with the same adapter, byte for byte; a judge server SIGKILLed mid-run loses no judgment it
made, and a re-run asks only for the missing ones; an error while saving (a full disk) leaves the previous
outputs byte-identical and no temporary file behind; a full disk, real (a small tmpfs) or injected at
each write point, is one line naming the file and the bytes, with what was complete kept and named.

The stop signals are tested here, not in the bad-input corpus (``tests/bad_inputs``): a corpus case is a
command that is refused before it starts (exit status 2, ``error:`` lines, nothing written), while a stop
comes in the middle of a run, which writes a checkpoint, exits with 128 + the signal's number and prints a
line that is no error; what it must leave behind, and that its resume command gives the uninterrupted
result, are the questions of this module."""

import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import FAST_INPUTS, REPO, cli_flags, small_filesystem
from judge_servers import JudgeServerProcess

import philo_dataflow
from philo_dataflow import cli
from philo_dataflow.cli import job
from philo_dataflow.stages import loading, saving
from philo_dataflow.lib import artifacts, stopping
from philo_dataflow.lib.disk_space import NoSpaceLeft
from philo_dataflow.lib.gguf_export import GGUFConversionError
from philo_dataflow.lib.judge_protocol import PAIR_ORDERS
from philo_dataflow.testing import example_subset, tree
from philo_dataflow.stages.training import resume_checkpoint_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- training killed mid-epoch, or stopped by a signal ----------------------------------------------

#: run.py with hooks, each turned on by an environment variable. It is run from a file (``hooked_run``), so
#: the command a stopped run prints to resume it can be run as printed.
#: - HANG_AT_STEP: it stops for good while checkpoint-$HANG_AT_STEP is being saved (its adapter, optimizer
#:   and scheduler written, its RNG and trainer state not yet) and writes $HANG_MARKER, so the test can
#:   SIGKILL it there;
#: - SIGNAL_AFTER_STEP: in the optimizer step after that one it sends itself SIGTERM (so the signal comes at
#:   the same point every time) and, with $HANG_MARKER set, then hangs in that step, for a second signal;
#: - SIGNAL_WHILE_SAVING_ADAPTER: it sends itself that signal (SIGINT...) while ``save_best_models`` writes
#:   the tokenizer into the adapter directory it is building;
#: - SCRIPTED_EVAL_LOSS: JSON ``{step: loss}``, the validation loss the evaluations during training report
#:   at those steps (to steer early stopping and the best checkpoint);
#: - RESUMED_FROM: it records there the checkpoint ``Trainer.train`` is asked to resume from.
#: SIGINT is handled as in a terminal even where the test runner was started ignoring it (``&`` in a script),
#: which the child would inherit.
_HOOKED_RUN = """
import json, os, signal, sys, time
from pathlib import Path
from transformers import PreTrainedTokenizerBase, Trainer

signal.signal(signal.SIGINT, signal.default_int_handler)
hang_at = int(os.environ.get("HANG_AT_STEP", "-1"))
signal_after = int(os.environ.get("SIGNAL_AFTER_STEP", "-1"))
signal_while_saving = os.environ.get("SIGNAL_WHILE_SAVING_ADAPTER")
scripted = {int(step): loss for step, loss in json.loads(os.environ.get("SCRIPTED_EVAL_LOSS", "{}")).items()}
save_rng_state, train, training_step = Trainer._save_rng_state, Trainer.train, Trainer.training_step
evaluation_loop, save_tokenizer = Trainer.evaluation_loop, PreTrainedTokenizerBase.save_pretrained

def hang(marker_text):
    Path(os.environ["HANG_MARKER"]).write_text(marker_text)
    time.sleep(600)

def save_rng_state_or_hang(self, output_dir):
    if self.state.global_step == hang_at:
        hang(output_dir)
    return save_rng_state(self, output_dir)

def recorded_train(self, resume_from_checkpoint=None, **kwargs):
    Path(os.environ["RESUMED_FROM"]).write_text(str(resume_from_checkpoint))
    return train(self, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

def training_step_that_signals(self, *args, **kwargs):
    if self.state.global_step == signal_after and not getattr(self, "signalled", False):
        self.signalled = True
        os.kill(os.getpid(), signal.SIGTERM)
        if "HANG_MARKER" in os.environ:
            hang(str(signal_after + 1))
    return training_step(self, *args, **kwargs)

def scripted_evaluation_loop(self, *args, **kwargs):
    output = evaluation_loop(self, *args, **kwargs)
    if self.is_in_train and self.state.global_step in scripted:
        output.metrics["eval_loss"] = scripted[self.state.global_step]
    return output

def save_tokenizer_signalling(self, save_directory, *args, **kwargs):
    if signal_while_saving and Path(save_directory).name.startswith(".adapter."):
        os.kill(os.getpid(), getattr(signal, signal_while_saving))
    return save_tokenizer(self, save_directory, *args, **kwargs)

Trainer._save_rng_state, Trainer.train = save_rng_state_or_hang, recorded_train
Trainer.training_step, Trainer.evaluation_loop = training_step_that_signals, scripted_evaluation_loop
PreTrainedTokenizerBase.save_pretrained = save_tokenizer_signalling
from philo_dataflow import cli
sys.exit(cli.main(sys.argv[1:]))
"""

#: Largest accepted difference between the final validation loss (and every logged loss) of the resumed
#: and the uninterrupted run. A checkpoint keeps adapter, optimizer, scheduler, RNG and trainer state
#: (early-stopping counter included), and the resumed run skips the batches already seen, so on CPU it
#: repeats the uninterrupted run's arithmetic: the measured difference is 0.0 (bitwise equal). The
#: tolerance leaves room for another BLAS build only; resuming without the optimizer state moved it by 5e-3.
RESUME_LOSS_TOLERANCE = 1e-6
#: 18 train examples at batch 2: 9 optimizer steps in the epoch; a checkpoint every 2 steps. No cache: every
#: run trains (the runs differ in their output directories only, which the cache's keys leave out).
_TRAIN_FLAGS = (
    "--num-train-epochs", "1", "--per-device-train-batch-size", "2", "--eval-steps", "2", "--logging-steps", "1",
    "--learning-rate", "1e-2", "--max-seq-length", "256", "--max-new-tokens", "4", "--validation-fraction", "0.2",
    "--hold-out-fraction", "0.2", "--no-graph", "--no-cache",
)
_KILL_AT_STEP = 6
#: The step in which the stop signal comes: the run stops at its end, after step 5, which saves no
#: checkpoint of its own, in the middle of the epoch.
_SIGNAL_AFTER_STEP = 4
#: The runs the stop is tested in: name -> (flags, the validation losses scripted, and the uninterrupted run's
#: last step and kept checkpoint).
#: - "evaluation per epoch", the default (no --eval-steps): one evaluation and checkpoint, at the epoch's end.
#:   Were the step the run stopped at evaluated (the Trainer asks for it when it ends the epoch it broke
#:   off), its scripted loss would make it the best checkpoint.
#: - "early stopping", an evaluation and checkpoint every 2 steps: early stopping (patience 2) ends the
#:   uninterrupted run at step 6, its count of evaluations without improvement begun before the stop (step 4)
#:   and ended after it. Without that count the resumed run trains on, and step 8's loss makes it keep
#:   another checkpoint.
_STOP_SCENARIOS = {
    "evaluation per epoch": (_TRAIN_FLAGS[:_TRAIN_FLAGS.index("--eval-steps")]
                             + _TRAIN_FLAGS[_TRAIN_FLAGS.index("--eval-steps") + 2:], {"5": 0.1}, (9, "checkpoint-9")),
    "early stopping": (_TRAIN_FLAGS, {"2": 1.0, "4": 1.1, "6": 1.2, "8": 0.5}, (6, "checkpoint-2")),
}


@pytest.fixture(scope="module")
def hooked_run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hook") / "hooked_run.py"
    path.write_text(_HOOKED_RUN)
    return path


@pytest.fixture(scope="module")
def training_data(tmp_path_factory) -> str:
    """30 alpaca records from the example data (three schools), as ``small_jsonl`` holds them."""
    return example_subset(tmp_path_factory.mktemp("data") / "small.jsonl", 10, ("Stoicism", "Taoism", "Hedonism"))


def _run_command(hook: Path, output_dir: Path, model_dir: str, data: str, *extra: str, flags=_TRAIN_FLAGS) -> list:
    return [sys.executable, str(hook), "--model-id", model_dir, "--data-path", data, "--output-dir", str(output_dir),
            *flags, *extra]


def _start(command: list, output_dir: Path, work: Path, **env: str) -> subprocess.Popen:
    """``command`` started with the checkout importable (the hook file lies elsewhere), its output to a log
    file (a pipe could fill and block it)."""
    log = open(work / f"{output_dir.name}-{time.monotonic_ns()}.log", "w")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                   "RESUMED_FROM": str(work / f"{output_dir.name}.resumed"), **env}
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=environment)
    process.log_path = Path(log.name)
    log.close()
    return process


def _start_run(hook: Path, output_dir: Path, model_dir: str, data: str, work: Path, *extra: str,
               **env: str) -> subprocess.Popen:
    return _start(_run_command(hook, output_dir, model_dir, data, *extra), output_dir, work, **env)


def _finished(process: subprocess.Popen, status: int = 0) -> str:
    """The process's output, once it has ended with ``status``."""
    assert process.wait(timeout=300) == status, process.log_path.read_text()[-3000:]
    return process.log_path.read_text()


def _losses(output_dir: Path) -> list:
    history = json.loads((output_dir / "adapter" / "training_log_history.json").read_text())
    return [(e["step"], e.get("loss"), e.get("eval_loss")) for e in history if "loss" in e or "eval_loss" in e]


def _assert_same_losses(resumed: Path, uninterrupted: Path) -> None:
    """Every logged training and validation loss of the two runs at the same steps, within
    ``RESUME_LOSS_TOLERANCE``."""
    resumed_curve, reference_curve = _losses(resumed), _losses(uninterrupted)
    assert [entry[0] for entry in resumed_curve] == [entry[0] for entry in reference_curve]
    for (_, *got), (_, *expected) in zip(resumed_curve, reference_curve):
        assert got == pytest.approx(expected, abs=RESUME_LOSS_TOLERANCE)


def _adapter_weights(output_dir: Path) -> bytes:
    return (output_dir / "adapter" / "adapter_model.safetensors").read_bytes()


def test_training_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, hooked_run, tiny_model_dir,
                                                                       training_data):
    killed, uninterrupted = tmp_path / "killed", tmp_path / "uninterrupted"
    marker = tmp_path / "hanging"
    process = _start_run(hooked_run, killed, tiny_model_dir, training_data, tmp_path,
                         HANG_AT_STEP=str(_KILL_AT_STEP), HANG_MARKER=str(marker))
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

    resumed = _start_run(hooked_run, killed, tiny_model_dir, training_data, tmp_path,
                         "--resume-from-checkpoint", "last")
    _finished(resumed)
    assert (tmp_path / "killed.resumed").read_text() == str(checkpoints / "checkpoint-4")  # the newest complete one
    _finished(_start_run(hooked_run, uninterrupted, tiny_model_dir, training_data, tmp_path))
    assert (tmp_path / "uninterrupted.resumed").read_text() == "None"

    final = {d: json.loads((d / "metrics.json").read_text())["validation"] for d in (killed, uninterrupted)}
    assert final[killed]["global_step"] == final[uninterrupted]["global_step"] == 9
    assert abs(final[killed]["eval_loss"] - final[uninterrupted]["eval_loss"]) <= RESUME_LOSS_TOLERANCE
    _assert_same_losses(killed, uninterrupted)
    first_train_loss = _losses(uninterrupted)[0][1]
    assert first_train_loss - final[uninterrupted]["eval_loss"] > 1e-3, "the loss must move for the comparison to mean anything"
    assert (killed / "hold_out_predictions.jsonl").read_text() == (uninterrupted / "hold_out_predictions.jsonl").read_text()


def _stop_lines(output: str) -> list:
    return [line for line in output.splitlines() if line.startswith("philo-dataflow: stopped by")]


@pytest.mark.parametrize("scenario", list(_STOP_SCENARIOS))
def test_sigterm_mid_training_saves_a_checkpoint_and_its_resume_command_gives_the_same_adapter(
        scenario, tmp_path, hooked_run, tiny_model_dir, training_data):
    """The acceptance test of a clean stop: SIGTERM in the middle of training, then the command it prints,
    end with the adapter an uninterrupted run saves, byte for byte (``_STOP_SCENARIOS``)."""
    flags, losses, (last_step, kept) = _STOP_SCENARIOS[scenario]
    scripted = {"SCRIPTED_EVAL_LOSS": json.dumps(losses)}
    uninterrupted, stopped = tmp_path / "uninterrupted", tmp_path / "stopped"
    _finished(_start(_run_command(hooked_run, uninterrupted, tiny_model_dir, training_data, flags=flags),
                     uninterrupted, tmp_path, **scripted))
    command = _run_command(hooked_run, stopped, tiny_model_dir, training_data, flags=flags)
    output = _finished(_start(command, stopped, tmp_path, SIGNAL_AFTER_STEP=str(_SIGNAL_AFTER_STEP), **scripted),
                       128 + signal.SIGTERM)

    step = _SIGNAL_AFTER_STEP + 1
    checkpoint = stopped / "checkpoints" / f"checkpoint-{step}"
    resume = [*command, "--resume-from-checkpoint", "last"]
    assert _stop_lines(output) == [f"philo-dataflow: stopped by SIGTERM; the checkpoint of step {step} is saved in "
                                   f"{checkpoint}; resume with: {shlex.join(resume)}"]
    assert "SIGTERM received: stopping once this training step ends and its checkpoint is saved" in output
    assert "Traceback" not in output
    # The checkpoint of the step the signal came in, complete, beside the best one; nothing else written.
    assert sorted(p.name for p in stopped.iterdir()) == ["checkpoints"]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == step and state["epoch"] < 1
    assert not [entry for entry in state["log_history"] if entry["step"] == step and "eval_loss" in entry]
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert (checkpoint / name).stat().st_size > 0, name
    if scenario == "early stopping":
        assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["checkpoint-2", checkpoint.name]
        assert state["best_model_checkpoint"] == str(stopped / "checkpoints" / "checkpoint-2")
        early_stopping = state["stateful_callbacks"]["EarlyStoppingCallback"]
        assert early_stopping["attributes"]["early_stopping_patience_counter"] == 1
    else:
        assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == [checkpoint.name]

    environment = {"RESUMED_FROM": str(tmp_path / "resumed"), **scripted}
    printed = _stop_lines(output)[0].split("resume with: ", 1)[1]
    _finished(_start(shlex.split(printed), stopped, tmp_path, **environment))
    assert (tmp_path / "resumed").read_text() == str(checkpoint)

    assert _adapter_weights(stopped) == _adapter_weights(uninterrupted)
    final = {d: json.loads((d / "metrics.json").read_text())["validation"] for d in (stopped, uninterrupted)}
    for run in final.values():
        assert (run["global_step"], Path(run["best_model_checkpoint"]).name) == (last_step, kept)
    assert final[stopped]["eval_loss"] == pytest.approx(final[uninterrupted]["eval_loss"], abs=RESUME_LOSS_TOLERANCE)
    _assert_same_losses(stopped, uninterrupted)
    if scenario == "evaluation per epoch":  # the kept checkpoint was trained after the resume: the bytes test that
        first_train_loss = _losses(uninterrupted)[0][1]
        assert first_train_loss - final[uninterrupted]["eval_loss"] > 1e-3, "the loss must move"


def test_a_second_signal_stops_at_once_without_a_checkpoint(tmp_path, hooked_run, tiny_model_dir, training_data):
    stopped, marker = tmp_path / "stopped", tmp_path / "hanging"
    process = _start_run(hooked_run, stopped, tiny_model_dir, training_data, tmp_path, SIGNAL_AFTER_STEP="2",
                         HANG_MARKER=str(marker))
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():  # the first SIGTERM came in step 3, which now hangs
            assert process.poll() is None, process.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the step to be signalled in"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGTERM  # ended by the signal itself: 143 to a shell
    output = process.log_path.read_text()
    assert "SIGTERM received: stopping once this training step ends" in output and _stop_lines(output) == []
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["checkpoint-2"]


def test_sigint_while_saving_the_adapter_finishes_it_and_resuming_trains_no_step_more(tmp_path, hooked_run,
                                                                                      tiny_model_dir, training_data):
    """A signal outside training stops the run at once, but not in the middle of writing an output: the
    adapter directory being built is finished and swapped in first. Training had ended, at ``--max-steps 7``,
    inside the epoch: resumed from that step's checkpoint, the run takes no step more
    (``lib.trainer.ResumableTrainer``) and ends as the uninterrupted one."""
    flags = (*_TRAIN_FLAGS, "--max-steps", "7")
    uninterrupted, stopped = tmp_path / "uninterrupted", tmp_path / "stopped"
    _finished(_start(_run_command(hooked_run, uninterrupted, tiny_model_dir, training_data, flags=flags),
                     uninterrupted, tmp_path))
    command = _run_command(hooked_run, stopped, tiny_model_dir, training_data, flags=flags)
    output = _finished(_start(command, stopped, tmp_path, SIGNAL_WHILE_SAVING_ADAPTER="SIGINT"), 128 + signal.SIGINT)
    checkpoint = stopped / "checkpoints" / "checkpoint-7"
    assert _stop_lines(output) == [f"philo-dataflow: stopped by SIGINT; the checkpoint of step 7 is saved in "
                                   f"{checkpoint}; resume with: "
                                   f"{shlex.join([*command, '--resume-from-checkpoint', 'last'])}"]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert _adapter_weights(stopped) == _adapter_weights(uninterrupted)
    assert {"tokenizer.json", "philo_dataflow_manifest.json", "training_log_history.json"} <= {
        p.name for p in (stopped / "adapter").iterdir()}
    assert [str(p) for p in stopped.rglob(".*")] == []  # no temporary file or directory left

    resumed = tmp_path / "resumed"
    _finished(_start(shlex.split(_stop_lines(output)[0].split("resume with: ", 1)[1]), stopped, tmp_path,
                     RESUMED_FROM=str(resumed)))
    assert resumed.read_text() == str(checkpoint)
    final = {d: json.loads((d / "metrics.json").read_text())["validation"] for d in (stopped, uninterrupted)}
    assert final[stopped]["global_step"] == final[uninterrupted]["global_step"] == 7
    kept = {d: Path(final[d]["best_model_checkpoint"]).name for d in final}
    assert kept[stopped] == kept[uninterrupted]
    assert _adapter_weights(stopped) == _adapter_weights(uninterrupted)
    _assert_same_losses(stopped, uninterrupted)


def test_a_signal_while_loading_stops_at_once_with_the_command_to_start_again(tmp_path, tiny_model_dir, small_jsonl,
                                                                             monkeypatch, capsys):
    """The signal comes in a node of a run with Hamilton's cache on, whose adapter took an interrupt for a
    result and failed with an ``AssertionError`` in its place until ``lib.caching.InterruptsPassTheCache``."""
    read_records = loading.read_records

    def signalled_read_records(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return read_records(*args, **kwargs)

    monkeypatch.setattr(loading, "read_records", signalled_read_records)
    handlers = {signum: signal.getsignal(signum) for signum in stopping.STOP_SIGNALS}
    argv = ["--model-id", tiny_model_dir, "--data-path", small_jsonl, "--output-dir", str(tmp_path / "out"),
            "--no-graph", "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(argv) == 128 + signal.SIGTERM
    output = capsys.readouterr()
    assert _stop_lines(output.err) == [f"philo-dataflow: stopped by SIGTERM, no checkpoint saved; "
                                       f"start it again with: philo-dataflow {shlex.join(argv)}"]
    assert "Traceback" not in output.err + output.out
    assert [p for p in (tmp_path / "out").rglob("*")] == []
    assert {signum: signal.getsignal(signum) for signum in stopping.STOP_SIGNALS} == handlers  # restored


def test_a_stop_signal_raises_at_once_outside_a_held_block_and_at_its_end_inside():
    with stopping.stop_signals_handled():
        with pytest.raises(stopping.StopRequested) as raised:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted
        assert raised.value.exit_status == 143 and isinstance(raised.value, KeyboardInterrupt)
    finished = []
    with stopping.stop_signals_handled():
        with pytest.raises(stopping.StopRequested) as raised:
            with stopping.stop_held():
                with stopping.stop_held():
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.1)
                    finished.append("inner")
                finished.append("outer")  # the stop waits for the outermost block
        assert finished == ["inner", "outer"] and raised.value.signum == signal.SIGTERM
    assert stopping.requested_stop() is None  # a later run starts afresh
    assert stopping.StopRequested(signal.SIGINT).exit_status == 130


def test_the_resume_command_replaces_the_checkpoint_it_was_given():
    argv = ["--output-dir", "o", "--resume-from-checkpoint", "o/checkpoints/checkpoint-4", "--seed", "1",
            "--resume-from-checkpoint=last"]
    assert job._with_resume(argv, "last") == ["--output-dir", "o", "--seed", "1", "--resume-from-checkpoint", "last"]


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
    """A small PEFT model, the plain model (what a merge gives) and the tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    return {"model": model, "plain": AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            "tokenizer": AutoTokenizer.from_pretrained(tiny_model_dir)}


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
#: The file a full disk's line names, per output of ``_savers``.
_FULL_FILES = {"adapter": "adapter/tokenizer.json", "predictions": "hold_out_predictions.jsonl",
               "metrics": "metrics.json", "report_html": "report.html", "report": "report.md",
               "judgments": "judgments.jsonl", "run_config": "config.yaml"}


def _assert_full_disk_line(line: str, path, *also: str) -> None:
    """``line`` is a full disk's: it names ``path``, the bytes needed and the bytes free, and holds ``also``."""
    assert f"no space left on device writing {path}: " in line, line
    assert re.search(r"needs (about )?[\d,]+ bytes", line) and re.search(r"[\d,]+ bytes( \([\d.]+ [kMG]B\))? are free", line), line
    assert "\n" not in line and all(part in line for part in also), line


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
    with pytest.raises(OSError if fault == "rename into place fails" else NoSpaceLeft) as raised:
        saver(**arguments, output_dir=str(out))
    if fault != "rename into place fails":
        _assert_full_disk_line(str(raised.value), out / _FULL_FILES[output])
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


# --- a full disk at each of the other write points (injected) ---------------------------------

def _half_written(path: Path) -> None:
    """Writes part of ``path``, then fails as a full disk does."""
    path.write_bytes(b"\0" * 1000)
    raise OSError(errno.ENOSPC, "No space left on device")


def _model_card(objects: dict, out: Path) -> tuple:
    saving.save_best_models(objects["model"], objects["tokenizer"], {"inputs": {"model_id": "tiny"}}, [], str(out))
    faulty_os = _FaultyOs(full_disk=True)
    return (lambda: saving.saved_model_card("# card\n", {"adapter_dir": str(out / "adapter")}),
            [(artifacts, "os", faulty_os)], out / "adapter" / "README.md", ())


def _merged(objects: dict, out: Path) -> dict:
    return saving.saved_merged_model(objects["plain"], objects["tokenizer"], {}, 8, str(out))


def _merged_model(objects: dict, out: Path) -> tuple:
    model = objects["plain"]
    save = lambda directory, **kwargs: _half_written(Path(directory) / "model.safetensors")  # noqa: E731
    return (lambda: _merged(objects, out), [(model, "save_pretrained", save)], out / "merged" / "model.safetensors", ())


def _gguf(objects: dict, out: Path) -> tuple:
    merged = _merged(objects, out)
    faults = [(saving, "converter_missing", lambda: None),
              (saving, "convert_to_gguf", lambda directory, outfile, outtype: _half_written(outfile))]
    return (lambda: saving.saved_gguf_model(merged, "FROM ./model.gguf\n"), faults, out / "merged" / "model.gguf", ())


def _quantized(objects: dict, out: Path) -> tuple:
    merged = _merged(objects, out)
    source = out / "merged" / "model.gguf"
    source.write_bytes(b"\0" * 4000)  # stands in for the f32 file: the quantizer is replaced too

    def quantize(source_path, outfile, quantization):  # the first copy is made, the second meets a full disk
        if quantization == "q8_0":
            Path(outfile).write_bytes(b"\0" * 1000)
        else:
            _half_written(Path(outfile))

    gguf = {"status": "ok", "gguf": str(source), "bytes": source.stat().st_size, "merged_dir": merged["merged_dir"]}
    return (lambda: saving.saved_quantized_gguf_models(gguf, ["q8_0", "q4_0"]), [(saving, "quantize_gguf", quantize)],
            out / "merged" / "model.q4_0.gguf", ("merged/model.q8_0.gguf",))


def _export_report(objects: dict, out: Path) -> tuple:
    merged = _merged(objects, out)
    return (lambda: saving.saved_export_report({"version": 1}, "# export\n", "<p>export</p>\n", merged),
            [(artifacts, "os", _FaultyOs(full_disk=True))], out / "merged" / "export_report.json", ())


def _merged_model_card(objects: dict, out: Path) -> tuple:
    merged = _merged(objects, out)
    return (lambda: saving.saved_merged_model_card("# merged\n", merged), [(artifacts, "os", _FaultyOs(full_disk=True))],
            out / "merged" / "README.md", ())


@pytest.mark.parametrize("write_point", [_model_card, _merged_model, _gguf, _quantized, _export_report,
                                         _merged_model_card], ids=lambda make: make.__name__.strip("_"))
def test_a_full_disk_at_each_write_point_is_one_line_and_leaves_what_was_complete(
        tmp_path, saving_objects, monkeypatch, write_point):
    """Where a disk cannot really be filled, each writer fails as a full disk does (``ENOSPC`` after part of
    the file): one ``NoSpaceLeft`` line naming the file and the bytes, nothing half-written, the rest kept."""
    out = tmp_path / "out"
    save, faults, failing, made = write_point(saving_objects, out)
    before = tree(out)
    for owner, name, value in faults:
        monkeypatch.setattr(owner, name, value)
    with pytest.raises(NoSpaceLeft) as raised:
        save()
    monkeypatch.undo()
    _assert_full_disk_line(str(raised.value), failing)
    after = tree(out)
    # What was complete (the adapter, the merged model) is as it was; what was made whole (the q8_0 copy) stays.
    assert sorted(set(after) - set(before)) == list(made) and {k: after[k] for k in before} == before


# --- a full disk in a whole run --------------------------------------------------------------------

#: The full-disk runs' filesystem: the preflight estimates the tiny run at about 16 MB (two checkpoints of
#: 3.7 MB, mostly the tokenizer, the adapter, the report page's plotly.js), so it lets the run start.
_FILESYSTEM_BYTES = 32 * 2**20


def _fill(filesystem: Path, leave: int) -> None:
    """Writes a ballast file on ``filesystem`` so that about ``leave`` bytes stay free."""
    with open(filesystem / "ballast", "ab") as handle:
        handle.write(b"\0" * max(0, shutil.disk_usage(filesystem).free - leave))


def _allocated(directory: Path, names) -> int:
    return sum((directory / name).stat().st_blocks * 512 for name in names)


def _tiny_run(out: Path, tiny_model_dir: str, data: str, cache: Path, *extra: str) -> list:
    return [*cli_flags({**FAST_INPUTS, "model_id": tiny_model_dir, "data_path": data, "output_dir": str(out)}),
            "--no-graph", "--cache-dir", str(cache), *extra]


def _error_line(capsys) -> str:
    """The run's one ``error:`` line (progress bars share stderr); no traceback."""
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def _half_written_entries(out: Path) -> list:
    return [str(path) for path in out.rglob("*") if path.name.startswith(".")
            or (path.parent.name == "checkpoints" and not artifacts.is_complete_checkpoint(path))]


def test_a_disk_filling_up_during_a_checkpoint_removes_it_and_keeps_the_complete_one(
        tmp_path, tiny_model_dir, small_jsonl, capsys, monkeypatch, one_torch_thread):
    """A real full disk while checkpoint-2 is saved, met by ``torch.save`` (which reports no errno): its
    weights and tokenizer fit, its optimizer state does not."""
    from transformers import Trainer

    save_checkpoint = Trainer._save_checkpoint

    def filling_before_the_second(self, model, trial):
        if self.state.global_step == 2:
            first = Path(self.args.output_dir) / "checkpoint-1"
            fitting = [p.name for p in first.iterdir() if p.name not in ("optimizer.pt", "scheduler.pt",
                                                                         "rng_state.pth", "trainer_state.json")]
            _fill(filesystem, _allocated(first, fitting) + 16384)
        return save_checkpoint(self, model, trial)

    monkeypatch.setattr(Trainer, "_save_checkpoint", filling_before_the_second)
    with small_filesystem(tmp_path / "fs", _FILESYSTEM_BYTES) as filesystem:
        out = filesystem / "out"
        assert cli.main(_tiny_run(out, tiny_model_dir, small_jsonl, tmp_path / "cache")) == 2
        line = _error_line(capsys)
        checkpoints = out / "checkpoints"
        _assert_full_disk_line(line, checkpoints / "checkpoint-2" / "optimizer.pt", "a checkpoint needs",
                               "the cut-off checkpoint-2 was removed", f"complete and kept in {out}: checkpoints/checkpoint-1;",
                               "then run again with --resume-from-checkpoint last to continue from checkpoint-1.")
        assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]
        assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1"]
        assert _half_written_entries(out) == []


def test_a_disk_filling_up_while_the_adapter_is_saved_keeps_the_checkpoints_and_the_weights_in_the_cache(
        tmp_path, tiny_model_dir, small_jsonl, capsys, monkeypatch, one_torch_thread):
    """A real full disk while the adapter is saved (the tokenizer's or safetensors' Rust writer: "os error
    28"), after training: the line says the trained weights are in the cache, and the same command, once
    there is room, does not train again."""
    swap_in = saving._swap_in_directory

    def filling_first(target, *args, **kwargs):
        _fill(filesystem, 2**20)
        return swap_in(target, *args, **kwargs)

    monkeypatch.setattr(saving, "_swap_in_directory", filling_first)
    with small_filesystem(tmp_path / "fs", _FILESYSTEM_BYTES) as filesystem:
        out = filesystem / "out"
        argv = _tiny_run(out, tiny_model_dir, small_jsonl, tmp_path / "cache")
        assert cli.main(argv) == 2
        line = _error_line(capsys)
        failed = re.search(r"writing (\S+): ", line).group(1)
        assert Path(failed).parent == out / "adapter", line
        _assert_full_disk_line(line, failed, "the adapter needs about", f"complete and kept in {out}: ",
                               "checkpoints/checkpoint-2", f"then run again: the trained weights are in the cache "
                               f"{tmp_path / 'cache'}", "so the same command does not train again.")
        assert not (out / "adapter").exists() and _half_written_entries(out) == []

        monkeypatch.undo()
        (filesystem / "ballast").unlink()
        again = argv + (["--overwrite"] if "--overwrite" in line else [])
        assert cli.main(again) == 0
        assert "the trained weights came from it" in capsys.readouterr().out
        assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_full_disk_after_the_adapter_names_it_kept(tmp_path, tiny_model_dir, small_jsonl, capsys, monkeypatch,
                                                     one_torch_thread):
    """Injected (runs everywhere): the predictions meet a full disk once the adapter is saved."""
    write = saving.write_text_atomically

    def full_for_predictions(path, text):
        if Path(path).name != artifacts.PREDICTIONS_JSONL_FILE:
            return write(path, text)
        real_os, artifacts.os = artifacts.os, _FaultyOs(full_disk=True)
        try:
            return write(path, text)
        finally:
            artifacts.os = real_os

    monkeypatch.setattr(saving, "write_text_atomically", full_for_predictions)
    out = tmp_path / "out"
    assert cli.main(_tiny_run(out, tiny_model_dir, small_jsonl, tmp_path / "cache", "--no-cache")) == 2
    line = _error_line(capsys)
    _assert_full_disk_line(line, out / artifacts.PREDICTIONS_JSONL_FILE, "the file needs",
                           f"complete and kept in {out}: adapter, ")
    assert "cache" not in line.split("complete and kept")[1]  # --no-cache: nothing to reuse there
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and _half_written_entries(out) == []
    assert not (out / artifacts.PREDICTIONS_JSONL_FILE).exists()


def test_a_full_disk_injected_into_a_checkpoint_is_one_line_and_removes_it(
        tmp_path, tiny_model_dir, small_jsonl, capsys, monkeypatch, one_torch_thread):
    """Injected (runs everywhere): checkpoint-2's RNG state meets a full disk."""
    from transformers import Trainer

    save_rng_state = Trainer._save_rng_state

    def full_at_the_second(self, output_dir):
        if self.state.global_step == 2:
            _half_written(Path(output_dir) / "rng_state.pth")
        return save_rng_state(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", full_at_the_second)
    out = tmp_path / "out"
    assert cli.main(_tiny_run(out, tiny_model_dir, small_jsonl, tmp_path / "cache")) == 2
    checkpoints = out / "checkpoints"
    _assert_full_disk_line(_error_line(capsys), checkpoints / "checkpoint-2" / "rng_state.pth",
                           "the cut-off checkpoint-2 was removed", f"complete and kept in {out}: checkpoints/checkpoint-1;")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1"] and _half_written_entries(out) == []


# --- the GGUF writers on a real full disk ---------------------------------------------------------

def test_the_gguf_converter_on_a_full_disk_is_one_line_and_keeps_the_merged_model(tmp_path, saving_objects):
    from philo_dataflow.lib.gguf_export import converter_missing

    if converter_missing():
        pytest.skip(converter_missing())
    with small_filesystem(tmp_path / "fs", 12 * 2**20) as filesystem:  # the merged model (~10 MB) fits, its GGUF copy does not
        merged = _merged(saving_objects, filesystem)
        before = tree(filesystem / "merged")
        with pytest.raises(NoSpaceLeft) as raised:
            saving.saved_gguf_model(merged, "FROM ./model.gguf\n")
        _assert_full_disk_line(str(raised.value), filesystem / "merged" / "model.gguf", "the GGUF file needs about")
        assert tree(filesystem / "merged") == before


def test_the_quantizer_on_a_full_disk_is_one_line_though_it_names_no_errno(tmp_path, saving_objects):
    """llama.cpp's quantizer says only "basic_ios::clear: iostream error": the disk's free space tells."""
    from philo_dataflow.lib.gguf_export import convert_to_gguf, converter_missing

    if converter_missing():
        pytest.skip(converter_missing())
    source = tmp_path / "model.gguf"
    convert_to_gguf(Path(_merged(saving_objects, tmp_path)["merged_dir"]), source, "f32")
    with small_filesystem(tmp_path / "fs", source.stat().st_size + 2**20) as filesystem:  # the q8_0 copy does not fit
        shutil.copy(source, filesystem / "model.gguf")
        gguf = {"status": "ok", "gguf": str(filesystem / "model.gguf"), "bytes": source.stat().st_size}
        with pytest.raises(NoSpaceLeft) as raised:
            saving.saved_quantized_gguf_models(gguf, ["q8_0"])
        assert isinstance(raised.value.__cause__, GGUFConversionError)
        _assert_full_disk_line(str(raised.value), filesystem / "model.q8_0.gguf", "the q8_0 copy needs about")
        assert sorted(p.name for p in filesystem.iterdir()) == ["model.gguf"]
