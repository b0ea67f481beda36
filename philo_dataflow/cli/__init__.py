"""The ``philo-dataflow`` command (also ``python -m philo_dataflow`` and the checkout's ``run.py``).

Its bare form with flags is the main job (``cli.job``: fine-tune, answer the hold-out questions with the
base and the fine-tuned model, score, report); its subcommands each live in a module with
``main(argv) -> int``: ``preview`` (the data as the model will be trained on it, before any training),
``chat`` (a local page answering with both models side by side), ``export`` (merged and GGUF copies of a
run's model) and ``compare`` (several runs scored on one hold-out set).

Every module here imports torch, transformers, datasets and Hamilton only after its arguments are parsed,
so ``--help`` prints at once.
"""

import importlib
import sys
from typing import Optional

from .common import SUBCOMMANDS

def main(argv: Optional[list] = None) -> int:
    """``philo-dataflow [COMMAND] [FLAGS]``: a subcommand's ``main`` when the first argument names one,
    else the main job's (``cli.job.main``). :return: the exit status (0, or 2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(f"{__name__}.{SUBCOMMANDS[argv[0]][0]}")
        return module.main(argv[1:])
    from . import job

    return job.main(argv)
