"""Failure counts against real Redis: one failure per entry per write attempt, however often it is sent."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis

from common.config import Settings
from common.keys import failures_key
from shard.dead_letters import DeadLetter
from shard.failures import FAILURES_TTL_S, FailureCounts, new_attempt
from shard.stream import ConsumerStream

T = TypeVar("T")


def with_counts(settings: Settings, use: Callable[[FailureCounts, ConsumerStream], Awaitable[T]]) -> T:
    """Run `use` with the failure counts and the consumer stream of consumer t-0, on one event loop."""

    async def go() -> T:
        stream = ConsumerStream(settings, "t-0")
        try:
            return await use(FailureCounts(stream.redis, failures_key(settings.stream_key, settings.consumer_group)), stream)
        finally:
            await stream.close()

    return asyncio.run(go())


def test_the_same_attempt_counts_once_and_each_attempt_counts(redis_client: redis.Redis, stream_key, settings):
    """A call sent again (its reply lost) with the same token counts nothing more; a new attempt counts one more."""
    first, second = new_attempt(), new_attempt()

    async def use(counts: FailureCounts, _: ConsumerStream) -> list[list[int]]:
        return [
            await counts.count([b"1-1", b"1-2"], first),
            await counts.count([b"1-1", b"1-2"], first),  # the same attempt, sent again
            await counts.count([b"1-1"], second),
            await counts.count([b"1-1"], second),
            await counts.count([], second),
        ]

    try:
        assert with_counts(settings, use) == [[1, 1], [1, 1], [2], [2], []]
        key = failures_key(stream_key, "processor")
        assert 0 < redis_client.ttl(key) <= FAILURES_TTL_S
        assert FAILURES_TTL_S - redis_client.ttl(key) < 60
        assert set(redis_client.hkeys(key)) == {b"1-1", b"1-2"}, "the field is the entry id"
    finally:
        redis_client.delete(failures_key(stream_key, "processor"))


def test_a_plain_count_left_by_an_earlier_version_is_continued(redis_client: redis.Redis, stream_key, settings):
    key = failures_key(stream_key, "processor")
    redis_client.hset(key, b"1-1", 7)
    attempt = new_attempt()

    async def use(counts: FailureCounts, _: ConsumerStream) -> list[list[int]]:
        return [await counts.count([b"1-1"], attempt), await counts.count([b"1-1"], attempt)]

    try:
        assert with_counts(settings, use) == [[8], [8]]
    finally:
        redis_client.delete(key)


def test_dead_lettering_and_recovery_clear_an_entrys_count(redis_client: redis.Redis, stream_key, settings):
    """The dead-letter script and the settle step still HDEL the entry id from the hash."""
    key = failures_key(stream_key, "processor")
    redis_client.xgroup_create(stream_key, "processor", id="0", mkstream=True)
    dead_id = redis_client.xadd(stream_key, {"data": b"rejected"})
    recovered_id = redis_client.xadd(stream_key, {"data": b"stored at last"})
    other_id = redis_client.xadd(stream_key, {"data": b"still failing"})
    redis_client.xreadgroup("processor", "t-0", {stream_key: ">"})

    async def use(counts: FailureCounts, stream: ConsumerStream) -> int:
        await counts.count([dead_id, recovered_id, other_id], new_attempt())
        letter = DeadLetter(dead_id, [b"data", b"rejected"], "CheckViolation: no", "write", 1)
        return len(await stream.settle([recovered_id], [letter], [recovered_id]))

    try:
        assert with_counts(settings, use) == 1
        assert redis_client.hkeys(key) == [other_id]
        [(_, letter)] = redis_client.xrange(f"{stream_key}:dlq")
        assert letter[b"source_id"] == dead_id and letter[b"failures"] == b"1"
    finally:
        redis_client.delete(key)
