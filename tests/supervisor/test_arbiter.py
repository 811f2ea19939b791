"""The supervisor's reaping and restart decisions, with real child processes and an injected clock."""

from __future__ import annotations

import os
import signal
import time

import pytest

from common.config import Settings
from common.errors import ExitCode
from supervisor.arbiter import Halt, ShardHandle, Supervisor
from tests.e2e.processes import wait_for


def exited_child(code: int) -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(code)
    return pid


def killed_child(signum: int) -> int:
    pid = os.fork()
    if pid == 0:
        signal.pause()
        os._exit(0)
    os.kill(pid, signum)
    return pid


@pytest.fixture
def supervisor() -> Supervisor:
    return Supervisor(Settings.from_env({"SHARDS": "2", "INSTANCE_ID": "unit"}))


def reap(supervisor: Supervisor, pid: int, slot: int) -> None:
    supervisor.shards[pid] = ShardHandle(slot, started_at=0.0)
    wait_for(lambda: (supervisor.reap_shards(), pid not in supervisor.shards)[1], what="the child to be reaped")


def test_crashed_shard_is_scheduled_for_restart_with_backoff(supervisor: Supervisor) -> None:
    """A shard exiting 70 is reaped and its slot gets a restart time in the future."""
    before = time.monotonic()
    reap(supervisor, exited_child(ExitCode.SOFTWARE), slot=1)
    assert supervisor.restart_at[1] > before
    assert 0 not in supervisor.restart_at, "only the crashed slot is restarted"


def test_sigkilled_shard_is_reported_as_probable_oom(supervisor: Supervisor, caplog: pytest.LogCaptureFixture) -> None:
    """SIGKILL is logged as a probable out-of-memory kill, and the slot is restarted."""
    reap(supervisor, killed_child(signal.SIGKILL), slot=0)
    assert any("SIGKILL" in r.getMessage() and "out of memory" in r.getMessage() for r in caplog.records)
    assert 0 in supervisor.restart_at


def test_configuration_exit_halts_without_restart(supervisor: Supervisor) -> None:
    """A shard exiting 78 means restarting cannot help: the supervisor halts with 78."""
    pid = exited_child(ExitCode.CONFIG)
    supervisor.shards[pid] = ShardHandle(0, started_at=0.0)
    with pytest.raises(Halt) as halt:
        wait_for(lambda: supervisor.reap_shards() or pid not in supervisor.shards, what="the halt")
    assert halt.value.exit_status == ExitCode.CONFIG


def test_crash_loop_halts_with_70(supervisor: Supervisor) -> None:
    """Five crashes within a minute make the supervisor halt with 70 instead of restarting again."""
    with pytest.raises(Halt) as halt:
        for _ in range(5):
            reap(supervisor, exited_child(ExitCode.SOFTWARE), slot=0)
    assert halt.value.exit_status == ExitCode.SOFTWARE


def test_stop_kills_shards_that_ignore_sigterm(supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shutdown is bounded: a child that ignores SIGTERM is SIGKILLed at the deadline."""
    import supervisor.arbiter as arbiter

    monkeypatch.setattr(arbiter, "QUICK_STOP_S", 0.3)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.write(write_fd, b"x")
        signal.pause()
        os._exit(0)
    os.read(read_fd, 1)  # the child ignores SIGTERM from here on
    supervisor.install_signal_handlers()
    try:
        supervisor.shards[pid] = ShardHandle(0, started_at=0.0)
        supervisor.stopping = supervisor.quick = True
        assert supervisor.stop() == ExitCode.OK
        assert supervisor.shards == {}
    finally:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)


def sigterm_counting_child(report_fd: int) -> int:
    """A child that writes one byte per SIGTERM it receives and exits 0.5 s after the first."""
    pid = os.fork()
    if pid == 0:
        def count(_signum: int, _frame: object) -> None:
            os.write(report_fd, b"T")
            signal.setitimer(signal.ITIMER_REAL, 0.5)

        signal.signal(signal.SIGALRM, lambda *_: os._exit(0))
        signal.signal(signal.SIGTERM, count)
        os.write(report_fd, b"R")
        while True:
            signal.pause()
    return pid


def test_a_halt_during_a_stop_never_signals_a_shard_twice(supervisor: Supervisor) -> None:
    """One shard exits 78 as the stop begins (a halt reason); the other still drains on its one SIGTERM."""
    read_fd, write_fd = os.pipe()
    draining = sigterm_counting_child(write_fd)
    assert os.read(read_fd, 1) == b"R"
    supervisor.shards[draining] = ShardHandle(0, started_at=0.0)
    supervisor.shards[exited_child(ExitCode.CONFIG)] = ShardHandle(1, started_at=0.0)
    supervisor.install_signal_handlers()
    try:
        with pytest.raises(Halt) as halt:
            supervisor.halt("test halt", ExitCode.SOFTWARE)
    finally:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
    os.close(write_fd)
    received = b""
    while chunk := os.read(read_fd, 64):
        received += chunk
    assert halt.value.exit_status == ExitCode.SOFTWARE and halt.value.reason == "test halt"
    assert received == b"T", "exactly one SIGTERM: a second one would cut the drain short"
    assert supervisor.shards == {}
