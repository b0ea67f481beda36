"""``philo-dataflow chat --model-dir <output_dir>/adapter``: a local page that answers one question with the base
and the fine-tuned model side by side (``philo_dataflow.chat``). Bad input (a missing directory, one
without a run's manifest, a port in use) is one ``error:`` line on stderr and exit code 2."""

import argparse
import errno
import socket
import sys
import time
from pathlib import Path

from ..lib.artifacts import ADAPTER_DIR, MANIFEST_FILE, read_manifest

#: Exit code of bad input (argparse's own).
BAD_INPUT = 2
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="philo-dataflow chat",
        description="Serve a local page that answers a question with the base and the fine-tuned model side by "
                    "side, streamed, with the run's generation settings.",
    )
    parser.add_argument("--model-dir", required=True,
                        help=f"the adapter directory of a finished run (<output_dir>/{ADAPTER_DIR})")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to serve on (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to serve on (default {DEFAULT_PORT})")
    return parser


def _model_dir_problem(model_dir: str) -> str:
    """Why ``--model-dir`` cannot be served ("" when it can)."""
    path = Path(model_dir)
    hint = f"give the '{ADAPTER_DIR}' directory of a finished run (<output_dir>/{ADAPTER_DIR})"
    if not path.exists():
        return f"--model-dir {model_dir}: no such directory; {hint}."
    if not path.is_dir():
        return f"--model-dir {model_dir}: not a directory; {hint}."
    if not (path / MANIFEST_FILE).is_file():
        nested = path / ADAPTER_DIR / MANIFEST_FILE
        where = f"; did you mean --model-dir {path / ADAPTER_DIR}?" if nested.is_file() else f"; {hint}."
        return f"--model-dir {model_dir} holds no {MANIFEST_FILE}{where}"
    try:
        read_manifest(model_dir)
    except ValueError as error:
        return f"--model-dir {model_dir}: {error}"
    return ""


def _port_problem(host: str, port: int) -> str:
    """Why ``host:port`` cannot be listened on ("" when it can)."""
    if not 1 <= port <= 65535:
        return f"--port {port}: must be in 1..65535."
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            # as uvicorn does: a port with only closed connections left (TIME_WAIT) is free to serve on
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            return f"--port {port} is in use on {host}; stop what serves there or give another --port."
        return f"--host {host} --port {port}: cannot listen there ({error.strerror or error}); give another --host or --port."
    return ""


def _error(message: str) -> int:
    print("error: " + " ".join(message.split("\n")), file=sys.stderr)
    return BAD_INPUT


def main(argv: list[str]) -> int:
    """Serves the chat page of ``--model-dir`` on ``--host:--port`` until Ctrl-C.

    :return: 0 after Ctrl-C; ``BAD_INPUT`` (2) after one ``error:`` line on stderr for a missing
        directory, one without a manifest, a model that does not load, or a port that cannot be listened on.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its usage and error line (or --help)
        return exit_.code if isinstance(exit_.code, int) else BAD_INPUT
    problem = _model_dir_problem(args.model_dir) or _port_problem(args.host, args.port)
    if problem:
        return _error(problem)

    from .. import chat  # gradio, torch and the models: only once the input is known to be good

    print(f"loading the models of {args.model_dir} ...", flush=True)
    try:
        models = chat.load_chat_models(args.model_dir)
    except (ValueError, OSError) as error:
        return _error(f"--model-dir {args.model_dir}: {error}")
    examples = chat.hold_out_examples(args.model_dir)
    app = chat.build_chat_app(models, examples)
    try:
        url = chat.launch_chat_app(app, args.host, args.port)
    except OSError as error:
        return _error(f"--host {args.host} --port {args.port}: cannot serve there ({error}); give another --port.")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host} makes the page reachable from other machines", file=sys.stderr)
    print(f"chat page: {url} ({len(examples)} hold-out example questions); Ctrl-C stops it", flush=True)
    try:
        while app.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("chat page stopped", flush=True)
    finally:
        app.close()
    return 0
