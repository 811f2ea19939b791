"""A shard's reader and pipeline together (shard/sources.py, shard/intake.py), in one process:
every entry of a backlog, and of a trickle, is written, and a stop leaves nothing unread behind."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Iterator

import orjson
import pytest
import redis

from common.config import Settings
from common.status import StatusBoard
from shard.lifecycle import Shard
from supervisor.migrations import apply_migrations


@pytest.fixture(autouse=True)
def garbage_collection_restored() -> Iterator[None]:
    """Shard.work tunes the collector for a shard's life; this process lives on."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def add_fixes(client: redis.Redis, stream: str, first: int, count: int) -> None:
    with client.pipeline(transaction=False) as pipe:
        for n in range(first, first + count):
            pipe.xadd(stream, {b"data": orjson.dumps({"device_id": f"d{n % 50}", "ts": 1_000 * (n + 1), "lat": 45.0, "lon": 7.0})})
        pipe.execute()


async def until(condition: Callable[[], bool], seconds: float) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def run_shard(settings: Settings, feed: Callable[[Shard], object]) -> Shard:
    """Run a shard's work until `feed` (a coroutine function) returns, then stop it as SIGTERM does."""
    shard = Shard(settings, 0, StatusBoard(1), consumer="t-0")

    async def go() -> None:
        work = asyncio.create_task(shard.work())
        try:
            await feed(shard)  # type: ignore[misc]
            shard.handle_sigterm()
            await asyncio.wait_for(work, 30)
        finally:
            work.cancel()
            await shard.close()

    asyncio.run(go())
    return shard


async def backlog(client: redis.Redis, stream: str) -> None:
    add_fixes(client, stream, 0, 3_000)


async def trickle(client: redis.Redis, stream: str) -> None:
    for step in range(600):
        add_fixes(client, stream, step * 5, 5)
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("arrival", [backlog, trickle])
def test_every_entry_is_written_to_the_last(redis_client, database_url, stream_key, settings: Settings, arrival) -> None:  # type: ignore[no-untyped-def]
    apply_migrations(database_url)
    redis_client.xgroup_create(stream_key, "processor", id="0", mkstream=True)

    async def feed(shard: Shard) -> None:
        await arrival(redis_client, stream_key)
        await until(lambda: shard.report.processed == 3_000, 60)

    shard = run_shard(settings, feed)
    assert shard.report.processed == 3_000
    assert redis_client.xpending(stream_key, "processor")["pending"] == 0


def test_entries_of_a_read_cut_short_by_the_stop_are_written_before_the_shard_ends(
    redis_client, database_url, stream_key, settings: Settings
) -> None:
    """A stop cancels the blocking read under way; Redis may have answered it already, and its
    entries are then pending on this consumer: they are found and written in the drain."""
    apply_migrations(database_url)
    redis_client.xgroup_create(stream_key, "processor", id="0", mkstream=True)

    async def feed(shard: Shard) -> None:
        await until(lambda: shard.reader.read_task is not None and shard.reader.own_pending_done.is_set(), 10)
        # As if the blocking read's answer were lost to the cancellation: delivered to this consumer.
        add_fixes(redis_client, stream_key, 0, 3)
        delivered = redis_client.xreadgroup("processor", "t-0", {stream_key: ">"}, count=10)
        assert delivered  # and the rest went to the shard's blocking read, answered but not yet handled

    shard = run_shard(settings, feed)
    assert shard.report.processed == 3
    assert redis_client.xpending(stream_key, "processor")["pending"] == 0
