"""Experiment tracking (``report_to``, ``tracking``): a tiny run reporting to TensorBoard, its event files
read back offline (the Trainer's loss curve, the final metrics at the last step), the judge's values, and
a run with ``report_to="none"`` writing no event files; a tiny run reporting to a real MLflow store (SQLite,
``MLFLOW_TRACKING_URI``) read back with ``MlflowClient``. That one process of several writes them is
tested in ``test_distributed``."""

import json
import math
from pathlib import Path

import pytest
from conftest import FAST_INPUTS, example_subset
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import TrainingArguments

import philo_dataflow
from philo_dataflow.lib.artifacts import ADAPTER_DIR, CHECKPOINTS_DIR, LOG_HISTORY_FILE, METRICS_FILE
from philo_dataflow.lib.judge_protocol import CRITERIA
from philo_dataflow.lib.trackers import RUNS_DIR, TENSORBOARD_DIR_VARIABLE, final_metrics
from philo_dataflow.stages.tracking import tracked_final_metrics


def _scalars(directory: Path) -> dict:
    """``{tag: [(step, value), ...]}`` of every scalar in the event files of ``directory``."""
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory, tiny_model_dir) -> dict:
    """A tiny LoRA run with ``report_to="tensorboard"``: its output_dir and ``dr.execute``'s results."""
    work = tmp_path_factory.mktemp("tracking-run")
    data = example_subset(work / "small.jsonl", 10, ("Stoicism", "Taoism", "Hedonism"))
    inputs = {**FAST_INPUTS, "data_path": data, "model_id": tiny_model_dir, "output_dir": str(work / "out"),
              "max_steps": 4, "report_to": "tensorboard"}
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.delenv(TENSORBOARD_DIR_VARIABLE, raising=False)  # the run sets it; undone afterwards
        results = philo_dataflow.build_driver({"start": "base"}).execute(
            list(philo_dataflow.DEFAULT_OUTPUTS), inputs=inputs)
    return {"output_dir": work / "out", "results": results}


def test_training_loss_in_tensorboard_is_the_trainers_log_history(tensorboard_run):
    out = tensorboard_run["output_dir"]
    assert not (out / CHECKPOINTS_DIR / RUNS_DIR).exists()  # not transformers' default place
    scalars = _scalars(out / RUNS_DIR)
    history = json.loads((out / ADAPTER_DIR / LOG_HISTORY_FILE).read_text(encoding="utf-8"))
    losses = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    assert len(losses) == 4  # logging_steps=1, max_steps=4
    assert [step for step, _ in scalars["train/loss"]] == [step for step, _ in losses]
    for (_, logged), (_, expected) in zip(scalars["train/loss"], losses):
        assert logged == pytest.approx(expected, rel=1e-6)  # event files hold float32
    evaluations = [(entry["step"], entry["eval_loss"]) for entry in history if "eval_loss" in entry]
    assert [step for step, _ in scalars["eval/loss"]][:len(evaluations)] == [step for step, _ in evaluations]


def test_final_metrics_in_tensorboard_are_metrics_json(tensorboard_run):
    out = tensorboard_run["output_dir"]
    metrics = json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
    scalars = _scalars(out / RUNS_DIR)
    last_step = metrics["validation"]["global_step"]
    assert last_step == 4
    expected = {
        "final/hold_out/finetuned/rougeL": metrics["hold_out"]["finetuned"]["rougeL"],
        "final/hold_out/base/rougeL": metrics["hold_out"]["base"]["rougeL"],
        "final/hold_out/finetuned/eos_stop_rate": metrics["hold_out"]["finetuned"]["eos_stop_rate"],
        "final/hold_out/finetuned/loop_rate": metrics["hold_out"]["finetuned"]["loop_rate"],
        "final/validation/eval_loss": metrics["validation"]["eval_loss"],
    }
    for tag, value in expected.items():
        (step, logged), = scalars[tag]
        assert step == last_step and logged == pytest.approx(value, rel=1e-6, abs=1e-9), tag
    assert not any(tag.startswith("final/judge/") for tag in scalars)  # the judge did not run
    logged = tensorboard_run["results"]["tracked_final_metrics"]
    assert list(logged) == ["tensorboard"]
    assert logged["tensorboard"] == final_metrics(metrics)
    assert {tag for tag in scalars if tag.startswith("final/")} == set(logged["tensorboard"])


def _judged(metrics: dict) -> dict:
    scores = {model: {criterion: 3.0 + index for index, criterion in enumerate(CRITERIA)}
              for model in ("base", "finetuned", "finetuned_minus_base")}
    scores["base"][CRITERIA[0]] = float("nan")  # a mean over zero judgments
    pairwise = {"win_rate": 0.5, "tie_rate": 0.25, "loss_rate": 0.25, "position_consistency": 0.75}
    return {**metrics, "judge": {"rubric": scores, "pairwise": pairwise}}


def test_judge_values_and_custom_directory(tensorboard_run, tmp_path):
    out = tensorboard_run["output_dir"]
    metrics = _judged(json.loads((out / METRICS_FILE).read_text(encoding="utf-8")))
    args = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), report_to=["tensorboard"], use_cpu=True)
    logged = tracked_final_metrics(metrics, args, [], run_manifest={}, save_best_models={"adapter_dir": str(out)},
                                   saved_metrics={"path": ""}, saved_report={"path": ""},
                                   saved_report_html={"path": ""}, output_dir=str(tmp_path),
                                   tracking_dir=str(tmp_path / "tb"))
    values = logged["tensorboard"]
    assert values[f"final/judge/rubric/finetuned/{CRITERIA[1]}"] == 4.0
    assert values["final/judge/pairwise/win_rate"] == 0.5
    assert f"final/judge/rubric/base/{CRITERIA[0]}" not in values  # NaN is left out
    assert all(math.isfinite(value) for value in values.values())
    scalars = _scalars(tmp_path / "tb")
    assert scalars["final/judge/pairwise/position_consistency"] == [(metrics["validation"]["global_step"], 0.75)]
    assert not (tmp_path / RUNS_DIR).exists()


def test_report_to_none_writes_no_event_files(tiny_run_dir):
    out = Path(tiny_run_dir)
    assert (out / METRICS_FILE).exists()
    assert not (out / RUNS_DIR).exists() and not (out / CHECKPOINTS_DIR / RUNS_DIR).exists()
    assert not list(out.rglob("events.out.tfevents.*"))


MLFLOW_EXPERIMENT = "philo-dataflow-test"


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory, tiny_model_dir) -> dict:
    """A tiny LoRA run with ``report_to="mlflow"`` into a SQLite tracking store of its own, the store's
    artifacts in the test's directory: the run's output_dir, its MLflow run id and the store's client."""
    import mlflow

    work = tmp_path_factory.mktemp("mlflow-run")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment(MLFLOW_EXPERIMENT, artifact_location=(work / "artifacts").as_uri())
    data = example_subset(work / "small.jsonl", 10, ("Stoicism", "Taoism", "Hedonism"))
    inputs = {**FAST_INPUTS, "data_path": data, "model_id": tiny_model_dir, "output_dir": str(work / "out"),
              "max_steps": 4, "report_to": "mlflow"}
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # read by the Trainer's MLflowCallback
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", MLFLOW_EXPERIMENT)
        results = philo_dataflow.build_driver({"start": "base"}).execute(
            list(philo_dataflow.DEFAULT_OUTPUTS), inputs=inputs)
        mlflow.set_tracking_uri(None)  # the callback set it for the whole process
    (run,) = client.search_runs([experiment])  # one run: training, the evaluation and the final metrics
    return {"output_dir": work / "out", "run": run, "client": client, "results": results, "work": work}


def test_mlflow_holds_the_trainers_loss_and_learning_rate_per_step(mlflow_run):
    assert mlflow_run["run"].info.status == "FINISHED"
    client, run_id = mlflow_run["client"], mlflow_run["run"].info.run_id
    history = json.loads((mlflow_run["output_dir"] / ADAPTER_DIR / LOG_HISTORY_FILE).read_text(encoding="utf-8"))
    for name in ("loss", "learning_rate"):
        expected = [(entry["step"], entry[name]) for entry in history if name in entry and "eval_loss" not in entry]
        logged = sorted((metric.step, metric.value) for metric in client.get_metric_history(run_id, name))
        assert len(expected) == 4 and [step for step, _ in logged] == [step for step, _ in expected], name
        for (_, value), (_, wanted) in zip(logged, expected):
            assert value == pytest.approx(wanted, rel=1e-6), name


def test_mlflow_holds_the_verdict_the_configuration_and_the_files(mlflow_run):
    client, run = mlflow_run["client"], mlflow_run["run"]
    out = mlflow_run["output_dir"]
    metrics = json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
    logged = run.data.metrics
    hold_out = metrics["hold_out"]
    assert logged["final/hold_out/base/rougeL"] == pytest.approx(hold_out["base"]["rougeL"])
    assert logged["final/hold_out/finetuned/rougeL"] == pytest.approx(hold_out["finetuned"]["rougeL"])
    for name in ("mean", "ci95_low", "ci95_high"):
        assert logged[f"final/hold_out/rougeL_difference/{name}"] == pytest.approx(hold_out["rougeL_difference"][name])
    for model in ("base", "finetuned"):
        for name in ("eos_stop_rate", "loop_rate"):
            assert logged[f"final/hold_out/{model}/{name}"] == pytest.approx(hold_out[model][name])
    assert mlflow_run["results"]["tracked_final_metrics"]["mlflow"] == final_metrics(metrics)

    params = run.data.params
    manifest = json.loads((out / ADAPTER_DIR / "philo_dataflow_manifest.json").read_text(encoding="utf-8"))
    assert params["philo_dataflow/inputs/seed"] == str(manifest["inputs"]["seed"])
    assert params["philo_dataflow/inputs/data_path"] == manifest["inputs"]["data_path"]
    assert params["philo_dataflow/finetuning_method"] == "lora"
    assert params["philo_dataflow/lora_config/r"] == str(manifest["lora_config"]["r"])
    assert params["learning_rate"] == str(FAST_INPUTS.get("learning_rate", 5e-4))  # the Trainer's own

    root = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {METRICS_FILE, "report.md", "report.html", ADAPTER_DIR} <= root
    adapter = {Path(artifact.path).name for artifact in client.list_artifacts(run.info.run_id, ADAPTER_DIR)}
    assert {"adapter_model.safetensors", "adapter_config.json", LOG_HISTORY_FILE} <= adapter
    downloaded = client.download_artifacts(run.info.run_id, METRICS_FILE, str(mlflow_run["work"] / "download"))
    assert Path(downloaded).read_bytes() == (out / METRICS_FILE).read_bytes()
