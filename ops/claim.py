"""`processor claim`: claim stuck entries now and process them through a shard's own pipeline.

The entries are claimed into consumer `<INSTANCE_ID>-claim`, which keeps a liveness key
while the command runs (else an instance's claimer would take them back as a dead
consumer's). What the command cannot finish stays pending on that consumer; once its key
has expired, the running instances claim it at their next pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import uvloop

from common.config import Settings
from common.errors import ConnectionRefusedForGood, ProcessorError
from common import refusals
from common.status import StatusBoard
from shard.lifecycle import Shard
from shard.stream import Entry

CLAIM_DEADLINE_S = 300.0


def claim_now(settings: Settings, min_idle_ms: int | None, from_consumer: str | None) -> dict[str, int]:
    """Claim (XAUTOCLAIM, or one consumer's entries) and process them; returns the counts."""
    shard = Shard(settings, 0, StatusBoard(1), consumer=f"{settings.instance_id}-claim")
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
    alive = asyncio.create_task(shard.duties.keep_alive())
    try:
        await shard.join()
        writing = asyncio.create_task(shard.pipeline.run())
        feeding = asyncio.create_task(_feed(shard, min_idle_ms, from_consumer))
        # Whichever fails first ends both: a failed write must not leave the feeder waiting.
        await asyncio.wait({writing, feeding}, return_when=asyncio.FIRST_EXCEPTION)
        for task in (writing, feeding):
            if task.done() and task.exception() is not None:
                writing.cancel()
                feeding.cancel()
                raise task.exception()  # type: ignore[misc]
        await writing
    finally:
        alive.cancel()
        await shard.close()
    return {
        "claimed": shard.report.claimed,
        "stored": shard.report.processed,
        "dead_lettered": shard.report.dead_lettered,
        "expired": shard.report.expired,
        "gone": shard.claimer.gone,
    }


async def _feed(shard: Shard, min_idle_ms: int | None, from_consumer: str | None) -> None:
    async for entries in _pages(shard, min_idle_ms, from_consumer):
        await shard.pipeline.submit(entries, claimed=True)
    await shard.pipeline.end_input()


def _pages(shard: Shard, min_idle_ms: int | None, from_consumer: str | None) -> AsyncIterator[list[Entry]]:
    if from_consumer is not None:
        return shard.claimer.pending_of(from_consumer, min_idle_ms or 0)
    return shard.claimer.idle_entries(min_idle_ms)
