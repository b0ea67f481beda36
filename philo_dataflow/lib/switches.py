"""The driver's config switches and the default each takes when a config leaves it out, so that a driver
built the Hamilton way — ``driver.Builder().with_config({"start": "base"}).with_modules(*MODULES)`` —
resolves every node: ``when`` is ``@config.when`` over switches with defaults.

Imports nothing of the package.
"""

from typing import Any

from hamilton.function_modifiers import config

#: Each switch of the driver's config, and its value when the config does not set it: train a new model
#: (``start``), no LLM judge (``judge``), a LoRA adapter (``finetuning_method``), a decoder-only model
#: (``architecture``). ``philo_dataflow.resolved_config`` reads the last two off a model or a presaved run.
SWITCH_DEFAULTS = {"start": "base", "judge": False, "finetuning_method": "lora", "architecture": "causal"}


def switch_value(switches: dict, name: str) -> Any:
    """The value of switch ``name`` in a driver's config ``switches``: its own, else ``SWITCH_DEFAULTS``."""
    value = switches.get(name)
    return SWITCH_DEFAULTS[name] if value is None else value


def when(**values: Any) -> config:
    """``@config.when(**values)`` where a switch the config leaves out takes its ``SWITCH_DEFAULTS`` value:
    the decorated function is the node when every named switch has the value given.

    :raises KeyError: a name that is not a switch (at import of the stage module).
    """
    unknown = sorted(set(values) - set(SWITCH_DEFAULTS))
    if unknown:  # a misspelt switch fails at import, not silently at build
        raise KeyError(f"not a config switch: {unknown}; the switches are {list(SWITCH_DEFAULTS)}")

    def resolves(switches: dict) -> bool:
        return all(switch_value(switches, name) == value for name, value in values.items())

    return config(resolves, config_used=list(values))
