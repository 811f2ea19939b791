"""The one retry helper: outages pause and retry, refusals become exit-78 errors, the rest propagates."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest
import redis.exceptions as rx

from common.errors import ConnectionRefusedForGood, ExitCode
from common.retry import Reachability, ServerUnreachable, attempt, retry, retry_blocking


class Flaky:
    """Fails with the given exceptions in turn, then returns "done"."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def __call__(self) -> str:
        return self.now()

    def now(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "done"


def test_an_outage_is_retried_and_logged_once_each_way(caplog: pytest.LogCaptureFixture) -> None:
    """Two failed calls, one success: one 'unavailable' line, one 'reachable again', health follows."""
    changes: list[bool] = []
    reach = Reachability("c-0")
    reach.on_change = lambda: changes.append(reach.ok["redis"])
    flaky = Flaky(rx.ConnectionError("reset"), rx.TimeoutError("timeout"))
    with caplog.at_level(logging.WARNING):
        assert asyncio.run(retry("redis", reach, flaky)) == "done"
    assert flaky.calls == 3
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["redis unavailable, pausing", "redis reachable again"]
    assert reach.outages["redis"] == 2 and reach.ok["redis"] and changes == [True]


def test_a_refusal_is_a_configuration_error_at_once() -> None:
    """Wrong credentials are not waited out: exit 78, message names the server, no password."""
    flaky = Flaky(psycopg.OperationalError("FATAL: password authentication failed for user x at postgresql://x:pw1234@h/db"))
    with pytest.raises(ConnectionRefusedForGood) as refused:
        asyncio.run(retry("postgres", Reachability("c-0"), flaky))
    assert flaky.calls == 1 and refused.value.exit_code == ExitCode.CONFIG
    assert "postgres refused" in str(refused.value) and "pw1234" not in str(refused.value)


def test_a_bug_propagates_unchanged() -> None:
    flaky = Flaky(KeyError("bug"))
    with pytest.raises(KeyError):
        asyncio.run(retry("redis", Reachability("c-0"), flaky))
    assert flaky.calls == 1


def test_attempt_marks_the_server_down_and_lets_the_duty_go_on() -> None:
    """A periodic duty's one call: an outage returns False, a success True; health follows."""
    reach = Reachability("c-0")
    assert asyncio.run(attempt("redis", reach, Flaky(rx.ConnectionError("reset")))) is False
    assert reach.ok["redis"] is False
    assert asyncio.run(attempt("redis", reach, Flaky())) is True
    assert reach.ok["redis"] is True


def test_retry_blocking_gives_up_at_its_deadline() -> None:
    """The supervisor's start-up wait is bounded: past the deadline, ServerUnreachable (exit 1)."""
    calls = []

    def down() -> None:
        calls.append(1)
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(ServerUnreachable) as unreachable:
        retry_blocking("Redis at REDIS_URL", down, deadline_s=0.3)
    assert unreachable.value.exit_code == ExitCode.FAILED and len(calls) >= 2
    assert str(unreachable.value).startswith("Redis at REDIS_URL unreachable")


def test_retry_blocking_lets_the_caller_stop_between_attempts() -> None:
    """`between` runs before each wait; raising there (a signal arrived) ends the wait at once."""
    flaky = Flaky(*[rx.ConnectionError("down")] * 10)

    def stop() -> None:
        raise InterruptedError("signal")

    with pytest.raises(InterruptedError):
        retry_blocking("redis", flaky.now, deadline_s=60, between=stop)
    assert flaky.calls == 1


def test_a_read_that_works_does_not_make_healthy_a_server_whose_writes_still_fail() -> None:
    """The geofence poll's read succeeded every 2 s while every batch write waited out a read-only
    Postgres (or a missing partition): /healthz flapped to 200 with nothing stored. The server stays
    down until the last retry loop waiting on it succeeds."""
    reach = Reachability("c-0")
    reach.mark("postgres", True)
    read_only = psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction")

    async def scenario() -> list[bool]:
        seen = []
        write = asyncio.create_task(retry("postgres", reach, Flaky(*[read_only] * 4)))
        deadline = asyncio.get_running_loop().time() + 10
        while not reach.waiting["postgres"]:  # until the write has failed and backs off
            assert asyncio.get_running_loop().time() < deadline, "the write never backed off"
            await asyncio.sleep(0.001)
        seen.append(reach.ok["postgres"])
        assert await attempt("postgres", reach, Flaky())  # the poll's read works
        seen.append(reach.ok["postgres"])
        assert await write == "done"
        seen.append(reach.ok["postgres"])
        return seen

    assert asyncio.run(scenario()) == [False, False, True]
    assert reach.waiting["postgres"] == 0


def test_a_long_outage_is_logged_again(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """One line at the start of an outage said nothing of a stall that went on for ten minutes."""
    from common import retry as retry_module

    clock = [100.0]
    monkeypatch.setattr(retry_module.time, "monotonic", lambda: clock[0])
    reach = Reachability("c-0")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            reach.failed("postgres", psycopg.OperationalError("no partition"))
            clock[0] += retry_module.STILL_LOGGED_S / 2 + 1
    assert [r.getMessage() for r in caplog.records] == ["postgres unavailable, pausing", "postgres still unavailable"]
