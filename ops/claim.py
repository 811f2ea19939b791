"""`processor claim`: claim stuck entries now and process them through a shard's own pipeline.

The entries are claimed into consumer `<INSTANCE_ID>-claim`, which keeps a liveness key
while the command runs (else an instance's claimer would take them back as a dead
consumer's). What the command cannot finish stays pending on that consumer; once its key
has expired, the running instances claim it at their next pass.

The shard's code waits out an outage for as long as it lasts; the command gives up on a
server that stays unreachable for UNREACHABLE_AFTER_S, as the other commands do (exit 1).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import uvloop

from common.config import Settings, redact_url
from common.errors import ConnectionRefusedForGood, ProcessorError
from common import refusals
from common.faults import one_line
from common.retry import Reachability
from common.status import StatusBoard
from common.tasks import cancel_and_wait
from ops.errors import CONNECT_TIMEOUT_S, POSTGRES, REDIS, translate
from shard.lifecycle import Shard
from shard.reporting import POSTGRES_STALLED_S
from shard.stream import Entry

CLAIM_DEADLINE_S = 300.0
UNREACHABLE_AFTER_S = float(CONNECT_TIMEOUT_S)  # as long as the other commands wait to connect


class Impatient(Reachability):
    """A shard's Reachability that raises once a server has been unreachable UNREACHABLE_AFTER_S.

    Every retry loop of the shard reports its failures here, so raising here ends whichever
    loop is waiting, and the command with it.
    """

    def __init__(self, name: str, on_change: Callable[[], None], settings: Settings) -> None:
        super().__init__(name, on_change)
        self.urls = {"redis": (REDIS, settings.redis_url, "cannot reach"),
                     "postgres": (POSTGRES, settings.database_url, "cannot connect to")}
        self.down_since: dict[str, float] = {}

    def failed(self, server: str, exc: BaseException) -> None:
        super().failed(server, exc)
        since = self.down_since.setdefault(server, time.monotonic())
        if time.monotonic() - since >= UNREACHABLE_AFTER_S:
            name, url, unreachable = self.urls[server]
            error = translate(name, url, exc, unreachable=unreachable) if isinstance(exc, Exception) else None
            raise error or ProcessorError(f"{name} unreachable: {one_line(exc)}")

    def recovered(self, server: str, attempts: int) -> None:
        self.down_since.pop(server, None)
        super().recovered(server, attempts)


def claim_now(settings: Settings, min_idle_ms: int | None, from_consumer: str | None) -> dict[str, int]:
    """Claim (every consumer's entries idle enough, or one consumer's) and process them; returns the counts."""
    shard = Shard(settings, 0, StatusBoard(1), consumer=f"{settings.instance_id}-claim")
    # Before anything runs: the parts this command uses (pipeline, claimer) look the Reachability
    # up on the report at each call. (The stream reader keeps its own; the command does not run it.)
    shard.report.reach = Impatient(shard.consumer, shard.report.publish, settings)
    try:
        return uvloop.run(asyncio.wait_for(_claim(shard, min_idle_ms, from_consumer), CLAIM_DEADLINE_S))
    except asyncio.TimeoutError:
        raise ProcessorError(f"claiming did not finish within {CLAIM_DEADLINE_S:.0f}s; what is left stays pending") from None
    except Exception as exc:
        # The claim runs a shard's own code, outside the commands' error boundary: name a refusal here.
        denied = refusals.describe(exc, redis_url=settings.redis_url, database_url=settings.database_url)
        if denied is None:
            raise
        raise ConnectionRefusedForGood(denied) from None


async def _claim(shard: Shard, min_idle_ms: int | None, from_consumer: str | None) -> dict[str, int]:
    duties = [asyncio.create_task(shard.duties.keep_alive()), asyncio.create_task(_watch_writes(shard))]
    tasks = [*duties]
    try:
        await shard.join()
        writing = asyncio.create_task(shard.pipeline.run())
        feeding = asyncio.create_task(_feed(shard, min_idle_ms, from_consumer))
        tasks += [writing, feeding]
        await _until_done([writing, feeding], duties)
    finally:
        await _stopped(tasks)
        await shard.close()
    return {
        "claimed": shard.report.claimed,
        "stored": shard.report.processed,
        "dead_lettered": shard.report.dead_lettered,
        "expired": shard.report.expired,
        "gone": shard.claimer.gone,
    }


async def _until_done(work: list[asyncio.Task[None]], duties: list[asyncio.Task[None]]) -> None:
    """Until every task of `work` is done. Whichever of them fails first raises here, and so
    does a duty failing (without the liveness key, the instances would claim the entries back;
    a write unanswered is a Postgres gone)."""
    waiting: set[asyncio.Task[None]] = {*work, *duties}
    while not all(task.done() for task in work):
        done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()


async def _watch_writes(shard: Shard) -> None:
    """A batch write Postgres leaves unanswered (frozen, or cut off without a reset: no error ever
    comes back, so no retry loop counts a failure) ends the command as Postgres unreachable."""
    while True:
        await asyncio.sleep(1.0)
        if shard.report.postgres_stalled():
            url = redact_url(shard.settings.database_url)
            raise ProcessorError(
                f"cannot reach {POSTGRES} at {url}: a write got no answer within {POSTGRES_STALLED_S:.0f}s; "
                "what is left stays pending"
            )


async def _stopped(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the tasks and wait for them, their errors taken: a failure not raised already is
    one the command has no use for, and asyncio would log it with a traceback at exit."""
    await cancel_and_wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # taken, so that asyncio does not log it


async def _feed(shard: Shard, min_idle_ms: int | None, from_consumer: str | None) -> None:
    async for entries in _pages(shard, min_idle_ms, from_consumer):
        await shard.pipeline.submit(entries, claimed=True)
    await shard.pipeline.end_input()


def _pages(shard: Shard, min_idle_ms: int | None, from_consumer: str | None) -> AsyncIterator[list[Entry]]:
    if from_consumer is not None:
        return shard.claimer.pending_of(from_consumer, min_idle_ms or 0)
    return shard.claimer.idle_entries(min_idle_ms)
