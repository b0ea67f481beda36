"""philo_dataflow: supervised LoRA fine-tuning of small causal LMs on question/answer data, as a
Hamilton dataflow.

    import philo_dataflow
    dr = philo_dataflow.build_driver(config={"start": "base"})
    result = dr.execute(["save_best_models", "hold_out_set_predictions",
                         "training_and_validation_set_metrics"],
                        inputs={"data_path": "example_data/philosophy_qa.jsonl"})

Adding ``JUDGE_OUTPUTS`` to the request also runs the LLM judge (``judging``); only then are the
``judge_*`` inputs (at least ``judge_model``) needed.

Config ``start``: ``"base"`` trains a new adapter; ``"presaved"`` loads the adapter in the input
``presaved_model_dir`` (the ``adapter`` directory a base run saved).
"""

from typing import Optional

from hamilton import driver
from hamilton.lifecycle.base import LifecycleAdapter

from . import (
    judging,
    loading,
    metrics,
    modeling,
    plots,
    prediction,
    report,
    saving,
    splitting,
    tokenization,
    training,
)
from .modeling import EMBEDDED_MODEL_ID

#: The stage modules, in the order the data flows through them.
MODULES = (
    loading, splitting, tokenization, modeling, training, prediction, metrics, judging, plots, report, saving,
)

#: Outputs ``run.py`` computes by default: they write every file of a run to ``output_dir``.
DEFAULT_OUTPUTS = (
    "save_best_models",
    "saved_hold_out_predictions",
    "saved_metrics",
    "saved_figures",
    "saved_report",
)

#: Final variables users request; each resolves under ``start="base"`` and ``start="presaved"``.
FINAL_VARIABLES = (
    *DEFAULT_OUTPUTS,
    "hold_out_set_predictions",
    "training_and_validation_set_metrics",
    "finetuned_model_on_validation_set",
    "validation_set_metrics",
    "hold_out_set_metrics",
    "fit_trainer_eval_metrics",
    "finetuned_model",
    "fit_trainer",
    "model_summary",
    "tokenization_stats",
    "split_summary",
    "loss_curve_figure",
    "rouge_comparison_figure",
    "report_markdown",
    "run_metrics",
    "tokenized_hold_out",
)

#: Outputs of the LLM judge (``judging``), computed only when requested; they need the input
#: ``judge_model`` (and an endpoint, see ``judging.judge_client``). They write ``judgments.jsonl`` and
#: ``judge_comparison.html``, and rewrite ``metrics.json`` and ``report.md`` with the judged results.
JUDGE_OUTPUTS = (
    "saved_judgments",
    "saved_judged_metrics",
    "saved_judged_report",
    "saved_judge_figure",
)

START_MODES = ("base", "presaved")


def build_driver(
    config: Optional[dict] = None, adapters: Optional[list[LifecycleAdapter]] = None
) -> driver.Driver:
    """A Hamilton driver over ``MODULES``.

    :param config: ``{"start": "base" | "presaved"}``; ``"base"`` when omitted.
    :param adapters: Hamilton lifecycle adapters, e.g. ``[h_tqdm.ProgressBar("philo_dataflow")]``.
    :raises ValueError: ``start`` is not one of ``START_MODES``.
    """
    config = {"start": "base", **(config or {})}
    if config["start"] not in START_MODES:
        raise ValueError(f"config start={config['start']!r}: use one of {START_MODES}.")
    builder = driver.Builder().with_config(config).with_modules(*MODULES)
    if adapters:
        builder = builder.with_adapters(*adapters)
    return builder.build()


__all__ = ["MODULES", "DEFAULT_OUTPUTS", "FINAL_VARIABLES", "JUDGE_OUTPUTS", "EMBEDDED_MODEL_ID", "build_driver"]
