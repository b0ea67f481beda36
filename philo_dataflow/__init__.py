"""philo_dataflow: supervised fine-tuning of small language models on question/answer data, as a Hamilton
dataflow, with an honest verdict on whether the fine-tuned model beats its base.

    import philo_dataflow
    dr = philo_dataflow.build_driver({"start": "base"})
    result = dr.execute(["save_best_models", "hold_out_set_predictions", "run_metrics"],
                        inputs={"data_path": philo_dataflow.EXAMPLE_DATA_PATH, "output_dir": "outputs"})

The package's parts:

- ``stages``: the dataflow's nodes, one module per stage in the order data flows (``MODULES``);
- ``dataflow``: ``build_driver``, ``resolved_config`` (the switches read off a model or a presaved run)
  and the output lists read off the nodes' tags;
- ``comparison_dataflow``: ``build_comparison_driver``, the comparison of fine-tuned models of any trainer
  with their base (nodes in ``stages.comparing``; helpers in ``comparison`` and ``compared_models``);
- ``preflight``: the checks made before a model is loaded; ``chat``: the chat page; ``testing``: fixtures of
  the test suite and the benchmarks;
- ``cli``: the ``philo-dataflow`` command (``python -m philo_dataflow``);
- ``lib``: helpers the driver never sees (the inputs table, prompts, generation, artifacts, ...).

Names are resolved on first use, so ``import philo_dataflow`` (and ``philo-dataflow --help``) does not import
torch, transformers or Hamilton.
"""

from .lib.inputs import EMBEDDED_MODEL_ID, EXAMPLE_DATA_PATH, START_MODES

#: Names ``philo_dataflow.dataflow`` provides, imported from there on first use.
_DATAFLOW_NAMES = (
    "MODULES", "DEFAULT_OUTPUTS", "FINAL_VARIABLES", "JUDGE_OUTPUTS", "RUN_OUTPUTS", "EXPORT_OUTPUTS",
    "build_driver", "checked_config", "outputs_tagged", "resolved_config",
)


#: Names ``philo_dataflow.comparison_dataflow`` provides, imported from there on first use.
_COMPARISON_NAMES = ("build_comparison_driver", "COMPARISON_MODULES", "COMPARISON_OUTPUTS")


def __getattr__(name: str):
    if name in _DATAFLOW_NAMES:
        from . import dataflow

        return getattr(dataflow, name)
    if name in _COMPARISON_NAMES:
        from . import comparison_dataflow

        return getattr(comparison_dataflow, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_DATAFLOW_NAMES, *_COMPARISON_NAMES, "EMBEDDED_MODEL_ID", "EXAMPLE_DATA_PATH", "START_MODES"]
