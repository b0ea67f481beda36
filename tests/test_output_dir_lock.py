"""One run per output directory (issue 34, item 2): a run holds an OS-level lock on its ``output_dir`` for its
whole life (``lib.artifacts.output_dir_lock``); a second run, an export or a comparison into it is refused
at once with one line naming the holder, and a killed holder leaves no stale lock."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import FAST_INPUTS, REPO, cli_flags

from philo_dataflow import cli
from philo_dataflow.lib.artifacts import output_dir_lock, output_dir_lock_holder
from philo_dataflow.testing import example_subset


def _holder_pid(out: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    """Waits until ``process`` holds the lock on ``out`` (the kernel's lock table says so)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if out.is_dir() and (output_dir_lock_holder(str(out)) or "").startswith(f"pid {process.pid}:"):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    raise AssertionError("the first run never took the lock")


def test_a_second_run_export_or_comparison_into_a_running_runs_directory_is_refused(
        tiny_model_dir, tiny_run_dir, tmp_path, capsys):
    data = example_subset(tmp_path / "data.jsonl", 10, ("Stoicism", "Taoism", "Hedonism"))
    out = tmp_path / "out"
    # Long enough (a tiny model, many steps) that the refusals below all happen while it trains.
    flags = [*cli_flags({**FAST_INPUTS, "max_steps": 400, "eval_steps": 200}), "--data-path", data,
             "--model-id", tiny_model_dir, "--output-dir", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "philo_dataflow", *flags], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        _holder_pid(out, first)
        assert cli.main([*flags, "--overwrite"]) == 2
        errors = capsys.readouterr().err.splitlines()
        assert len(errors) == 1 and errors[0].startswith(f"error: --output-dir {out}: another run is writing there "
                                                         f"(pid {first.pid}: "), errors
        assert "wait for it to end, or give another --output-dir" in errors[0]
        assert cli.main(["compare", tiny_run_dir, "--output-dir", str(out), "--overwrite"]) == 2
        assert f"error: --output-dir {out}: another run is writing there (pid {first.pid}: " in capsys.readouterr().err
        assert cli.main(["export", "--model-dir", str(Path(tiny_run_dir) / "adapter"), "--output-dir", str(out)]) == 2
        assert f"another run is writing there (pid {first.pid}: " in capsys.readouterr().err
        assert first.poll() is None, "the first run ended before the refusals: make it longer"
        assert not (out / "comparison.json").exists() and not (out / "merged").exists()
    finally:
        printed, _ = first.communicate(timeout=600)
    assert first.returncode == 0, printed[-3000:]
    assert (out / "metrics.json").is_file() and "philo_dataflow finished" in printed
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no lock file, nothing left over
    assert output_dir_lock_holder(str(out)) is None
    with output_dir_lock(str(out)):  # released when the run ended
        assert output_dir_lock_holder(str(out)).startswith(f"pid {os.getpid()}:")


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom philo_dataflow.lib.artifacts import output_dir_lock\n"
        f"with output_dir_lock({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(300)\n")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        try:
            with output_dir_lock(str(out)):
                raise AssertionError("the lock was taken twice")
        except ValueError as error:
            assert f"(pid {holder.pid}: " in str(error) and "\n" not in str(error)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert output_dir_lock_holder(str(out)) is None  # the lock went with the process
    with output_dir_lock(str(out)):
        assert output_dir_lock_holder(str(out)).startswith(f"pid {os.getpid()}:")
