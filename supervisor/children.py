"""The supervisor's children as it sees them (handles), and the few calls it makes on them."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from setproctitle import setproctitle

from common import logs
from common.config import Settings
from common.errors import ExitCode
from common.panic import Panic
from common.signals import HURRY_SIGNAL, ignore_group_signals
from common.status import ShardStatus, StatusBoard
from supervisor.restarts import RestartPolicy


@dataclass
class ShardHandle:
    slot: int
    started_at: float
    aborted_at: float | None = None
    stale_since: float | None = None


@dataclass
class HelperHandle:
    """A helper process (`http`, `maintenance`): its pid while it runs (0 when not), when its replacement is due.

    Each helper has its own backoff; its deaths never count towards the shards' crash loop.
    """

    role: str
    pid: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    stopped: bool = False  # SIGTERM sent at shutdown
    restarts: RestartPolicy = field(default_factory=RestartPolicy, repr=False)

    def state(self) -> dict[str, object]:
        """For a panic dump."""
        return {"pid": self.pid, "started_at": self.started_at, "restart_at": self.restart_at, "stopped": self.stopped}


def fork(child: Callable[[], int], inherited_fds: tuple[int, ...]) -> int:
    """Fork a process that closes `inherited_fds`, runs `child()` and exits with its status.

    Returns the child's pid in the parent; the child never returns into the caller's code.
    SIGTERM is blocked across the fork and stays blocked in the child until it has a
    handler (it unblocks it then): one sent during its start-up waits instead of killing it.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, HURRY_SIGNAL})
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


def set_up_helper(settings: Settings, role: str, panic: Panic) -> None:
    """Post-fork set-up of a helper process (`http`, `maintenance`): signals, title, logs, panic handling.

    SIGTERM stays blocked (the supervisor blocked it across the fork, so none is lost): the
    helper's main thread takes it with sigtimedwait, and every thread inherits the mask.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, HURRY_SIGNAL})  # a helper is not hurried
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    ignore_group_signals()
    signal.set_wakeup_fd(-1)
    faulthandler.enable()
    setproctitle(f"processor: {role} [{settings.instance_id}]")
    logs.configure(settings.log_level, role)
    panic.install()


def describe_exit(status: int, killed_by_us: bool = False) -> tuple[str, int | None, dict[str, object]]:
    """A wait status as (reason for the log, exit code or None when killed, log fields).

    `killed_by_us`: the supervisor sent the SIGKILL itself (a hung shard, a stop deadline)."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum == signal.SIGKILL:
            reason = "killed by SIGKILL" + (" (the supervisor's)" if killed_by_us else " (probably out of memory)")
        else:
            reason = "killed by a signal"
        return reason, None, {"signal": signal.Signals(signum).name}
    code = os.WEXITSTATUS(status)
    return "exited", code, {"exit_status": code}


def kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # exited already; the next reap collects it


def drain_report(board: StatusBoard, before: dict[int, ShardStatus]) -> dict[str, dict[str, int]]:
    """Per shard: entries in flight at the stop signal, committed and ACKed since, dead-lettered, left pending."""
    report = {}
    for slot, start in sorted(before.items()):
        end = board.read(slot)
        report[str(slot)] = {
            "in_flight": start.in_flight,
            "committed_and_acked": end.processed - start.processed,
            "dead_lettered": end.dead_lettered - start.dead_lettered,
            "left_pending": end.in_flight,
        }
    return report
