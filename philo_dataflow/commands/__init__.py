"""``run.py``'s subcommands, one module each with ``main(argv) -> int``: ``chat`` (a local page that
answers with the base and the fine-tuned model side by side), ``export`` (merged and GGUF copies of a
run's model), ``compare`` (several runs scored on one hold-out set). Not Hamilton stage modules."""

#: Subcommand name -> module under ``philo_dataflow.commands`` (imported only when used).
SUBCOMMANDS = {"chat": "chat", "export": "export", "compare": "compare"}


def configure_logging(debug: bool) -> None:
    """A subcommand's logging: library logs at INFO with ``--debug``; otherwise warnings only, with neither
    Hamilton's traceback banner nor libraries' deprecation notes (a user's mistake gets one line)."""
    import logging
    import warnings

    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        logging.getLogger("hamilton").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", category=FutureWarning)
