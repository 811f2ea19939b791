"""The claimer against a real Redis: dead consumers, idle entries, deleted entries, forgetting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis

from common.config import Settings
from common.keys import liveness_key
from common.timing import LIVENESS_TTL_S
from shard.claim import Claimer
from shard.stream import ConsumerStream


def setup_pending(client: redis.Redis, stream: str, consumer: str, n: int) -> list[bytes]:
    client.xgroup_create(stream, "processor", id="0", mkstream=True)
    ids = [client.xadd(stream, {"data": b"{}"}) for _ in range(n)]
    client.xreadgroup("processor", consumer, {stream: ">"}, count=n)
    return ids


async def collect(pages: AsyncIterator[list]) -> list[bytes]:
    return [entry_id async for page in pages for entry_id, _ in page]


def run_claimer(settings: Settings, action: str) -> tuple[list[bytes], int]:
    async def go() -> tuple[list[bytes], int]:
        stream = ConsumerStream(settings, "survivor-0")
        claimer = Claimer(settings, stream)
        try:
            claimed = await collect(getattr(claimer, action)())
            return claimed, claimer.gone
        finally:
            await stream.close()

    return asyncio.run(go())


def forget_idle(settings: Settings) -> list[str]:
    """What one forget_idle_consumers pass of a claimer (consumer survivor-0) removed."""

    async def go() -> list[str]:
        stream = ConsumerStream(settings, "survivor-0")
        try:
            return await Claimer(settings, stream).forget_idle_consumers()
        finally:
            await stream.close()

    return asyncio.run(go())


def age_entries(client: redis.Redis, stream: str, consumer: str, idle_ms: int) -> None:
    """Make pending entries look idle for `idle_ms` (XCLAIM back to the owner with IDLE)."""
    ids = [p["message_id"] for p in client.xpending_range(stream, "processor", "-", "+", 100_000, consumername=consumer)]
    client.xclaim(stream, "processor", consumer, 0, ids, idle=idle_ms, justid=True)


def test_live_consumer_is_not_robbed(redis_client, stream_key, settings):
    """A consumer whose liveness key exists keeps its entries, even when they are idle (below the threshold)."""
    setup_pending(redis_client, stream_key, "slow-0", 5)
    redis_client.set(liveness_key(stream_key, "slow-0"), b"1", ex=30)
    age_entries(redis_client, stream_key, "slow-0", 5_000)
    assert run_claimer(settings, "from_dead") == ([], 0)
    assert run_claimer(settings, "idle_entries") == ([], 0)  # threshold is 60 s
    assert redis_client.xpending(stream_key, "processor")["consumers"] == [{"name": b"slow-0", "pending": 5}]


def test_dead_consumer_entries_are_claimed_at_once(redis_client, stream_key, settings):
    """Without a liveness key, a consumer's entries move to us without waiting for the threshold."""
    ids = setup_pending(redis_client, stream_key, "dead-0", 7)
    age_entries(redis_client, stream_key, "dead-0", 2_000)
    claimed, gone = run_claimer(settings, "from_dead")
    assert sorted(claimed) == sorted(ids) and gone == 0
    assert redis_client.xpending(stream_key, "processor")["consumers"] == [{"name": b"survivor-0", "pending": 7}]


def test_idle_entries_past_the_threshold_are_claimed_page_by_page(redis_client, stream_key, env):
    """The idle pass pages through the whole pending list, whatever the page size."""
    settings = Settings.from_env({**env, "CLAIM_THRESHOLD_MS": "1000", "BATCH_SIZE": "3"})
    ids = setup_pending(redis_client, stream_key, "slow-0", 10)
    redis_client.set(liveness_key(stream_key, "slow-0"), b"1", ex=30)
    age_entries(redis_client, stream_key, "slow-0", 1_500)
    claimed, _ = run_claimer(settings, "idle_entries")
    assert sorted(claimed) == sorted(ids)


def test_deleted_entries_are_counted_and_leave_the_pending_list(redis_client, stream_key, settings):
    """Entries deleted while pending are not returned; they are counted and no longer pending."""
    ids = setup_pending(redis_client, stream_key, "dead-0", 4)
    age_entries(redis_client, stream_key, "dead-0", 2_000)
    redis_client.xdel(stream_key, ids[0], ids[1])
    claimed, gone = run_claimer(settings, "from_dead")
    assert sorted(claimed) == sorted(ids[2:]) and gone == 2
    assert redis_client.xpending(stream_key, "processor")["pending"] == 2


def test_a_live_consumers_deleted_entries_are_left_to_it(redis_client, stream_key, env):
    """Redis 7.0's XAUTOCLAIM drops every deleted entry it passes from the pending list, however briefly
    pending: a live shard's in-flight entries XDELed mid-batch were counted lost though it stored them.
    The idle pass looks only at entries past the threshold: the owner keeps the rest, and ACKs them."""
    settings = Settings.from_env({**env, "CLAIM_THRESHOLD_MS": "1000"})
    ids = setup_pending(redis_client, stream_key, "busy-0", 6)
    redis_client.set(liveness_key(stream_key, "busy-0"), b"1", ex=30)
    age_entries(redis_client, stream_key, "busy-0", 1_500)  # stuck: claimed, the deleted one counted
    fresh = setup_more(redis_client, stream_key, "busy-0", 3)  # in flight: left alone, deleted or not
    redis_client.xdel(stream_key, ids[0], fresh[0])
    claimed, gone = run_claimer(settings, "idle_entries")
    assert sorted(claimed) == sorted(ids[1:]) and gone == 1
    assert int(redis_client.get(f"{stream_key}:group:processor:lost") or 0) == 1
    pending = redis_client.xpending_range(stream_key, "processor", "-", "+", 100, consumername="busy-0")
    assert sorted(p["message_id"] for p in pending) == sorted(fresh)


def setup_more(client: redis.Redis, stream: str, consumer: str, n: int) -> list[bytes]:
    ids = [client.xadd(stream, {"data": b"{}"}) for _ in range(n)]
    client.xreadgroup("processor", consumer, {stream: ">"}, count=n)
    return ids


def test_only_dead_idle_consumers_without_pending_are_forgotten(redis_client, stream_key, env):
    """forget_idle_consumers removes dead, empty, long-idle consumers and never one holding entries."""
    settings = Settings.from_env({**env, "CLAIM_THRESHOLD_MS": "1"})
    setup_pending(redis_client, stream_key, "holding-0", 2)
    redis_client.xgroup_createconsumer(stream_key, "processor", "empty-0")
    redis_client.xgroup_createconsumer(stream_key, "processor", "alive-0")
    redis_client.set(liveness_key(stream_key, "alive-0"), b"1", ex=30)

    def idle_past_limit() -> bool:
        return all(c["idle"] >= 10 for c in redis_client.xinfo_consumers(stream_key, "processor"))

    from tests.e2e.processes import wait_for

    wait_for(idle_past_limit, 5, what="consumers idle past 10 thresholds")

    assert forget_idle(settings) == ["empty-0"]
    names = {c["name"] for c in redis_client.xinfo_consumers(stream_key, "processor")}
    assert names == {b"holding-0", b"alive-0"}


def test_deleted_entries_are_counted_once_in_redis_and_in_the_log(redis_client, stream_key, settings):
    """Both claim scripts: deleted pending entries reach `<STREAM_KEY>:lost` and the callback once, even when claimed twice."""
    ids = setup_pending(redis_client, stream_key, "dead-0", 6)
    age_entries(redis_client, stream_key, "dead-0", 2_000)
    redis_client.xdel(stream_key, ids[0], ids[3])
    reported: list[bytes] = []

    async def go() -> None:
        stream = ConsumerStream(settings, "survivor-0")
        try:
            claimer = Claimer(settings, stream, lambda gone, how: reported.extend(gone))
            await collect(claimer.pending_of("dead-0", 1_000))
            # A second claimer that listed the same ids before the first one claimed them: nothing more is counted.
            again, gone = await claimer._claim(keys=[stream_key, f"{stream_key}:group:processor:lost"], args=["processor", "other-0", 0, *ids])
            assert gone == [] and len(again) == 4
        finally:
            await stream.close()

    asyncio.run(go())
    assert sorted(reported) == sorted([ids[0], ids[3]])
    assert int(redis_client.get(f"{stream_key}:group:processor:lost")) == 2
    # One more deleted while pending, found by the idle pass.
    age_entries(redis_client, stream_key, "other-0", 2_000)  # the second claimer holds them all now
    redis_client.xdel(stream_key, ids[4])
    claimed, gone = run_claimer(Settings.from_env({**settings_env(settings), "CLAIM_THRESHOLD_MS": "1000"}), "idle_entries")
    assert gone == 1 and ids[4] not in claimed
    assert int(redis_client.get(f"{stream_key}:group:processor:lost")) == 3


def settings_env(settings: Settings) -> dict[str, str]:
    return {"REDIS_URL": settings.redis_url, "STREAM_KEY": settings.stream_key, "INSTANCE_ID": settings.instance_id}


def test_gone_pending_entries_are_acked_and_counted_once(redis_client, stream_key, settings):
    """ack_gone counts only the ids its XACK removed, so a retried call or a late second caller adds nothing."""
    ids = setup_pending(redis_client, stream_key, "c-0", 3)
    redis_client.xdel(stream_key, ids[1])

    async def go() -> tuple[int, int]:
        stream = ConsumerStream(settings, "c-0")
        try:
            return await stream.ack_gone([ids[1]]), await stream.ack_gone([ids[1]])
        finally:
            await stream.close()

    assert asyncio.run(go()) == (1, 0)
    assert int(redis_client.get(f"{stream_key}:group:processor:lost")) == 1
    assert redis_client.xpending(stream_key, "processor")["pending"] == 2


def test_a_stream_or_group_that_is_gone_has_nothing_to_claim(redis_client, stream_key, settings):
    """The stream deleted, or Redis restarted without its data: Redis answers `no such key` or
    NOGROUP, and a claim pass finds nothing rather than failing (it was a shard panic, exit 70,
    and three in a minute halted the instance). The reader creates both again at its next read."""
    for setup in ("no stream", "no group"):
        redis_client.delete(stream_key)
        if setup == "no group":
            redis_client.xadd(stream_key, {"data": b"{}"})

        async def go() -> tuple[list[bytes], list[bytes], list[bytes], list[str]]:
            stream = ConsumerStream(settings, "survivor-0")
            claimer = Claimer(settings, stream)
            try:
                return (
                    await collect(claimer.from_dead()), await collect(claimer.idle_entries(0)),
                    await collect(claimer.pending_of("dead-0", 0)), await claimer.forget_idle_consumers(),
                )
            finally:
                await stream.close()

        assert asyncio.run(go()) == ([], [], [], []), setup


def test_a_redis_stall_that_let_liveness_keys_lapse_robs_no_live_consumer(redis_client, stream_key, settings):
    """After Redis stalled longer than the TTL, every key lapsed, the live consumers' too: none
    is taken for dead until they have had a TTL to refresh theirs."""
    ids = setup_pending(redis_client, stream_key, "other-0", 3)
    age_entries(redis_client, stream_key, "other-0", 2_000)  # its key lapsed in the stall: none set
    now = [1_000.0]

    async def go() -> tuple[list[bytes], list[bytes]]:
        stream = ConsumerStream(settings, "survivor-0")
        claimer = Claimer(settings, stream)
        claimer.clock = lambda: now[0]
        try:
            await claimer.keep_alive()
            now[0] += LIVENESS_TTL_S + 10  # the stall: our next refresh returns this late
            await claimer.keep_alive()
            during = await collect(claimer.from_dead())
            for _ in range(LIVENESS_TTL_S):  # refreshed every second for a TTL: the other had time too
                now[0] += 1
                await claimer.keep_alive()
            return during, await collect(claimer.from_dead())
        finally:
            await stream.close()

    during, after = asyncio.run(go())
    assert during == [], "robbed a consumer Redis kept from refreshing its key"
    assert sorted(after) == sorted(ids), "still dead a TTL later: claimed"


def test_consumers_whose_names_are_not_utf8_are_claimed_from_and_forgotten(redis_client, stream_key, env):
    """Redis names are bytes: a dead consumer named b"t\\xe9l\\xe9" (another tool's, in our group) has
    its entries claimed, and, empty and idle, is forgotten by that name (logged escaped)."""
    settings = Settings.from_env({**env, "CLAIM_THRESHOLD_MS": "1"})
    ids = setup_pending(redis_client, stream_key, b"t\xe9l\xe9", 3)
    age_entries(redis_client, stream_key, b"t\xe9l\xe9", 2_000)
    claimed, gone = run_claimer(settings, "from_dead")
    assert sorted(claimed) == sorted(ids) and gone == 0

    from tests.e2e.processes import wait_for

    wait_for(lambda: all(c["idle"] >= 10 for c in redis_client.xinfo_consumers(stream_key, "processor")), 5,
             what="consumers idle past 10 thresholds")
    assert forget_idle(settings) == ["t\\xe9l\\xe9"]
    assert [c["name"] for c in redis_client.xinfo_consumers(stream_key, "processor")] == [b"survivor-0"]


@pytest.mark.parametrize("action", ["from_dead", "idle_entries"])
def test_a_page_beyond_what_lua_can_unpack_is_claimed_whole(redis_client, stream_key, env, action):
    """BATCH_SIZE may reach 100,000: a page of 10,000 ids is more than Lua's unpack takes (~8,000)."""
    settings = Settings.from_env({**env, "CLAIM_THRESHOLD_MS": "1000", "BATCH_SIZE": "20000"})
    redis_client.xgroup_create(stream_key, "processor", id="0", mkstream=True)
    pipe = redis_client.pipeline(transaction=False)
    for _ in range(10_000):
        pipe.xadd(stream_key, {"data": b"{}"})
    ids = pipe.execute()
    redis_client.xreadgroup("processor", "dead-0", {stream_key: ">"}, count=10_000)
    age_entries(redis_client, stream_key, "dead-0", 2_000)
    redis_client.xdel(stream_key, ids[0])
    claimed, gone = run_claimer(settings, action)
    assert sorted(claimed) == sorted(ids[1:]) and gone == 1


def test_two_processes_refreshing_one_liveness_key_are_reported(redis_client, stream_key, settings, caplog):
    """Two instances with the same INSTANCE_ID consume as the same consumers: each refresh finding
    the other's mark in the key says so (the first refresh may find our own previous life's)."""
    async def go() -> None:
        first, second = ConsumerStream(settings, "twin-0"), ConsumerStream(settings, "twin-0")
        a, b = Claimer(settings, first), Claimer(settings, second)
        try:
            await a.keep_alive()
            await a.keep_alive()
            assert not [r for r in caplog.records if r.levelname == "ERROR"], "alone: nothing to say"
            await b.keep_alive()  # b's first refresh: the key might be its own previous life's
            await a.keep_alive()
        finally:
            await first.close()
            await second.close()

    caplog.set_level("INFO", logger="processor")
    asyncio.run(go())
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "INSTANCE_ID" in errors[0].getMessage(), [r.getMessage() for r in errors]
