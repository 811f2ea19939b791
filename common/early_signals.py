"""Stop signals (SIGTERM, SIGINT, SIGHUP, SIGQUIT) that arrive while a `processor` process is still starting.

Importing the Processor takes 0.3-1 s. A stop signal sent in that time (a deploy that
changes its mind, `docker stop` right after `docker start`) met Python's default: death by
the signal (exit -15 instead of the 0 a stop owes, nothing logged). As a container's PID 1
the kernel ignored it instead, and the stop waited for SIGKILL. The entry point (ops/launch.py)
holds them from its first line. The supervisor takes what was held when it installs its own
handlers; every other command releases them (their usual handling back, a held one raised
again), since only `processor run` owns the signals.
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)

_held: list[int] = []
_previous: dict[int, object] = {}


def hold() -> None:
    """From now on, record stop signals instead of acting on them."""
    for signum in STOP_SIGNALS:
        _previous.setdefault(signum, signal.getsignal(signum))
        signal.signal(signum, _record)


def _record(signum: int, _frame: FrameType | None) -> None:
    _held.append(signum)


def taken() -> list[int]:
    """The stop signals recorded so far (each once), no longer held here."""
    signals, _held[:] = list(_held), []
    return signals


def release() -> None:
    """Give the stop signals their handling from before `hold`, and raise any that arrived."""
    for signum, handler in _previous.items():
        if handler is not None:  # None: installed from C, nothing Python can put back
            signal.signal(signum, handler)  # type: ignore[arg-type]
    _previous.clear()
    for signum in taken():
        signal.raise_signal(signum)
