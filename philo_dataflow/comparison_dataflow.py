"""The comparison's dataflow: the nodes of ``stages.comparing`` assembled into a Hamilton driver, as
``dataflow.build_driver`` assembles the main job's. ``philo-dataflow compare`` executes its ``comparison`` and
``saved_comparison``; its graph renders like the main job's (``dr.display_all_functions(...)``)."""

from typing import Optional

from hamilton import driver
from hamilton.lifecycle.base import LifecycleAdapter

from .stages import comparing

#: The stage modules of the comparison driver.
COMPARISON_MODULES = (comparing,)
#: What ``philo-dataflow compare`` asks the comparison driver for.
COMPARISON_OUTPUTS = ("comparison", "saved_comparison")


def build_comparison_driver(adapters: Optional[list[LifecycleAdapter]] = None) -> driver.Driver:
    """A Hamilton driver over ``COMPARISON_MODULES`` (``stages.comparing``)::

        dr = philo_dataflow.build_comparison_driver()
        result = dr.execute(["comparison"], inputs={"models": ["outputs"], "data_path": "qa.jsonl"})

    :param adapters: Hamilton lifecycle adapters (trackers, progress bars).
    """
    builder = driver.Builder().with_modules(*COMPARISON_MODULES)
    if adapters:
        builder = builder.with_adapters(*adapters)
    return builder.build()
