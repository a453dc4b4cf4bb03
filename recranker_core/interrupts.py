"""Stopping on SIGINT and SIGTERM: the exception that ends a stage when an operator (or a
scheduler's `timeout`, or a Prefect worker) asks the process to stop, and the flag that work in
other threads checks between steps.

`Stopped` is a SystemExit: `except Exception` never swallows it, retry policies never see it as a
failure, psycopg cancels the running statement before letting it through (the connection stays
usable for the rollback), and an uncaught one ends the process with 128 + the signal number
(130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_stop = threading.Event()
_stop_signal: list[int] = []
_lock = threading.Lock()


class Stopped(SystemExit):
    """The process was asked to stop (SIGINT or SIGTERM); what was in progress is abandoned."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    def __str__(self) -> str:
        return f"stopped by {self.signal_name}"


def stop_reason(exc: BaseException) -> str | None:
    """What stopped the work, when `exc` is a request to stop rather than an error: Stopped,
    KeyboardInterrupt, SystemExit, or another signal-born BaseException (Prefect's
    TerminationSignal). None for ordinary exceptions, which are failures."""
    if isinstance(exc, Stopped):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "stopped by SIGINT"
    if isinstance(exc, Exception | GeneratorExit):
        return None
    signum = getattr(exc, "signal", None)
    if isinstance(signum, int):
        return f"stopped by {signal.Signals(signum).name}"
    return f"stopped ({type(exc).__name__})"


def stop_requested() -> bool:
    """True once SIGINT or SIGTERM arrived inside `stop_on_signals` (any thread may ask)."""
    return _stop.is_set()


def check_stop() -> None:
    """Raise Stopped when a stop was requested; long loops call it between steps, so that work
    running outside the main thread (which alone receives signals) ends promptly too."""
    if _stop.is_set():
        raise Stopped(_stop_signal[0] if _stop_signal else signal.SIGTERM)


def _handler(signum: int, frame: FrameType | None) -> None:
    with _lock:
        again = _stop.is_set()
        _stop_signal[:] = [signum]
        _stop.set()
    if again:
        # A second signal while stopping: give up on the orderly stop, end at once.
        log.error("%s again while stopping: exiting without cleanup", signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    log.warning(
        "%s received: stopping (what is in progress is rolled back and recorded as cancelled)",
        signal.Signals(signum).name,
    )
    raise Stopped(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside the block, SIGINT and SIGTERM raise Stopped in the main thread and set the flag
    `check_stop` reads; the previous handlers come back afterwards. Nested blocks reuse the
    outer one's handlers. Outside the main thread (where handlers cannot be set) the block
    changes nothing, and `check_stop` still answers for the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    outermost = all(handler is not _handler for handler in previous.values())
    if outermost:
        with _lock:
            _stop.clear()
            _stop_signal.clear()
    for sig in SIGNALS:
        if previous[sig] is not _handler:
            signal.signal(sig, _handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not _handler and handler is not None:
                signal.signal(sig, handler)
