"""What every module of the command shares: its name, its subcommands, its logging. Imports nothing of
the package."""

#: The command's name, as ``--help`` and messages show it.
PROG = "philo-dataflow"
#: Subcommand name -> (module under ``philo_dataflow.cli``, one line of what it does).
SUBCOMMANDS = {
    "preview": ("preview", "show the tokenized data with the tokens that carry loss, before any training"),
    "chat": ("chat", "a local page answering with the base and the fine-tuned model side by side"),
    "export": ("export", "merged safetensors, GGUF and an Ollama Modelfile of a run's model"),
    "compare": ("compare", "several runs and their base model scored on one hold-out set"),
}


def configure_logging(debug: bool) -> None:
    """A command's logging: library logs at INFO with ``--debug``; otherwise warnings only, with neither
    Hamilton's traceback banner nor libraries' deprecation notes (a user's mistake gets one line)."""
    import logging
    import warnings

    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        logging.getLogger("hamilton").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", category=FutureWarning)
