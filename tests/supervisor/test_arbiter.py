"""The supervisor's reaping, restart and stop decisions for shards and the HTTP process, with real child processes."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from common.config import Settings
from common.errors import ExitCode
from common.status import SlotState
from supervisor.arbiter import Halt, Supervisor
from supervisor.children import HelperHandle, ShardHandle
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
def supervisor() -> Iterator[Supervisor]:
    yield Supervisor(Settings.from_env({"SHARDS": "2", "INSTANCE_ID": "unit"}))


@pytest.fixture
def handlers(supervisor: Supervisor) -> Iterator[None]:
    """The supervisor's signal handlers and wake-up pipe installed for the test, removed afterwards."""
    supervisor.install_signal_handlers()
    yield
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    os.close(supervisor.wakeup_r)
    os.close(supervisor.wakeup_w)


def reap(supervisor: Supervisor, pid: int, slot: int) -> None:
    supervisor.shards[pid] = ShardHandle(slot, started_at=0.0)
    wait_for(lambda: (supervisor.reap_children(), pid not in supervisor.shards)[1], what="the child to be reaped")


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
        wait_for(lambda: supervisor.reap_children() or pid not in supervisor.shards, what="the halt")
    assert halt.value.exit_status == ExitCode.CONFIG


def test_crash_loop_halts_with_70(supervisor: Supervisor) -> None:
    """Five crashes within a minute make the supervisor halt with 70 instead of restarting again."""
    with pytest.raises(Halt) as halt:
        for _ in range(5):
            reap(supervisor, exited_child(ExitCode.SOFTWARE), slot=0)
    assert halt.value.exit_status == ExitCode.SOFTWARE


def test_stop_kills_shards_that_ignore_sigterm(supervisor: Supervisor, handlers: None, monkeypatch: pytest.MonkeyPatch) -> None:
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
    supervisor.shards[pid] = ShardHandle(0, started_at=0.0)
    supervisor.stopping = supervisor.quick = True
    assert supervisor.stop() == ExitCode.OK
    assert supervisor.shards == {}


def sigterm_counting_child(report_fd: int, tag: bytes = b"T", exit_after_s: float = 0.5) -> int:
    """A child that writes b"R" once ready, then `tag` per SIGTERM it receives, and exits `exit_after_s` after the first."""
    pid = os.fork()
    if pid == 0:
        def count(_signum: int, _frame: object) -> None:
            os.write(report_fd, tag)
            signal.setitimer(signal.ITIMER_REAL, exit_after_s)

        signal.signal(signal.SIGALRM, lambda *_: os._exit(0))
        signal.signal(signal.SIGTERM, count)
        os.write(report_fd, b"R")
        while True:
            signal.pause()
    return pid


def test_a_halt_during_a_stop_never_signals_a_shard_twice(supervisor: Supervisor, handlers: None) -> None:
    """One shard exits 78 as the stop begins (a halt reason); the other still drains on its one SIGTERM."""
    read_fd, write_fd = os.pipe()
    draining = sigterm_counting_child(write_fd)
    assert os.read(read_fd, 1) == b"R"
    supervisor.shards[draining] = ShardHandle(0, started_at=0.0)
    supervisor.shards[exited_child(ExitCode.CONFIG)] = ShardHandle(1, started_at=0.0)
    with pytest.raises(Halt) as halt:
        supervisor.halt("test halt", ExitCode.SOFTWARE)
    os.close(write_fd)
    received = b""
    while chunk := os.read(read_fd, 64):
        received += chunk
    assert halt.value.exit_status == ExitCode.SOFTWARE and halt.value.reason == "test halt"
    assert received == b"T", "exactly one SIGTERM: a second one would cut the drain short"
    assert supervisor.shards == {}


def reap_http(supervisor: Supervisor, pid: int) -> None:
    helper = supervisor.helpers.setdefault("http", HelperHandle("http"))
    helper.pid, helper.started_at = pid, time.monotonic()
    wait_for(lambda: (supervisor.reap_children(), supervisor.helpers["http"].pid != pid)[1], what="the HTTP process to be reaped")


def test_http_process_is_restarted_with_backoff_and_never_makes_a_crash_loop(supervisor: Supervisor) -> None:
    """Six quick deaths of the HTTP process: each schedules a later restart, none counts towards the shards' crash loop."""
    delays = []
    for _ in range(6):
        before = time.monotonic()
        reap_http(supervisor, exited_child(ExitCode.SOFTWARE))
        assert supervisor.helpers["http"].pid == 0
        delays.append(supervisor.helpers["http"].restart_at - before)
    assert delays == sorted(delays) and delays[0] > 0, "the backoff grows"
    assert not supervisor.restarts.crash_looping(time.monotonic())
    assert supervisor.restart_at == {} and supervisor.restart_count == 0


def test_http_process_exit_78_halts_with_78(supervisor: Supervisor) -> None:
    """The HTTP process exiting 78 is a configuration error like a shard's: the supervisor halts with 78."""
    with pytest.raises(Halt) as halt:
        reap_http(supervisor, exited_child(ExitCode.CONFIG))
    assert halt.value.exit_status == ExitCode.CONFIG


def test_http_port_taken_halts_78_before_any_fork(supervisor: Supervisor) -> None:
    """HTTP_PORT bound by someone else: halt 78 at start-up, with no child forked."""
    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = taken.getsockname()[1]
        supervisor.settings = Settings.from_env({"SHARDS": "2", "INSTANCE_ID": "unit", "HTTP_PORT": str(port)})
        with pytest.raises(Halt) as halt:
            supervisor.serve_http()
    assert halt.value.exit_status == ExitCode.CONFIG and str(port) in halt.value.reason
    assert "http" not in supervisor.helpers and supervisor.children() == []


def test_publish_tells_the_board_what_only_the_supervisor_knows(supervisor: Supervisor) -> None:
    """Running slots with pid, start and restarts, the supervisor's pid, its stopping flag and a fresh beat."""
    supervisor.shards[4242] = ShardHandle(1, started_at=12.5)
    supervisor.slot_restarts[1] = 3
    supervisor.stopping = True
    supervisor.publish()
    state = supervisor.board.read_supervisor()
    assert state.pid == os.getpid() and state.stopping
    assert time.monotonic() - state.beat < 1.0
    assert state.slots == (SlotState(), SlotState(True, 4242, 12.5, 3))


def test_stop_ends_the_http_process_after_the_shards(supervisor: Supervisor, handlers: None) -> None:
    """At shutdown the HTTP process keeps answering while the shards drain, then gets one SIGTERM; all are reaped."""
    read_fd, write_fd = os.pipe()
    shard = sigterm_counting_child(write_fd, b"S", exit_after_s=0.3)
    http_pid = sigterm_counting_child(write_fd, b"H", exit_after_s=0.01)
    assert os.read(read_fd, 1) + os.read(read_fd, 1) == b"RR"
    supervisor.shards[shard] = ShardHandle(0, started_at=0.0)
    supervisor.helpers["http"] = HelperHandle("http", http_pid, started_at=0.0)
    supervisor.stopping = True
    assert supervisor.stop() == ExitCode.OK
    os.close(write_fd)
    received = b""
    while chunk := os.read(read_fd, 64):
        received += chunk
    assert received == b"SH", "the shard first; the HTTP process once the shard is gone"
    assert supervisor.children() == []


def test_a_sigterm_during_a_childs_start_up_waits_for_its_handler() -> None:
    """children.fork blocks SIGTERM until the child unblocks it: an early SIGTERM is handled, not fatal."""
    from supervisor.children import fork

    def child() -> int:
        time.sleep(0.3)  # start-up: the SIGTERM below arrives now
        signal.signal(signal.SIGTERM, lambda *_: os._exit(7))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        time.sleep(5)
        return 0

    pid = fork(child, ())
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7, "the child's own handler ran"


def test_maintenance_process_is_supervised_like_the_http_process(supervisor: Supervisor) -> None:
    """The maintenance process dying is restarted with its own backoff (not a shard crash); exiting 78 halts with 78."""
    helper = supervisor.helpers.setdefault("maintenance", HelperHandle("maintenance"))
    helper.pid, helper.started_at = exited_child(ExitCode.SOFTWARE), time.monotonic()
    wait_for(lambda: (supervisor.reap_children(), helper.pid == 0)[1], what="the maintenance process to be reaped")
    assert helper.restart_at is not None and helper.restart_at > time.monotonic() - 1
    assert supervisor.restart_at == {} and not supervisor.restarts.crash_looping(time.monotonic())
    helper.pid = exited_child(ExitCode.CONFIG)
    with pytest.raises(Halt) as halt:
        wait_for(lambda: (supervisor.reap_children(), helper.pid == 0)[1], what="the maintenance process to be reaped")
    assert halt.value.exit_status == ExitCode.CONFIG and "maintenance" in halt.value.reason
