"""The maintenance loop: duties on their cadence, outages pause a duty, refusals exit 78, bugs propagate."""

from __future__ import annotations

import logging

import pytest
import redis

from common.config import Settings
from common.errors import ExitCode
from common.status import StatusBoard
from supervisor.maintenance import Duty, Maintenance


def maintenance(*duties: Duty) -> Maintenance:
    settings = Settings.from_env({"INSTANCE_ID": "unit", "SHARDS": "1"})
    process = Maintenance(settings, StatusBoard(1), factories=tuple((lambda s, b, d=d: d) for d in duties))
    process.duties = list(duties)
    process.due = {d.name: 0.0 for d in duties}
    return process


def test_each_duty_runs_on_its_own_cadence() -> None:
    """A duty runs when due, then not again before `every_s` has passed; the others are not held up."""
    runs: list[str] = []
    process = maintenance(Duty("fast", 0.0, lambda: runs.append("fast")), Duty("slow", 3_600.0, lambda: runs.append("slow")))
    process.run_due()
    process.run_due()
    assert runs == ["fast", "slow", "fast"]


def test_an_outage_pauses_the_duty_and_is_logged_once(caplog) -> None:
    """A connection error: logged once as paused, the other duties go on, `resumed` once it succeeds."""
    failing = [True]
    runs: list[str] = []

    def flaky() -> None:
        if failing[0]:
            raise redis.exceptions.ConnectionError("connection refused")
        runs.append("flaky")

    caplog.set_level(logging.INFO, logger="processor.maintenance")
    process = maintenance(Duty("flaky", 0.0, flaky), Duty("other", 0.0, lambda: runs.append("other")))
    process.run_due()
    process.run_due()
    failing[0] = False
    process.run_due()
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("maintenance duty paused") == 1 and messages.count("maintenance duty resumed") == 1
    assert runs == ["other", "other", "flaky", "other"]


def test_a_refusal_ends_the_process_with_78() -> None:
    """NOPERM (our ACL user may not trim, say): the loop returns 78 so that the supervisor halts."""

    def refused() -> None:
        raise redis.exceptions.NoPermissionError("NOPERM this user has no permissions to run the 'xtrim' command")

    settings = Settings.from_env({"INSTANCE_ID": "unit", "SHARDS": "1"})
    process = Maintenance(settings, StatusBoard(1), factories=(lambda s, b: Duty("trim", 1.0, refused),))
    assert process.loop() == ExitCode.CONFIG


def test_a_bug_propagates_to_the_panic_handler() -> None:
    """Anything else is a bug: it leaves run_one (run() turns it into a panic dump and exit 70)."""

    def buggy() -> None:
        raise KeyError("oops")

    with pytest.raises(KeyError):
        maintenance(Duty("buggy", 0.0, buggy)).run_due()
