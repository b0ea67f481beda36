"""run.py as a user runs it: one real run of the embedded SmolLM2-135M-Instruct with a handful of steps,
its presaved re-evaluation, and one-line errors for user mistakes."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from conftest import REPO

from philo_dataflow.testing import example_subset


def _run(*args: str, cwd: Path = REPO, env: Optional[dict] = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """``run.py`` with ``args`` in a child process, as a user runs it; its output captured."""
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory, embedded_model_dir):
    """Three optimizer steps of the embedded model on 45 example records (5 per school)."""
    work = tmp_path_factory.mktemp("embedded")
    data = Path(example_subset(work / "data.jsonl", 5))
    out = work / "out"
    process = _run("--data-path", str(data), "--output-dir", str(out), "--max-steps", "3", "--eval-steps", "1",
                   "--logging-steps", "1", "--max-new-tokens", "12", "--hold-out-fraction", "0.2",
                   "--validation-fraction", "0.2")
    assert process.returncode == 0, process.stderr[-3000:]
    return {"work": work, "out": out, "data": data, "stdout": process.stdout}


@pytest.mark.slow
def test_embedded_model_run_writes_every_output(embedded_run):
    out = embedded_run["out"]
    for name in ("metrics.json", "hold_out_predictions.jsonl", "hold_out_predictions.csv", "report.html",
                 "report.md", "dataflow.png", "adapter/adapter_model.safetensors",
                 "adapter/philo_dataflow_manifest.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_id"] == "embedded:SmolLM2-135M-Instruct"
    assert metrics["validation"]["global_step"] == 3
    assert metrics["model_summary"]["total_parameters"] > 100_000_000  # the real 135M model, not a toy
    assert metrics["splits"]["hold_out_set"]["total"] == 9  # one per school at 20% of 5
    assert set(metrics["splits"]["hold_out_set"]["per_category"]) == {
        "Buddhism", "Existentialism", "Hedonism", "Hinduism", "Nihilism", "Rationalism", "Stoicism", "Taoism",
        "Utilitarianism"}
    rows = [json.loads(line) for line in (out / "hold_out_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and all(r["base_prediction"] and r["finetuned_prediction"] for r in rows)
    assert "ROUGE-L" in embedded_run["stdout"] and "LLM judge" in embedded_run["stdout"]


@pytest.mark.slow
def test_presaved_cli_reproduces_predictions(embedded_run):
    again = embedded_run["work"] / "again"
    process = _run("--start", "presaved", "--presaved-model-dir", str(embedded_run["out"] / "adapter"),
                   "--output-dir", str(again), "--no-graph")
    assert process.returncode == 0, process.stderr[-3000:]
    first = (embedded_run["out"] / "hold_out_predictions.jsonl").read_text()
    assert (again / "hold_out_predictions.jsonl").read_text() == first


@pytest.mark.slow
def test_refuses_to_overwrite_a_previous_run(embedded_run):
    before = (embedded_run["out"] / "metrics.json").read_bytes()
    process = _run("--data-path", str(embedded_run["data"]), "--output-dir", str(embedded_run["out"]))
    assert process.returncode == 2
    assert "holds another run's files" in process.stderr and "Traceback" not in process.stderr
    assert (embedded_run["out"] / "metrics.json").read_bytes() == before


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"question": "q", "answer": "a"}]', "record 0 has no key 'instruction'"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_data_is_one_line_error_with_exit_code_2(tmp_path, content, message):
    data = tmp_path / "bad.json"
    data.write_text(content)
    process = _run("--data-path", str(data), "--output-dir", str(tmp_path / "out"), "--no-graph")
    assert process.returncode == 2
    last_line = process.stderr.strip().splitlines()[-1]  # progress bars come before it
    assert last_line.startswith("error: ") and message in last_line and str(data) in last_line
    assert "Traceback" not in process.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_torch_compile_without_a_compiler_is_one_line_error_with_exit_code_2(tmp_path):
    """``--torch-compile`` where inductor finds no C++ compiler ($CXX pointing nowhere, an empty compiler
    cache): refused by the preflight, before anything is loaded or written."""
    import os

    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    process = _run("--torch-compile", "--output-dir", str(tmp_path / "out"), "--no-graph", env=env, timeout=300)
    assert process.returncode == 2
    last_line = process.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: torch_compile=True, but torch.compile cannot build code on this cpu")
    assert "--no-torch-compile" in last_line and "Traceback" not in process.stderr
    assert not (tmp_path / "out").exists()


def test_help_documents_every_hyperparameter():
    process = _run("--help")
    assert process.returncode == 0
    for flag in ("--lora-r", "--learning-rate", "--num-train-epochs", "--max-seq-length", "--max-new-tokens",
                 "--early-stopping-patience", "--validation-fraction", "--hold-out-fraction", "--seed",
                 "--start", "--presaved-model-dir", "--visualize", "--load-in-4bit", "--torch-compile"):
        assert flag in process.stdout, flag


def test_a_presaved_run_decodes_as_its_base_run_did(tmp_path):
    """The generation settings are manifest inputs: re-evaluating a sampled run samples the same way (and,
    seeded, gives its answers again), unless a flag says otherwise."""
    from philo_dataflow.cli import job as run
    from philo_dataflow.lib.artifacts import MANIFEST_FILE
    from philo_dataflow.lib.generation import GREEDY

    sampled = {**GREEDY, "do_sample": True, "temperature": 0.7, "top_p": 0.7}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / MANIFEST_FILE).write_text(json.dumps({"inputs": {"model_id": "m", "max_new_tokens": 48, **sampled},
                                                      "prompt_format": "chat_template"}))
    inputs = run.run_inputs("presaved", {"presaved_model_dir": str(adapter)})
    assert {name: inputs[name] for name in sampled} == sampled and inputs["max_new_tokens"] == 48
    assert run.run_inputs("presaved", {"presaved_model_dir": str(adapter), "do_sample": False})["do_sample"] is False
