"""The ``philo-dataflow`` command, run from a checkout: ``python run.py [COMMAND] [FLAGS]`` is
``philo-dataflow [COMMAND] [FLAGS]`` (``philo_dataflow.cli``)."""

import sys

from philo_dataflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
