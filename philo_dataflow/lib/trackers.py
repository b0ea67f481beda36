"""The experiment trackers behind ``report_to``: the trackers a value names, where TensorBoard's event files
go, a run's final metrics as flat scalars, and the writers that log them to TensorBoard, MLflow and W&B
(the Trainer logs the training curves there itself). Imports ``inputs``, ``scores`` and ``judge_protocol``.
"""

import importlib.util
import json
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


#: The package each tracker needs, and how to install it when it is not a plain ``pip install NAME``.
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "pip install 'philo_dataflow[tensorboard]'"),
                    "mlflow": ("mlflow", "pip install 'philo_dataflow[mlflow]'")}


def missing_tracker_problems(report_to: str) -> list[str]:
    """One line per tracker ``report_to`` names whose package is not installed (``none`` and ``all``: none),
    naming the flag and the install command.
    """
    names = tracker_names(report_to)
    lines = []
    for name in [] if names == ["all"] else names:
        package, install = TRACKER_PACKAGES.get(name, (name, f"pip install {name}"))
        if importlib.util.find_spec(package) is None:
            lines.append(f"report_to={report_to!r} (--report-to): {name} is not installed; {install}, or leave "
                         f"{name} out.")
    return lines


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
    - ``final/hold_out/rougeL_outcomes/{wins,ties,losses}`` (questions, ``lib.scores.per_question_outcomes``);
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
    for name in ("wins", "ties", "losses"):
        values[f"{FINAL_PREFIX}/hold_out/rougeL_outcomes/{name}"] = hold_out["rougeL_outcomes"][name]
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


#: Prefix of the run parameters the run's configuration is logged under in MLflow, beside the Trainer's own
#: (its arguments and the model's config, logged by transformers' ``MLflowCallback``).
PARAM_PREFIX = "philo_dataflow"
#: The longest parameter value MLflow stores (``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``); longer
#: values (a long ``prompt_template``) are cut to it, ending on "...".
MLFLOW_PARAM_LIMIT = 6000
#: Parameters per ``log_batch`` call (MLflow's limit, ``MAX_PARAMS_TAGS_PER_BATCH``).
_MLFLOW_BATCH = 100
#: Holds the id of the MLflow run ``start_mlflow_run`` started, so that ``log_to_mlflow`` ends that run and
#: never one its caller started.
MLFLOW_RUN_VARIABLE = "PHILO_DATAFLOW_MLFLOW_RUN_ID"


def start_mlflow_run(run_name: Optional[str] = None) -> None:
    """Starts the job's MLflow run unless one is active (a caller's own, which is then used): the Trainers
    built afterwards (training, then the evaluation of the kept checkpoint) find it active and log into it,
    where transformers' ``MLflowCallback`` would start a run per Trainer and end it when training ends.
    The store and experiment are MLflow's usual environment variables (``MLFLOW_TRACKING_URI``,
    ``MLFLOW_EXPERIMENT_NAME``).

    :raises ImportError: mlflow is not installed.
    """
    import mlflow

    if mlflow.active_run() is None:
        os.environ[MLFLOW_RUN_VARIABLE] = mlflow.start_run(run_name=run_name).info.run_id


def run_params(run_manifest: dict) -> dict:
    """The run's resolved configuration as flat MLflow parameters ``{"philo_dataflow/inputs/seed": "42",
    ...}``: every entry of ``run_manifest`` (``saving.run_manifest``: the inputs, the config switches, the
    prompt format and template, the LoRA configuration, the data's sha256, the library versions), nested
    keys joined with ``/``, values as text; ``training_args`` is left out (the Trainer's callback logs it)."""
    params = {}

    def add(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                add(f"{prefix}/{key}", item)
            return
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        params[prefix] = text if len(text) <= MLFLOW_PARAM_LIMIT else text[: MLFLOW_PARAM_LIMIT - 3] + "..."

    for key, value in run_manifest.items():
        if key != "training_args":
            add(f"{PARAM_PREFIX}/{key}", value)
    return params


def log_to_mlflow(values: dict, step: int, run_name: Optional[str] = None, params: Optional[dict] = None,
                  artifacts: Optional[dict] = None) -> None:
    """Logs ``values`` as metrics at ``step``, ``params`` as run parameters and ``artifacts`` (local path ->
    artifact folder, ``""`` for the run's root; a directory is logged with everything in it) to MLflow: into
    the active run (``start_mlflow_run``'s, which is then ended), else the last run of this process, else a
    new run named ``run_name``. The store is the one ``MLFLOW_TRACKING_URI`` names (a ``sqlite:///...``
    file here), as for the Trainer's callback.

    :raises ImportError: mlflow is not installed.
    """
    import time

    import mlflow
    from mlflow.entities import Metric, Param

    run = mlflow.active_run() or mlflow.last_active_run()
    started = run is None
    if started:
        run = mlflow.start_run(run_name=run_name)
    try:
        client, run_id = mlflow.MlflowClient(), run.info.run_id
        timestamp = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(name, value, timestamp, step) for name, value in values.items()])
        pairs = [Param(name, value) for name, value in (params or {}).items()]
        for start in range(0, len(pairs), _MLFLOW_BATCH):
            client.log_batch(run_id, params=pairs[start:start + _MLFLOW_BATCH])
        for path, folder in (artifacts or {}).items():
            if Path(path).is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=folder or None)
            else:
                client.log_artifact(run_id, str(path), artifact_path=folder or None)
    finally:
        if started or os.environ.get(MLFLOW_RUN_VARIABLE) == run.info.run_id:
            os.environ.pop(MLFLOW_RUN_VARIABLE, None)
            mlflow.end_run()


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


def log_final_metrics(trackers: list, values: dict, step: int, directory: Path,
                      run_name: Optional[str] = None, params: Optional[dict] = None,
                      artifacts: Optional[dict] = None) -> dict:
    """Logs ``values`` at ``step`` to each of ``trackers`` among ``FINAL_METRICS_TRACKERS`` (TensorBoard into
    ``directory``); the others are skipped. MLflow also gets ``params`` (``run_params``) and ``artifacts``
    (see ``log_to_mlflow``).

    :return: ``{tracker: values}`` of the trackers logged to.
    :raises ImportError: a tracker's package is not installed.
    """
    logged = {}
    for tracker in trackers:
        if tracker == "tensorboard":
            log_to_tensorboard(directory, values, step)
        elif tracker == "mlflow":
            log_to_mlflow(values, step, run_name, params, artifacts)
        elif tracker == "wandb":
            log_to_wandb(values, step, run_name)
        else:
            continue
        logged[tracker] = dict(values)
    return logged
