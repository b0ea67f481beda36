"""The dataflow: the stage modules (``philo_dataflow.stages``) assembled into a Hamilton driver, and the
output lists read off the nodes' tags.

Config ``start``: ``"base"`` trains a new adapter; ``"presaved"`` loads the adapter in the input
``presaved_model_dir`` (the ``adapter`` directory a base run saved). Config ``judge=True`` adds the LLM
judge (``stages.judging``): its results join ``metrics.json`` and the report, ``JUDGE_OUTPUTS`` write its
own files, and the ``judge_*`` inputs (at least ``judge_model``) are needed.

The output lists are derived from the nodes' ``@tag(output=...)``: ``"default"`` nodes write every file
of a run and log its final metrics to the trackers of ``report_to`` (``stages.tracking``):
``DEFAULT_OUTPUTS``; ``"final"`` nodes are the other values users ask for, ``"judge"`` nodes write the
judge's files, ``"run"`` nodes write what only the command line provides (its resolved ``config.yaml``),
``"export"`` nodes write the merged and GGUF copies of the model (``EXPORT_OUTPUTS``,
``philo-dataflow export``).
"""

import functools
import inspect
from typing import Optional

from hamilton import driver
from hamilton.lifecycle.base import LifecycleAdapter

from .stages import (
    exporting,
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
    tracking,
    training,
)
from .lib.artifacts import read_manifest
from .lib.caching import DataResultStore, InterruptsPassTheCache, cache_path
from .lib.inputs import ARCHITECTURES, EMBEDDED_MODEL_ID, FINETUNING_METHODS, START_MODES
from .lib.model_sources import is_encoder_decoder
from .lib.switches import SWITCH_DEFAULTS

#: The stage modules, in the order the data flows through them.
MODULES = (
    loading, splitting, tokenization, modeling, training, prediction, metrics, judging, plots, report, exporting,
    tracking, saving,
)
#: Config keys ``resolved_config`` reads the switches off (``build_driver`` refuses them: it reads no file).
MODEL_SOURCE_KEYS = ("model_id", "presaved_model_dir", "trust_remote_code")
#: The tag key of the nodes the output lists are made of, and its values.
OUTPUT_TAG = "output"


def build_driver(
    config: Optional[dict] = None, adapters: Optional[list[LifecycleAdapter]] = None, cache_dir: Optional[str] = None,
) -> driver.Driver:
    """A Hamilton driver over ``MODULES``: ``driver.Builder().with_config(config).with_modules(*MODULES)``,
    with the config checked first and, on request, Hamilton's cache and adapters. It reads no file.

    :param config: ``{"start": "base" | "presaved", "judge": bool, "finetuning_method": "lora" | "full",
        "architecture": "causal" | "seq2seq"}``; omitted keys take their defaults inside the stage
        modules (``lib.switches.SWITCH_DEFAULTS``: ``start="base"``, no judge, LoRA, a decoder-only model),
        so a driver built with Hamilton's own ``Builder`` on the same config is the same graph. To read
        ``architecture`` off a model (its ``is_encoder_decoder``) or ``finetuning_method`` and
        ``architecture`` off a presaved run's manifest, call ``resolved_config`` first and pass its result.
    :param adapters: Hamilton lifecycle adapters, e.g. ``[h_tqdm.ProgressBar("philo_dataflow")]`` or
        ``[lib.trackers.hamilton_ui_tracker(...)]`` (the Hamilton UI).
    :param cache_dir: turns on Hamilton's cache (``Builder().with_cache``) in ``<cache_dir>/<code
        fingerprint>`` (``lib.caching``): a node whose code and inputs' fingerprints were seen before returns
        its stored result instead of running, so a re-run that changes only evaluation inputs reuses the
        loaded and tokenized data and the trained weights. Nodes that read files (marked
        ``@cache(behavior="recompute")``) and every node that writes one (tagged ``output`` other than
        ``"final"``) always run; models, Trainers and tokenizers are never stored, only fingerprinted, and
        are rebuilt. None (the default) runs without a cache. Single-process only: the ranks of a
        multi-process run must all run the same nodes. An interrupt (Ctrl-C, ``lib.stopping.StopRequested``)
        leaves a node as raised (``lib.caching.InterruptsPassTheCache``).
    :raises ValueError: a config value not among its choices; a config key that names a model or adapter
        (``MODEL_SOURCE_KEYS``: pass the config through ``resolved_config``).
    """
    config = checked_config(config)
    builder = driver.Builder().with_config(config).with_modules(*MODULES)
    if cache_dir is not None:
        path = cache_path(cache_dir)
        writers = [name for name, value in _tagged_outputs() if value != "final"]
        # The interrupt adapter goes first: Hamilton calls the adapters' hooks in order.
        builder = builder.with_adapters(InterruptsPassTheCache()).with_cache(
            path=path, result_store=DataResultStore(str(path)), recompute=writers)
    if adapters:
        builder = builder.with_adapters(*adapters)
    return builder.build()


def checked_config(config: Optional[dict] = None) -> dict:
    """``config`` with every switch filled in from ``SWITCH_DEFAULTS`` and checked; reads no file.

    :raises ValueError: a value not among its choices; a key of ``MODEL_SOURCE_KEYS`` (the message says to
        call ``resolved_config``).
    """
    config = dict(config or {})
    named = [key for key in MODEL_SOURCE_KEYS if key in config]
    if named:
        raise ValueError(f"config key {named[0]!r} names a model: build_driver reads no file; call "
                         f"philo_dataflow.resolved_config(config) to choose the switches from it, and give "
                         f"{named[0]} in inputs.")
    for key, default in SWITCH_DEFAULTS.items():
        config.setdefault(key, default)
    if config["start"] not in START_MODES:
        raise ValueError(f"config start={config['start']!r}: use one of {START_MODES}.")
    if not isinstance(config["judge"], bool):
        raise ValueError(f"config judge={config['judge']!r}: use True or False.")
    for key, choices in (("finetuning_method", FINETUNING_METHODS), ("architecture", ARCHITECTURES)):
        if config[key] not in choices:
            raise ValueError(f"config {key}={config[key]!r}: use one of {choices}.")
    return config


def resolved_config(config: Optional[dict] = None) -> dict:
    """The switches of a driver for a given model or presaved run, read off its files: ``config`` may name
    ``model_id`` (then ``architecture`` is read off the model's config, ``is_encoder_decoder``, from a
    local directory or the Hugging Face cache) or, with ``start="presaved"``, ``presaved_model_dir``
    (``finetuning_method`` and ``architecture`` from its manifest), and ``trust_remote_code``; switches
    given in ``config`` win. What ``philo-dataflow`` does before it builds its driver::

        config = philo_dataflow.resolved_config({"start": "presaved", "presaved_model_dir": "outputs/adapter"})
        dr = philo_dataflow.build_driver(config)

    :return: ``{"start", "judge", "finetuning_method", "architecture"}`` (``MODEL_SOURCE_KEYS`` left out).
    :raises ValueError: a config value not among its choices; a named model whose config or a presaved
        run whose manifest cannot be read.
    """
    config = dict(config or {})
    source = {key: config.pop(key) for key in MODEL_SOURCE_KEYS if key in config}
    start = config.get("start", SWITCH_DEFAULTS["start"])
    if start == "presaved" and isinstance(source.get("presaved_model_dir"), str):
        manifest = read_manifest(source["presaved_model_dir"])
        config.setdefault("finetuning_method", manifest.get("finetuning_method", SWITCH_DEFAULTS["finetuning_method"]))
        config.setdefault("architecture", manifest.get("architecture", SWITCH_DEFAULTS["architecture"]))
    if "architecture" not in config and isinstance(source.get("model_id"), str):
        encoder_decoder = is_encoder_decoder(source["model_id"], bool(source.get("trust_remote_code")))
        config["architecture"] = "seq2seq" if encoder_decoder else "causal"
    return checked_config(config)


def _definition_order(variable) -> tuple:
    function = variable.originating_functions[0] if variable.originating_functions else None
    module = inspect.getmodule(function)
    position = MODULES.index(module) if module in MODULES else len(MODULES)
    line = function.__code__.co_firstlineno if function is not None else 0
    return position, line, variable.name


@functools.cache
def _tagged_outputs() -> tuple:
    """``(name, output tag)`` of every node tagged ``output`` under any config, in the order of ``MODULES``
    and of their definitions; the four graphs are built once per process."""
    found = {}
    for start in START_MODES:
        for judge in (False, True):
            for variable in build_driver({"start": start, "judge": judge}).list_available_variables():
                if OUTPUT_TAG in variable.tags:
                    found.setdefault(variable.name, variable)
    ordered = sorted(found.values(), key=_definition_order)
    return tuple((variable.name, variable.tags[OUTPUT_TAG]) for variable in ordered)


def outputs_tagged(*values: str) -> tuple:
    """Names of the nodes tagged ``output`` with one of ``values``, under any config, in the order of
    ``MODULES`` and of their definitions."""
    return tuple(name for name, value in _tagged_outputs() if value in values)


def __getattr__(name: str):
    # The lists are read off the built graphs, so they are made on first use, not at import.
    if name == "DEFAULT_OUTPUTS":
        return outputs_tagged("default")
    if name == "FINAL_VARIABLES":
        return outputs_tagged("default", "final")
    if name == "JUDGE_OUTPUTS":
        return outputs_tagged("judge")
    if name == "RUN_OUTPUTS":
        return outputs_tagged("run")
    if name == "EXPORT_OUTPUTS":
        return outputs_tagged("export")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MODULES", "DEFAULT_OUTPUTS", "FINAL_VARIABLES", "JUDGE_OUTPUTS", "RUN_OUTPUTS", "EXPORT_OUTPUTS", "EMBEDDED_MODEL_ID",
    "START_MODES", "build_driver", "checked_config", "outputs_tagged", "resolved_config",
]
