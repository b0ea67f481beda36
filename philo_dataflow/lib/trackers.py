"""The experiment trackers behind ``report_to``: the trackers a value names, where TensorBoard's event files
go, a run's final metrics as flat scalars, and the writers that log them to TensorBoard, MLflow and W&B
(the Trainer logs the training curves there itself). Imports ``inputs``, ``scores`` and ``judge_protocol``.
"""

import math
import os
from pathlib import Path
from typing import Optional

from transformers.integrations.integration_utils import get_available_reporting_integrations

from .inputs import tracker_names
from .judge_protocol import CRITERIA
from .scores import MODELS

#: The TensorBoard event files' directory under ``output_dir`` when ``tracking_dir`` is unset.
RUNS_DIR = "runs"
#: The environment variable transformers' ``TensorBoardCallback`` reads its directory from.
TENSORBOARD_DIR_VARIABLE = "TENSORBOARD_LOGGING_DIR"
#: The trackers ``log_final_metrics`` writes to; the Trainer alone reports to the others.
FINAL_METRICS_TRACKERS = ("tensorboard", "mlflow", "wandb")
#: Prefix of every final-metric name, e.g. ``final/hold_out/finetuned/rougeL``.
FINAL_PREFIX = "final"
_PAIRWISE_RATES = ("win_rate", "tie_rate", "loss_rate", "position_consistency")


def reported_trackers(report_to: str) -> list:
    """The trackers the Trainer reports to for ``report_to`` (``tracker_names``), with ``all`` resolved to
    the installed ones as transformers resolves it; ``[]`` for ``none``."""
    names = tracker_names(report_to)
    return list(get_available_reporting_integrations()) if names == ["all"] else names


def tensorboard_dir(output_dir: str = "outputs", tracking_dir: Optional[str] = None) -> Path:
    """Where TensorBoard's event files go: ``tracking_dir``, else ``<output_dir>/runs``."""
    return Path(tracking_dir) if tracking_dir else Path(output_dir) / RUNS_DIR


def direct_tensorboard_to(directory: Path) -> None:
    """Makes the ``TensorBoardCallback`` of every Trainer built afterwards in this process write its event
    files straight into ``directory`` (no per-run subdirectory). transformers 5 has no ``logging_dir``
    argument: the callback reads the environment variable ``TENSORBOARD_LOGGING_DIR`` when the Trainer is
    built, so this sets it for the whole process."""
    os.environ[TENSORBOARD_DIR_VARIABLE] = str(directory)


def _scalar(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def final_metrics(run_metrics: dict) -> dict:
    """A run's final metrics as ``{name: value}`` scalars, from ``report.run_metrics`` (``metrics.json``):

    - ``final/hold_out/{base,finetuned}/{name}``: every number of a model's hold-out summary but ``count``
      (``rouge1`` ... ``rougeLsum`` F-measures 0–1, ``eos_stop_rate`` and ``loop_rate`` shares 0–1,
      ``distinct_1``/``distinct_2``, ``mean_answer_words`` in words, ``mean_new_tokens`` in tokens);
    - ``final/hold_out/rougeL_difference/{mean,ci95_low,ci95_high}`` (fine-tuned minus base);
    - ``final/validation/eval_loss`` (mean cross-entropy per supervised token, nats);
    - when the judge ran: ``final/judge/rubric/{base,finetuned,finetuned_minus_base}/{criterion}`` (mean
      score 1–5, or its difference) and ``final/judge/pairwise/{win_rate,tie_rate,loss_rate,
      position_consistency}`` (shares 0–1 for the fine-tuned model).

    Values that are not finite numbers (a mean over zero judgments is NaN) are left out.
    """
    hold_out = run_metrics["hold_out"]
    values = {}
    for model in MODELS:
        for name, value in hold_out[model].items():
            if name != "count":
                values[f"{FINAL_PREFIX}/hold_out/{model}/{name}"] = value
    for name, value in hold_out["rougeL_difference"].items():
        values[f"{FINAL_PREFIX}/hold_out/rougeL_difference/{name}"] = value
    values[f"{FINAL_PREFIX}/validation/eval_loss"] = run_metrics["validation"].get("eval_loss")
    judge = run_metrics.get("judge")
    if judge is not None:
        for model in (*MODELS, "finetuned_minus_base"):
            for criterion in CRITERIA:
                values[f"{FINAL_PREFIX}/judge/rubric/{model}/{criterion}"] = judge["rubric"][model][criterion]
        for name in _PAIRWISE_RATES:
            values[f"{FINAL_PREFIX}/judge/pairwise/{name}"] = judge["pairwise"][name]
    return {name: _scalar(value) for name, value in values.items() if _scalar(value) is not None}


def final_step(run_metrics: dict, log_history: list) -> int:
    """The optimizer step the final metrics are logged at: the training's last step (``global_step`` of
    the validation metrics), else the last step in the Trainer's log history (a presaved run), else 0."""
    step = run_metrics["validation"].get("global_step")
    if step is None:
        step = max((entry["step"] for entry in log_history if "step" in entry), default=0)
    return int(step)


def log_to_tensorboard(directory: Path, values: dict, step: int) -> None:
    """Writes ``values`` as scalars at ``step`` into a new event file in ``directory`` (beside the
    Trainer's).

    :raises ImportError: tensorboard is not installed.
    """
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(directory))
    try:
        for name, value in values.items():
            writer.add_scalar(name, value, global_step=step)
    finally:
        writer.close()


def log_to_mlflow(values: dict, step: int, run_name: Optional[str] = None) -> None:
    """Logs ``values`` at ``step`` to MLflow (tracking URI from ``MLFLOW_TRACKING_URI``, as the Trainer's
    callback): into the active run, else the last run of this process (the Trainer's callback ends its
    run when training ends), else a new run named ``run_name``.

    :raises ImportError: mlflow is not installed.
    """
    import mlflow

    run = mlflow.active_run() or mlflow.last_active_run()
    if run is None:
        with mlflow.start_run(run_name=run_name):
            mlflow.log_metrics(values, step=step)
        return
    client = mlflow.MlflowClient()
    for name, value in values.items():
        client.log_metric(run.info.run_id, name, value, step=step)


def log_to_wandb(values: dict, step: int, run_name: Optional[str] = None) -> None:
    """Logs ``values`` to W&B at ``train/global_step`` = ``step`` (the step metric of the Trainer's
    callback) and into the run summary: the run the Trainer's callback left open, else a new run named
    ``run_name``, finished afterwards.

    :raises ImportError: wandb is not installed.
    """
    import wandb

    run = wandb.run
    started = run is None
    if started:
        run = wandb.init(name=run_name)
    try:
        run.log({**values, "train/global_step": step})
        run.summary.update(values)
    finally:
        if started:
            run.finish()


_WRITERS = {"mlflow": log_to_mlflow, "wandb": log_to_wandb}


def log_final_metrics(trackers: list, values: dict, step: int, directory: Path,
                      run_name: Optional[str] = None) -> dict:
    """Logs ``values`` at ``step`` to each of ``trackers`` among ``FINAL_METRICS_TRACKERS`` (TensorBoard into
    ``directory``); the others are skipped.

    :return: ``{tracker: values}`` of the trackers logged to.
    :raises ImportError: a tracker's package is not installed.
    """
    logged = {}
    for tracker in trackers:
        if tracker == "tensorboard":
            log_to_tensorboard(directory, values, step)
        elif tracker in _WRITERS:
            _WRITERS[tracker](values, step, run_name)
        else:
            continue
        logged[tracker] = dict(values)
    return logged
