"""The maintenance process: periodic duties of one instance, out of the supervisor's way.

The supervisor forks this process (titled `processor: maintenance [INSTANCE_ID]`) after
the HTTP process and supervises it the same way: reaped, restarted with its own backoff
if it dies, never counted as a shard crash, halted on exit 78, stopped with SIGTERM at
shutdown. It is single-threaded and runs a list of duties, each on its own cadence.

Adding a duty
-------------
A duty is `Duty(name, every_s, run)`: `run()` is called in this process's main thread
about every `every_s` seconds (the first time right after start-up; the next one
`every_s` after the previous run *ended*, so a slow run never piles up). `asked()`, if
given, is called about once a second: True brings the next run forward to now, or to
ASKED_GAP_S after the previous run ended, so that a request repeated while the cause
persists cannot run the duty back to back. Write a factory
`make(settings, board) -> Duty | None` (None: the duty is disabled by configuration) and
append it to `DUTY_FACTORIES`. The factory is called in this process after the fork, so
it may open its own connections (keep them in a closure or a small object; never one
inherited across the fork); `Duty.close` (optional) is called at exit.

What `run()` may raise, and what happens then (common/faults.py decides):

- an outage of Redis or Postgres: logged once per outage (`maintenance duty paused`,
  then `… resumed`); the duty runs again at its next turn, the other duties go on.
- a refusal (credentials, a missing privilege or table, an unknown command): the process
  exits 78 and the supervisor halts, as for a shard.
- anything else is a bug: a panic dump and exit 70; the supervisor restarts the process.

A duty must be safe when several instances run it at once (each instance has its own
maintenance process): use an advisory lock, an atomic Redis script or idempotent
commands. A run should be short (seconds): SIGTERM is only looked at between runs, and
the supervisor SIGKILLs the process if it is still busy when its stop budget ends.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from common.config import Settings
from common.errors import ExitCode
from common import refusals
from common.faults import Outcome, classify, one_line
from common.panic import Panic
from common.status import StatusBoard
from supervisor.children import set_up_helper

log = logging.getLogger("processor.maintenance")

ORPHAN_CHECK_S = 1.0  # the longest sleep between two looks at the supervisor, at SIGTERM and at requests
ASKED_GAP_S = 5.0  # a duty asked for runs at most this often


@dataclass(frozen=True)
class Duty:
    """One periodic job of the maintenance process."""

    name: str
    every_s: float
    run: Callable[[], None]
    close: Callable[[], None] = lambda: None
    asked: Callable[[], bool] = lambda: False  # True: run now, not at the next turn


DutyFactory = Callable[[Settings, StatusBoard], "Duty | None"]


def _factories() -> tuple[DutyFactory, ...]:
    """Every duty of the maintenance process (imported here, after the fork, to keep start-up light)."""
    from supervisor.partitions import partitions_duty
    from supervisor.trimming import stream_duty

    return (stream_duty, partitions_duty)


class Refused(Exception):
    """A duty met a refusal: the process exits 78."""


class Maintenance:
    """Constructed in the child after fork; `run()` is its whole life and returns the exit status."""

    def __init__(self, settings: Settings, board: StatusBoard, factories: tuple[DutyFactory, ...] | None = None) -> None:
        self.settings = settings
        self.board = board
        self.factories = factories
        self.supervisor_pid = os.getppid()
        self.panic = Panic(settings, "maintenance", self.panic_state)
        self.duties: list[Duty] = []
        self.due: dict[str, float] = {}
        self.ended: dict[str, float] = {}  # when each duty's last run ended (monotonic)
        self.paused: set[str] = set()

    def run(self) -> int:
        """Post-fork set-up, then the duties until SIGTERM or until the supervisor is gone."""
        set_up_helper(self.settings, "maintenance", self.panic)
        try:
            return self.loop()
        except Exception as exc:
            self.panic.crash(type(exc), exc, exc.__traceback__, where="maintenance main thread")
        finally:
            for duty in self.duties:
                duty.close()

    def loop(self) -> int:
        factories = self.factories if self.factories is not None else _factories()
        self.duties = [duty for make in factories if (duty := make(self.settings, self.board)) is not None]
        now = time.monotonic()
        self.due = {duty.name: now for duty in self.duties}
        log.info("maintenance starting", extra={"duties": {d.name: d.every_s for d in self.duties}})
        while True:
            try:
                self.bring_forward()
                self.run_due()
            except Refused:
                return ExitCode.CONFIG
            wait_s = min([*(due - time.monotonic() for due in self.due.values()), ORPHAN_CHECK_S])
            if signal.sigtimedwait({signal.SIGTERM}, max(wait_s, 0.0)) is not None:
                log.info("maintenance stopping")
                return ExitCode.OK
            if os.getppid() != self.supervisor_pid:
                log.error("supervisor gone; maintenance exiting")
                return ExitCode.OK

    def bring_forward(self) -> None:
        """Duties asked for are due now (or ASKED_GAP_S after their last run)."""
        for duty in self.duties:
            if duty.asked():
                ended = self.ended.get(duty.name)
                soonest = time.monotonic() if ended is None else ended + ASKED_GAP_S
                self.due[duty.name] = min(self.due[duty.name], soonest)

    def run_due(self) -> None:
        """Run every duty whose time has come, once each, in list order."""
        for duty in self.duties:
            if time.monotonic() >= self.due[duty.name]:
                self.run_one(duty)
                self.ended[duty.name] = time.monotonic()
                self.due[duty.name] = self.ended[duty.name] + duty.every_s

    def run_one(self, duty: Duty) -> None:
        try:
            duty.run()
        except Exception as exc:
            outcome = classify(exc)
            if outcome is Outcome.OUTAGE:
                if duty.name not in self.paused:
                    self.paused.add(duty.name)
                    log.warning("maintenance duty paused", extra={"duty": duty.name, "error": one_line(exc)})
                return
            if outcome is Outcome.REFUSED:
                settings = self.settings  # partition maintenance uses MIGRATION_DATABASE_URL
                said = refusals.describe(exc, redis_url=settings.redis_url, database_url=settings.migration_database_url)
                error = said or one_line(exc)
                log.critical("maintenance cannot work with this configuration", extra={"duty": duty.name, "error": error})
                self.board.write_last_words(None, f"{duty.name}: {error}")
                raise Refused(duty.name) from exc
            raise
        if duty.name in self.paused:
            self.paused.discard(duty.name)
            log.info("maintenance duty resumed", extra={"duty": duty.name})

    def panic_state(self) -> dict[str, object]:
        """What a panic dump shows of the maintenance process."""
        return {"supervisor_pid": self.supervisor_pid, "duties": [d.name for d in self.duties], "paused": sorted(self.paused)}
