"""Helpers of the dataflow that are not nodes: the driver is never given these modules.

Imports go one way: ``problems`` and ``distributed`` import nothing of the package, ``artifacts`` only
``distributed``, ``inputs`` only ``problems``; the other helpers import those and each other, never a
stage; the stage modules import helpers; ``preflight`` imports stages and helpers; ``philo-dataflow`` imports
``preflight``.
"""
