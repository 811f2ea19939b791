"""The supervisor: start-up checks, migrations, then forking and watching the shards.

It stays single-threaded and never waits on a client or on Redis: /healthz and /metrics are answered by the
HTTP process it forks (supervisor/http_process.py), fed through the status board; periodic duties (stream
trimming, …) run in the maintenance process (supervisor/maintenance.py). Both are restarted like shards, with backoff.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import logging
import os
import select
import signal
import socket
import time

from setproctitle import setproctitle

from common import early_signals
from common.config import Settings
from common.errors import ExitCode, ProcessorError
from common.faults import acl_refusal
from common.panic import Panic, crash_point, warn_if_dumps_cannot_be_written
from common.redis_client import sync_client
from common.signals import HURRY_SIGNAL
from common.retry import retry_blocking
from common.status import SlotState, StatusBoard, SupervisorState
from common.timing import QUICK_STOP_S, STOP_MARGIN_S
from common.versions import check_redis
from shard.lifecycle import Shard
from supervisor.children import HelperHandle, ShardHandle, describe_exit, drain_report, fork, kill
from supervisor.http import listen
from supervisor.http_process import HttpProcess
from supervisor.maintenance import Maintenance
from supervisor.restarts import RestartPolicy
from supervisor.startup import prepare_database

log = logging.getLogger("processor.supervisor")

LOOP_TIMEOUT_S = 0.5
STARTUP_TIMEOUT_S = 60.0
REDIS_PROBE_TIMEOUT_S = 5.0
ABORT_GRACE_S = 5.0  # between SIGABRT (traceback on stderr) and SIGKILL of a hung shard
REAP_INTERVAL_S = 0.1
STALE_CONFIRM_S = 1.0
PORT_WAIT_S = 5.0  # a port in use at start-up, waited for before HTTP_PORT is called taken (exit 78)


class Halt(BaseException):
    """Raised only by Supervisor.halt; carries the exit status to the command line."""

    def __init__(self, reason: str, exit_status: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_status = exit_status


class Supervisor:
    """Reads top to bottom in run(): start-up steps, fork, then the watch loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.shards: dict[int, ShardHandle] = {}
        self.restart_at: dict[int, float] = {}  # slot → monotonic time its replacement is due
        self.restarts = RestartPolicy()
        self.restart_count = 0
        self.signals: collections.deque[int] = collections.deque()
        self.stopping = False
        self.stop_started = False
        self.quick = False
        self.board = StatusBoard(settings.shards)
        self.slot_restarts: dict[int, int] = {}
        self.listener: socket.socket | None = None
        self.helpers: dict[str, HelperHandle] = {}  # role → handle: "http" (absent when HTTP_PORT=0), "maintenance"
        self.wakeup_r = self.wakeup_w = -1
        self.crash_point = crash_point(("supervisor-uncaught",), settings.panic_dir)
        self.panic = Panic(settings, "supervisor", self.panic_state)
        # Ctrl-C, a hang-up or Ctrl-\ stop gracefully as SIGTERM does (the default, death, left the
        # shards to drain alone, with no report and no SPEC exit code); nothing is reloaded on SIGHUP.
        self.handlers = dict.fromkeys(early_signals.STOP_SIGNALS, self.handle_sigterm)
        self.handlers |= {signal.SIGCHLD: self.handle_sigchld, signal.SIGUSR1: self.ignore, signal.SIGUSR2: self.ignore}

    def run(self) -> int:
        setproctitle(f"processor: supervisor [{self.settings.instance_id}]")
        faulthandler.enable()
        self.panic.install()
        self.install_signal_handlers()
        log.info("supervisor starting", extra={"config": self.settings.redacted()})
        warn_if_dumps_cannot_be_written(self.settings.panic_dir)
        self.serve_http()  # first: /healthz answers 503 (starting) while the servers are waited for
        self.check_redis()
        prepare_database(self.settings, self.until_reachable, self.stop_if_asked)
        if self.signals:
            self.dispatch_signals()
        if self.stopping:
            return self.stop()
        self.spawn_helper(HelperHandle("maintenance"))
        for slot in range(self.settings.shards):
            self.spawn_shard(slot)
        while not self.stopping:
            self.publish()
            self.wait_for_signal(LOOP_TIMEOUT_S)
            self.dispatch_signals()
            self.reap_children()
            if self.stopping:
                break
            self.check_heartbeats()
            self.maintain_shards()
            self.maintain_helpers()
            if self.crash_point is not None:
                self.crash_point()
        return self.stop()

    def panic_state(self) -> dict[str, object]:
        """What a panic dump shows of the supervisor."""
        return {
            "shards": {str(pid): {"slot": h.slot, "started_at": h.started_at} for pid, h in self.shards.items()},
            "restart_at": {str(slot): due for slot, due in self.restart_at.items()},
            "restarts": self.restart_count,
            "stopping": self.stopping,
            "helpers": {role: handle.state() for role, handle in self.helpers.items()},
        }

    # --- start-up ------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wakeup_w)
        for signum in self.handlers:
            signal.signal(signum, self._queue_signal)
        self.signals.extend(early_signals.taken())  # a stop asked for while we were starting

    def _queue_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def check_redis(self) -> None:
        """Redis must answer, and be 7.0 or newer, before we fork; wrong credentials halt at once."""
        client = sync_client(self.settings.redis_url, REDIS_PROBE_TIMEOUT_S, "processor-supervisor")
        try:
            self.until_reachable("Redis at REDIS_URL", check_redis, client)
        finally:
            client.close()

    def until_reachable(self, what: str, operation, *args):  # type: ignore[no-untyped-def]
        """Start-up calls: retried through an outage until STARTUP_TIMEOUT_S; every failure halts."""
        try:
            return retry_blocking(what, operation, *args, deadline_s=STARTUP_TIMEOUT_S, between=self.stop_if_asked)
        except ProcessorError as exc:
            self.halt(acl_refusal(exc, self.settings.redis_url) or str(exc), exc.exit_code)

    def stop_if_asked(self) -> None:
        """Between start-up retries: a signal ends the wait (and the HTTP process)."""
        self.publish()
        self.dispatch_signals()
        if self.stopping:
            self.stop()
            raise Halt("stopped by a signal during start-up", ExitCode.OK)

    def serve_http(self) -> None:
        """Bind HTTP_PORT (0 disables) before any fork, then fork the HTTP process that answers on it."""
        if not self.settings.http_port:
            return
        try:
            self.listener = listen(self.settings.http_port, PORT_WAIT_S, self.stop_if_asked)
        except OSError as exc:
            self.halt(f"cannot listen on HTTP_PORT {self.settings.http_port}: {exc}", ExitCode.CONFIG)
        self.publish()
        self.spawn_helper(HelperHandle("http"))

    # --- the watch loop ------------------------------------------------------------------

    def spawn_shard(self, slot: int) -> None:
        self.board.reset_liveness(slot, 0)
        pid = fork(lambda: self.run_shard(slot), (self.wakeup_r, self.wakeup_w))
        self.shards[pid] = ShardHandle(slot, time.monotonic())
        self.restart_at.pop(slot, None)
        log.info("shard spawned", extra={"slot": slot, "child_pid": pid})

    def run_shard(self, slot: int) -> int:
        """In the shard's child: it never holds the HTTP socket."""
        if self.listener is not None:
            self.listener.close()
        return Shard(self.settings, slot, self.board).run()

    def spawn_helper(self, handle: HelperHandle) -> None:
        """Fork the helper process of `handle.role`; it takes SIGTERM with sigtimedwait, blocked since the fork."""
        handle.pid = fork(lambda: self.run_helper(handle.role), (self.wakeup_r, self.wakeup_w))
        handle.started_at, handle.restart_at = time.monotonic(), None
        self.helpers[handle.role] = handle
        log.info(f"{handle.role} process spawned", extra={"child_pid": handle.pid})

    def run_helper(self, role: str) -> int:
        """In a helper's child: only the HTTP process keeps the HTTP socket."""
        if role == "http":
            return HttpProcess(self.settings, self.listener, self.board).run()
        if self.listener is not None:
            self.listener.close()
        return Maintenance(self.settings, self.board).run()

    def publish(self) -> None:
        """What only the supervisor knows, into the status board for the HTTP process."""
        running = {handle.slot: (pid, handle.started_at) for pid, handle in self.shards.items()}
        slots = tuple(
            SlotState(slot in running, *running.get(slot, (0, 0.0)), self.slot_restarts.get(slot, 0))
            for slot in range(self.settings.shards)
        )
        self.board.write_supervisor(SupervisorState(os.getpid(), self.stopping, time.monotonic(), slots))

    def wait_for_signal(self, timeout_s: float) -> None:
        """Sleep until a signal or the timeout."""
        if not self.signals:
            select.select([self.wakeup_r], [], [], timeout_s)
        with contextlib.suppress(BlockingIOError):  # the wake-up pipe drained
            while os.read(self.wakeup_r, 512):
                pass

    def dispatch_signals(self) -> None:
        while self.signals:
            signum = self.signals.popleft()
            handler = self.handlers.get(signum)
            if handler is not None:
                handler()

    def handle_sigterm(self) -> None:
        """Graceful stop: shards finish in-flight batches within DRAIN_TIMEOUT_S; a second signal hurries them."""
        if self.stopping:
            self.quick = True
        self.stopping = True

    def ignore(self) -> None:
        """SIGUSR1, SIGUSR2: no meaning here (their default action was death)."""
        log.warning("signal ignored: the supervisor stops on SIGTERM, SIGINT, SIGHUP or SIGQUIT")

    def handle_sigchld(self) -> None:
        """A shard or the HTTP process exited: reaped in the loop right after."""

    def reap_children(self, wait: bool = False) -> None:
        """Collect every exited child (shards, helpers); decide on restart or halt. `wait`: block for the first."""
        flags = 0 if wait else os.WNOHANG
        while True:
            try:
                pid, status = os.waitpid(-1, flags)
            except ChildProcessError:  # no child left at all, so no handle may stay open
                self.shards.clear()
                for helper in self.helpers.values():
                    helper.pid = 0
                return
            if pid == 0:
                return
            flags = os.WNOHANG
            if (handle := self.shards.pop(pid, None)) is not None:
                self.on_shard_exit(pid, handle, status)
            elif (helper := next((h for h in self.helpers.values() if h.pid == pid), None)) is not None:
                self.on_helper_exit(helper, status)

    def on_shard_exit(self, pid: int, handle: ShardHandle, status: int) -> None:
        now = time.monotonic()
        reason, code, extra = describe_exit(status, killed_by_us=handle.aborted_at is not None or self.stopping)
        extra |= {"slot": handle.slot, "child_pid": pid, "ran_s": round(now - handle.started_at, 1)}
        if self.stopping:  # never halt from inside a stop: the other shards are draining
            log.info(f"shard {reason}", extra=extra)
            return
        if code == ExitCode.CONFIG:
            said = self.board.take_last_words(handle.slot) or "a configuration or schema error"
            self.halt(f"shard {handle.slot} cannot work with this configuration: {said}", ExitCode.CONFIG)
        if code == ExitCode.OK:
            # Drained and done, as asked (an operator's SIGTERM to the shard): not a crash.
            self.restart_at[handle.slot] = now
            log.info("shard stopped when asked; starting a new one in its slot", extra=extra)
            return
        due = self.restarts.record_crash(handle.slot, handle.started_at, now)
        self.restart_at[handle.slot] = due
        extra["restart_in_s"] = round(due - now, 2)
        log.warning(f"shard {reason}; restarting", extra=extra)
        if self.restarts.crash_looping(now):
            self.halt(
                f"shards crashed {self.restarts.crash_loop_crashes} times within {self.restarts.crash_loop_window_s:.0f}s",
                ExitCode.SOFTWARE,
            )

    def on_helper_exit(self, helper: HelperHandle, status: int) -> None:
        """A helper process died: restart it with its own backoff (78 halts, as from a shard)."""
        now = time.monotonic()
        reason, code, extra = describe_exit(status, killed_by_us=self.stopping)
        extra |= {"child_pid": helper.pid, "ran_s": round(now - helper.started_at, 1)}
        helper.pid = 0
        if self.stopping:
            log.info(f"{helper.role} process {reason}", extra=extra)
            return
        if code == ExitCode.CONFIG:
            said = (self.board.take_last_words(None) if helper.role == "maintenance" else "") or "a configuration error"
            self.halt(f"the {helper.role} process cannot work with this configuration: {said}", ExitCode.CONFIG)
        helper.restart_at = due = helper.restarts.restart_time(0, helper.started_at, now)
        extra["restart_in_s"] = round(due - now, 2)
        log.warning(f"{helper.role} process {reason}; restarting", extra=extra)

    def check_heartbeats(self) -> None:
        """A shard whose loop stopped beating is hung: SIGABRT (traceback), then SIGKILL."""
        now = time.monotonic()
        for pid, handle in self.shards.items():
            beat = max(self.board.read(handle.slot).heartbeat, handle.started_at)
            stale = now - beat > self.settings.heartbeat_timeout_s
            # Two readings a second apart: one odd read of shared memory must not kill a shard.
            handle.stale_since = (handle.stale_since or now) if stale else None
            if handle.aborted_at is None and stale and now - handle.stale_since >= STALE_CONFIRM_S:
                log.error("shard stopped beating; aborting it", extra={"slot": handle.slot, "child_pid": pid})
                handle.aborted_at = now
                kill(pid, signal.SIGABRT)
            elif handle.aborted_at is not None and now - handle.aborted_at > ABORT_GRACE_S:
                log.error("hung shard ignored SIGABRT; killing it", extra={"slot": handle.slot, "child_pid": pid})
                kill(pid, signal.SIGKILL)

    def maintain_shards(self) -> None:
        """Restore the shard count: respawn each empty slot once its backoff has passed."""
        now = time.monotonic()
        for slot, due in list(self.restart_at.items()):
            if now >= due:
                self.restart_count += 1
                self.slot_restarts[slot] = self.slot_restarts.get(slot, 0) + 1
                self.spawn_shard(slot)

    def maintain_helpers(self) -> None:
        """Restart each helper process once its backoff has passed."""
        for helper in list(self.helpers.values()):
            if helper.restart_at is not None and time.monotonic() >= helper.restart_at:
                self.spawn_helper(helper)

    # --- the end -------------------------------------------------------------------------

    def stop(self) -> int:
        """SIGTERM to every shard, reap until one monotonic deadline, then SIGKILL what is left.

        The maintenance process gets its SIGTERM with the shards; the HTTP process answers
        (503, stopping) until the shards are gone, then gets its SIGTERM.
        """
        if self.stop_started:
            return ExitCode.OK  # a stop is under way further up the stack
        self.stop_started = True
        self.publish()
        budget = self.settings.drain_timeout_s + STOP_MARGIN_S
        log.info("stopping shards", extra={"shards": len(self.shards), "budget_s": budget})
        before = {h.slot: self.board.read(h.slot) for h in self.shards.values()}
        deadline = time.monotonic() + (QUICK_STOP_S if self.quick else budget)
        self.signal_shards(signal.SIGTERM)
        self.stop_helper("maintenance")
        hurried = self.quick
        if hurried:
            self.signal_shards(HURRY_SIGNAL)
        while self.children() and time.monotonic() < deadline:
            if not self.shards:
                self.stop_helper("http")
            self.wait_for_signal(REAP_INTERVAL_S)
            self.dispatch_signals()
            if self.quick and not hurried:
                hurried = True
                self.signal_shards(HURRY_SIGNAL)
                deadline = min(deadline, time.monotonic() + QUICK_STOP_S)
            self.reap_children()
            self.publish()
        if self.children():
            log.error("shards did not stop in time; killing them", extra={"slots": self.slots(), "child_pids": self.children()})
            for pid in self.children():
                kill(pid, signal.SIGKILL)
            while self.children():
                self.reap_children(wait=True)
        log.info("drain report", extra={"shards": drain_report(self.board, before)})
        if self.listener is not None:
            self.listener.close()
        log.info("supervisor stopped", extra={"restarts": self.restart_count})
        return ExitCode.OK

    def halt(self, reason: str, exit_status: int) -> None:
        """Everything fatal ends here: log why, stop the shards (once), exit non-zero."""
        log.critical("supervisor halting", extra={"reason": reason, "exit_status": int(exit_status), "shards": len(self.shards)})
        if self.children() and not self.stop_started:
            self.stopping = True
            self.stop()
        dump = self.panic.dump(reason, "halt") if exit_status == ExitCode.SOFTWARE else None  # a crash loop: keep the state
        log.critical("supervisor halted", extra={"reason": reason, "exit_status": int(exit_status), "dump": dump and str(dump)})
        raise Halt(reason, exit_status)

    def signal_shards(self, signum: int) -> None:
        for pid in self.shards:
            kill(pid, signum)

    def stop_helper(self, role: str) -> None:
        helper = self.helpers.get(role)
        if helper is not None and helper.pid and not helper.stopped:
            helper.stopped = True
            kill(helper.pid, signal.SIGTERM)

    def children(self) -> list[int]:
        """Pids of every running child: the shards and the helpers."""
        return [*self.shards, *(helper.pid for helper in self.helpers.values() if helper.pid)]

    def slots(self) -> list[int]:
        return sorted(handle.slot for handle in self.shards.values())
