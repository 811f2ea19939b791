"""The supervisor's children as it sees them (handles), and the few calls it makes on them."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from common.errors import ExitCode


@dataclass
class ShardHandle:
    slot: int
    started_at: float
    aborted_at: float | None = None
    stale_since: float | None = None


@dataclass
class HttpHandle:
    """The HTTP process: its pid while it runs (0 when not), when its replacement is due."""

    pid: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    stopped: bool = False  # SIGTERM sent at shutdown


def fork(child: Callable[[], int], inherited_fds: tuple[int, ...]) -> int:
    """Fork a process that closes `inherited_fds`, runs `child()` and exits with its status.

    Returns the child's pid in the parent; the child never returns into the caller's code.
    SIGTERM is blocked across the fork and stays blocked in the child until it has a
    handler (it unblocks it then): one sent during its start-up waits instead of killing it.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    pid = -1
    try:
        pid = os.fork()
    finally:
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if pid == 0:
        status = ExitCode.SOFTWARE
        try:
            signal.set_wakeup_fd(-1)
            for fd in inherited_fds:
                os.close(fd)
            status = child()
        finally:
            os._exit(status)
    return pid


def describe_exit(status: int) -> tuple[str, int | None, dict[str, object]]:
    """A wait status as (reason for the log, exit code or None when killed, log fields)."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        reason = "killed by SIGKILL (probably out of memory)" if signum == signal.SIGKILL else "killed by a signal"
        return reason, None, {"signal": signal.Signals(signum).name}
    code = os.WEXITSTATUS(status)
    return "exited", code, {"exit_status": code}


def kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # exited already; the next reap collects it
