"""A stop signal is a clean stop: SIGTERM (``docker stop``, systemd, batch schedulers) and SIGINT (Ctrl-C)
end a run at a safe point, with one line instead of a traceback, and never leave a half-written file.

``stop_signals_handled()`` installs the handlers; ``philo-dataflow``'s main job enters it, the library never
does (a program that uses the library keeps its own handlers). Under the handlers:

- A first signal raises ``StopRequested`` (a ``KeyboardInterrupt``) in the main thread, where the run is:
  loading, generation, scoring.
- Inside a ``stop_held()`` block it is held until the block ends, then raised: around ``Trainer.train``
  (``stages.training``), where ``lib.trainer.StopAtSignal`` saves a checkpoint at the end of the optimizer
  step and ends training, and around the atomic writes of ``lib.artifacts`` and ``stages.saving``, which
  finish the file first.
- A second signal ends the process at once, by that signal (a shell reports 128 + its number), checkpoint
  or not; as a container's PID 1, which the kernel spares default actions, by ``os._exit(128 + number)``.

With several processes (torchrun, accelerate launch) every process gets the launcher's signal and handles
it; ``StopAtSignal`` makes them agree on the step to stop at. Imports only ``lib.distributed``.
"""

import contextlib
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Iterator, Optional

from .distributed import launched_rank

#: The signals handled: what ``docker stop``, systemd and batch schedulers send, and Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(KeyboardInterrupt):
    """The run was asked to stop by ``signum``. A ``KeyboardInterrupt``, so ``except Exception`` handlers
    (retries, fallbacks) let it through."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """128 + the signal's number (143 for SIGTERM, 130 for SIGINT), the shell's status for it."""
        return 128 + self.signum


@dataclass
class _StopState:
    received: Optional[int] = None  # the signal this process got (a second one ends it at once)
    requested: Optional[int] = None  # the stop decided: this process's signal, or another process's
    raised: bool = False  # StopRequested has been raised (once per run)
    held: list = field(default_factory=list)  # the open stop_held blocks' descriptions (None: none given)
    checkpoint: Optional[str] = None  # the newest checkpoint training saved in this run


_STATE = _StopState()


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for ``signal.SIGTERM``'s number, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _handle_stop_signal(signum: int, frame) -> None:
    if _STATE.received is not None:
        # A second signal: its default action, at once, so the process ends by it. PID 1 (a container's
        # entrypoint) is spared default actions by the kernel: it exits with the shell's status instead.
        signal.signal(signum, signal.SIG_DFL)
        if os.getpid() != 1:
            os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    _STATE.received = signum
    if _STATE.requested is None:
        _STATE.requested = signum
    if _STATE.held:
        what = next((text for text in _STATE.held if text), None)
        if what and launched_rank() == 0:
            name = signal_name(signum)
            # os.write, not print: the handler may have interrupted a write to sys.stderr (a progress bar's).
            os.write(2, f"\n{name} received: stopping once {what} (a second {name} stops at once, without "
                        "it)\n".encode())
        return
    if not _STATE.raised:  # a stop already under way is not interrupted again
        _raise_stop()


def _raise_stop() -> None:
    _STATE.raised = True
    raise StopRequested(_STATE.requested)


@contextlib.contextmanager
def stop_signals_handled() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT stop the run cleanly (see the module's docstring); the previous
    handlers are restored when it ends, and what it recorded (``saved_checkpoint``) is forgotten. A signal
    the process was started ignoring stays ignored (a command started with ``&`` from a script ignores
    SIGINT, as Python itself respects). Outside the main thread, where Python cannot install handlers, it
    changes nothing."""
    global _STATE
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _STATE = _StopState()
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, _handle_stop_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        _STATE = _StopState()  # a later run in this process starts with no stop requested


@contextlib.contextmanager
def stop_held(what: Optional[str] = None) -> Iterator[None]:
    """A block a stop signal does not interrupt: a signal that comes during it is held, and
    ``StopRequested`` is raised when it ends (when it ends without an error; the outermost block of nested
    ones). In the main thread only (signals are handled there); elsewhere it changes nothing.

    :param what: what the block finishes, for the line printed when a signal comes ("this training step
        ends..."); None prints nothing (a short write).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _STATE.held.append(what)
    try:
        yield
    finally:
        _STATE.held.pop()
    if not _STATE.held and _STATE.requested is not None and not _STATE.raised:
        _raise_stop()


def requested_stop() -> Optional[int]:
    """The number of the signal that asked this run to stop, or None."""
    return _STATE.requested


def request_stop(signum: int) -> None:
    """Records a stop this process did not get the signal of (another process of the run did), so the
    ``stop_held`` block around training raises ``StopRequested`` as it ends."""
    if _STATE.requested is None:
        _STATE.requested = signum


def note_checkpoint(path: str) -> None:
    """Records the checkpoint training has just saved (``lib.trainer.StopAtSignal``)."""
    _STATE.checkpoint = path


def saved_checkpoint() -> Optional[str]:
    """The newest checkpoint training saved since the handlers were installed, or None."""
    return _STATE.checkpoint
