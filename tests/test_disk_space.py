"""The disk-space estimate against what a run wrote, and a full disk told apart from other write errors.
Full disks met by whole runs and by each writer are in tests/test_fault_injection.py; the preflight's
refusals in the bad-input corpus."""

import errno
import json
import shutil
from pathlib import Path

import pytest
from conftest import FAST_INPUTS

from philo_dataflow import preflight
from philo_dataflow.lib.disk_space import NoSpaceLeft, is_out_of_space
from philo_dataflow.lib.inputs import DEFAULTS

#: Largest relative difference between an estimated and a written size: the estimate leaves out the few
#: kB of configs, scheduler, RNG and trainer state.
TOLERANCE = 0.03


def _bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def test_the_estimate_is_what_a_tiny_run_wrote(tiny_run_dir, tiny_model_dir):
    out = Path(tiny_run_dir)
    values = {**DEFAULTS, **FAST_INPUTS, "data_path": str(out.parent / "small.jsonl"), "model_id": tiny_model_dir,
              "output_dir": tiny_run_dir, "max_steps": 4}  # the inputs of conftest's tiny_run_dir
    problems, found = preflight.data_problems(values, set())
    assert problems == []
    estimate = preflight.estimated_output_bytes(values, "base", found)

    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and estimate["checkpoints_at_peak"] == 3  # 4 saves: 2 kept, a third while saving
    for checkpoint in checkpoints:
        assert _bytes(checkpoint) == pytest.approx(estimate["checkpoint"], rel=TOLERANCE), checkpoint.name
    written_adapter = _bytes(out / "adapter") - sum(
        (out / "adapter" / name).stat().st_size for name in ("philo_dataflow_manifest.json", "README.md",
                                                             "training_log_history.json"))
    assert written_adapter == pytest.approx(estimate["adapter"], rel=TOLERANCE)
    assert estimate["saved"] == "adapter"
    page = (out / "report.html").stat().st_size
    assert estimate["page"] <= page <= 1.2 * estimate["page"]
    written = _bytes(out) - _bytes(out / "checkpoints")
    assert estimate["total"] == pytest.approx(max(3 * estimate["checkpoint"], 2 * estimate["checkpoint"] + written),
                                              rel=TOLERANCE)


def test_full_fine_tuning_is_estimated_with_every_weight(tiny_run_dir, tiny_model_dir):
    out = Path(tiny_run_dir)
    values = {**DEFAULTS, **FAST_INPUTS, "data_path": str(out.parent / "small.jsonl"), "model_id": tiny_model_dir,
              "output_dir": tiny_run_dir, "max_steps": 4}
    found = preflight.data_problems(values, set())[1]
    lora, full = (preflight.estimated_output_bytes(values, "base", found, method) for method in ("lora", "full"))
    weights = (Path(tiny_model_dir) / "model.safetensors").stat().st_size
    tokenizer = (Path(tiny_model_dir) / "tokenizer.json").stat().st_size
    assert full["saved"] == "fine-tuned model"
    assert full["adapter"] == pytest.approx(weights + tokenizer, rel=TOLERANCE)
    assert full["checkpoint"] == pytest.approx(3 * weights + tokenizer, rel=TOLERANCE)  # + AdamW's two moments
    assert lora["checkpoint"] < full["checkpoint"] / 2


def test_a_full_disk_is_told_apart_from_other_write_errors(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    assert is_out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert is_out_of_space(Exception("No space left on device (os error 28)"))  # tokenizers' Rust error
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_out_of_space(wrapped)
    assert not is_out_of_space(OSError(errno.EIO, "Input/output error"), tmp_path, free + 1)
    assert not is_out_of_space(ValueError("bad value"), tmp_path, free + 1)
    # torch.save says nothing of the cause: the disk's free space tells.
    silent = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert not is_out_of_space(silent) and not is_out_of_space(silent, tmp_path, 1000)
    assert is_out_of_space(silent, tmp_path, free + 10**9)


def test_a_no_space_line_names_the_file_the_bytes_and_what_to_do():
    error = NoSpaceLeft("out/adapter/tokenizer.json", 3_596_641, 1_048_576, "the adapter", "done this",
                        " with --flag")
    assert str(error) == ("no space left on device writing out/adapter/tokenizer.json: the adapter needs about "
                          "3,596,641 bytes (3.6 MB), and 1,048,576 bytes (1.0 MB) are free on its filesystem; done "
                          "this; once there is room, run again with --flag.")
    assert isinstance(error, ValueError) and json.dumps(str(error)).count("\\n") == 0
