"""``python -m philo_dataflow``: the ``philo-dataflow`` command."""

import sys

from .cli import main

sys.exit(main())
