# NOTE FOR THE ENGINEER REBUILDING `processor claim`: the ops/ engineer (issue 8, CLI move)
# overwrote this file by mistake while creating ops/ modules; your version was lost. What
# follows is only a placeholder: shard/oneshot.py as committed at HEAD (5e6f33f), which you
# deleted. Please restore your own ops/claim.py. The command's parser and output live in
# ops/claim_command.py, which calls `from ops.claim import claim_now` lazily.
"""`processor claim`: claim stuck entries now and process them through the shard's own path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import uvloop

from common.config import Settings
from common.errors import ProcessorError
from common.status import StatusBoard
from shard.batch import decode_batch
from shard.stream import Entry
from shard.worker import Shard

CLAIM_DEADLINE_S = 300.0


def claim_now(settings: Settings, min_idle_ms: int | None, from_consumer: str | None) -> dict[str, int]:
    """Claim (XAUTOCLAIM, or one consumer's entries) into consumer `<INSTANCE_ID>-claim` and process them.

    What this process cannot finish stays pending on that consumer, which has no liveness
    key, so the running instances claim it at their next pass.
    """
    shard = Shard(settings, 0, StatusBoard(1))
    shard.consumer = f"{settings.instance_id}-claim"
    try:
        return uvloop.run(asyncio.wait_for(_claim(shard, min_idle_ms, from_consumer), CLAIM_DEADLINE_S))
    except asyncio.TimeoutError:
        raise ProcessorError(f"claiming did not finish within {CLAIM_DEADLINE_S:.0f}s; what is left stays pending") from None


async def _claim(shard: Shard, min_idle_ms: int | None, from_consumer: str | None) -> dict[str, int]:
    shard.open()
    alive = asyncio.create_task(shard.keep_alive())  # or shard 0 of an instance would claim from us
    try:
        await shard.retry("redis", shard.stream.ensure_group)
        await shard.retry("postgres", shard.geofences.refresh)
        async for entries in _pages(shard, min_idle_ms, from_consumer):
            shard.claimed += len(entries)
            shard.in_flight.update(entry_id for entry_id, _ in entries)
            await shard.process(decode_batch(entries, shard.settings.max_failures))
        await shard.flush()
    finally:
        alive.cancel()
        await shard.close()
    return {
        "claimed": shard.claimed,
        "stored": shard.processed,
        "dead_lettered": shard.dead_lettered,
        "gone": shard.claimer.gone,
    }


def _pages(shard: Shard, min_idle_ms: int | None, from_consumer: str | None) -> AsyncIterator[list[Entry]]:
    if from_consumer is not None:
        return shard.claimer.pending_of(from_consumer, min_idle_ms or 0)
    return shard.claimer.idle_entries(min_idle_ms)
