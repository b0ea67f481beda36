"""Tracking: the run's final metrics (hold-out ROUGE, EOS-stop and loop rates, validation loss, and the
judge's rubric means and pairwise rates when it ran) logged to the experiment trackers of ``report_to``,
beside the training curves the Trainer logged there (``lib.trackers``)."""

import logging
from typing import Optional

from hamilton.function_modifiers import tag
from transformers import TrainingArguments

from ..lib.artifacts import ADAPTER_DIR
from ..lib.distributed import is_main_process
from ..lib.trackers import (
    FINAL_METRICS_TRACKERS,
    final_metrics,
    final_step,
    log_final_metrics,
    run_params,
    tensorboard_dir,
)

logger = logging.getLogger(__name__)


@tag(output="default")
def tracked_final_metrics(
    run_metrics: dict,
    training_args: TrainingArguments,
    training_log_history: list,
    run_manifest: dict,
    save_best_models: dict,
    saved_metrics: dict,
    saved_report: dict,
    saved_report_html: dict,
    output_dir: str = "outputs",
    tracking_dir: Optional[str] = None,
) -> dict:
    """Logs the final metrics (``lib.trackers.final_metrics``: names such as
    ``final/hold_out/finetuned/rougeL``) at the training's last optimizer step to each tracker of
    ``training_args.report_to`` that ``lib.trackers.FINAL_METRICS_TRACKERS`` names: TensorBoard into the
    directory the Trainer's event files are in (``tracking_dir``, else ``<output_dir>/runs``), MLflow into
    the Trainer's run (with the run's configuration as parameters, ``lib.trackers.run_params``, and
    ``metrics.json``, ``report.md``, ``report.html`` and the ``adapter`` directory as artifacts), W&B into
    the Trainer's run. Only the main process (``lib.distributed.is_main_process``) writes. It runs after
    every file it logs is saved, so a tracker that fails loses none of them.

    :param tracking_dir: directory of the TensorBoard event files; None is ``<output_dir>/runs``.
    :return: ``{tracker: {name: value}}``, what was logged; ``{}`` for ``report_to="none"`` and on the
        other processes of a multi-process run.
    :raises ImportError: a tracker's package is not installed.
    """
    trackers = list(training_args.report_to or [])
    if not trackers or not is_main_process():
        return {}
    skipped = [tracker for tracker in trackers if tracker not in FINAL_METRICS_TRACKERS]
    if skipped:
        logger.info("final metrics not logged to %s (only to %s); the Trainer logged the training there",
                    ", ".join(skipped), ", ".join(FINAL_METRICS_TRACKERS))
    step = final_step(run_metrics, training_log_history)
    artifacts = {saved_metrics["path"]: "", saved_report["path"]: "", saved_report_html["path"]: "",
                 save_best_models["adapter_dir"]: ADAPTER_DIR}
    return log_final_metrics(trackers, final_metrics(run_metrics), step, tensorboard_dir(output_dir, tracking_dir),
                             training_args.run_name, run_params(run_manifest), artifacts)
