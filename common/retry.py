"""The one retry loop: an outage pauses with backoff, a refusal ends in exit 78, the rest propagates.

Shards use `retry` (asyncio) around every call to Redis or Postgres; the supervisor uses
`retry_blocking` for its start-up checks, with a deadline. Both ask `common.faults.classify`
what an exception means.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from common.backoff import Backoff
from common.errors import ConnectionRefusedForGood, ProcessorError
from common.faults import Outcome, classify, one_line, untrusted_certificate

T = TypeVar("T")
SERVERS = ("redis", "postgres")
RETRY_BASE_S = 0.1
RETRY_CAP_S = 5.0
STILL_LOGGED_S = 60.0  # a long outage is logged again this often

log = logging.getLogger("processor.retry")


class ServerUnreachable(ProcessorError):
    """A server did not answer within the start-up deadline (exit 1: the container restarts)."""


class Reachability:
    """Whether each server answered the last call, with one log line per outage each way.

    `outages[server]` counts failed calls; a reader compares it before and after a read to
    learn that the read's reply may have been lost. A server stays down while any `retry`
    loop sleeps out a failure of it: a periodic read that works (the geofence poll) does not
    make a server healthy whose writes fail (read-only, a partition missing, a timeout).
    """

    def __init__(
        self,
        name: str,
        on_change: Callable[[], None] = lambda: None,
        on_failure: Callable[[str, BaseException], None] = lambda server, exc: None,
    ) -> None:
        self.name = name  # who is speaking in the logs, e.g. the consumer
        self.on_change = on_change
        self.on_failure = on_failure  # every failed call, with its server and error
        self.ok = {server: False for server in SERVERS}
        self.outages = {server: 0 for server in SERVERS}
        self.waiting = {server: 0 for server in SERVERS}  # retry loops sleeping in their backoff
        self._logged: dict[str, float | None] = {server: None for server in SERVERS}  # when the outage was logged

    def failed(self, server: str, exc: BaseException) -> None:
        self.outages[server] += 1
        self.on_failure(server, exc)
        logged = self._logged[server]
        if logged is None or time.monotonic() - logged >= STILL_LOGGED_S:
            # Once per outage (and again each STILL_LOGGED_S), not per caller: the read and the
            # ACK fail at the same moment.
            message = f"{server} unavailable, pausing" if logged is None else f"{server} still unavailable"
            log.warning(message, extra={"consumer": self.name, "error": one_line(exc)})
            self._logged[server] = time.monotonic()
        self.mark(server, False)

    def recovered(self, server: str, attempts: int) -> None:
        self.mark(server, True, attempts)

    def mark(self, server: str, ok: bool, attempts: int | None = None) -> None:
        if ok and self.waiting[server]:
            return  # another call still sleeps out this server's failure
        if ok and self._logged[server] is not None:
            log.warning(f"{server} reachable again", extra={"consumer": self.name, "attempts": attempts})
            self._logged[server] = None
        if self.ok[server] != ok:
            self.ok[server] = ok
            self.on_change()


def refused(server: str, exc: BaseException) -> ProcessorError:
    """The exception to raise for a REFUSED outcome: a one-line configuration error (exit 78)."""
    if isinstance(exc, ProcessorError):
        return exc
    untrusted = untrusted_certificate(exc)
    if untrusted is not None:
        return ConnectionRefusedForGood(f"TLS certificate of {server} not trusted: {untrusted}")
    return ConnectionRefusedForGood(f"{server} refused: {one_line(exc)}")


def raise_unless_outage(server: str, exc: Exception) -> None:
    """Return when `exc` is an outage (worth waiting out); a refusal is raised as exit 78, anything else as it is."""
    outcome = classify(exc)
    if outcome is Outcome.REFUSED:
        raise refused(server, exc) from exc
    if outcome is not Outcome.OUTAGE:
        raise exc


async def retry(
    server: str, reach: Reachability, operation: Callable[..., Awaitable[T]], *args: object
) -> T:
    """Run `operation` until it succeeds; only an outage is retried."""
    # Made at the first failure: a Backoff seeds its own generator from os.urandom (so that
    # forked shards do not jitter in step), ~15 µs that every batch's calls would pay.
    backoff: Backoff | None = None
    while True:
        try:
            result = await operation(*args)
        except Exception as exc:
            raise_unless_outage(server, exc)
            reach.failed(server, exc)
            backoff = backoff or Backoff(base_s=RETRY_BASE_S, cap_s=RETRY_CAP_S)
            # Counted only while asleep: an operation that never returns once it works (a
            # subscription) must not hold its server down for ever.
            reach.waiting[server] += 1
            try:
                await asyncio.sleep(backoff.next_delay())
            finally:
                reach.waiting[server] -= 1
            continue
        reach.recovered(server, backoff.failures if backoff is not None else 0)
        return result


def retry_blocking(
    server: str,
    operation: Callable[..., T],
    *args: object,
    deadline_s: float,
    between: Callable[[], None] = lambda: None,
) -> T:
    """Run `operation` until it succeeds or `deadline_s` passes; `between` runs before each wait
    (the supervisor handles signals there, and may raise to give up). `server` names the
    server in messages, e.g. "Postgres at DATABASE_URL"."""
    deadline = time.monotonic() + deadline_s
    backoff = Backoff(base_s=0.2, cap_s=RETRY_CAP_S)
    while True:
        try:
            return operation(*args)
        except Exception as exc:
            raise_unless_outage(server, exc)
            between()
            if time.monotonic() >= deadline:
                raise ServerUnreachable(f"{server} unreachable after {deadline_s:.0f}s: {one_line(exc)}") from exc
            if backoff.failures == 0:
                log.warning(f"{server} unreachable, waiting", extra={"error": one_line(exc)})
            time.sleep(backoff.next_delay())


async def attempt(server: str, reach: Reachability, operation: Callable[..., Awaitable[object]], *args: object) -> bool:
    """One call of a periodic duty: an outage marks the server down and returns False (the
    duty tries again at its next tick); a refusal raises; anything else propagates."""
    try:
        await operation(*args)
    except Exception as exc:
        raise_unless_outage(server, exc)
        log.debug(f"{server} call failed; next tick tries again", extra={"consumer": reach.name, "error": one_line(exc)})
        reach.mark(server, False)
        return False
    reach.mark(server, True)
    return True
