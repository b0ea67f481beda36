"""Helpers of the dataflow that are not nodes: the driver is never given these modules.

Imports go one way: ``problems`` imports nothing of the package; ``inputs`` and ``artifacts`` import only
``problems``; the other helpers import those three and each other; the stage modules import helpers;
``preflight`` imports stages; ``run.py`` imports ``preflight``.
"""
