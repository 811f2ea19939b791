"""The shard's pipeline against real Redis and Postgres, driven through its public `submit`."""

from __future__ import annotations

import asyncio

import orjson
import psycopg
import pytest
import redis

from common.config import Settings
from common.errors import ConnectionRefusedForGood
from common.status import StatusBoard
from shard.lifecycle import Shard
from supervisor.migrations import apply_migrations


def fix(device: str, ts_ms: int, **extra: object) -> bytes:
    return orjson.dumps({"device_id": device, "ts": ts_ms, "lat": 45.0, "lon": 7.0, **extra})


def read_as(client: redis.Redis, stream: str, consumer: str, entries: list[dict[bytes, bytes]]) -> list:
    client.xgroup_create(stream, "processor", id="0", mkstream=True)
    for fields in entries:
        client.xadd(stream, fields)
    return client.xreadgroup("processor", consumer, {stream: ">"}, count=100)[0][1]


def run_pipeline(shard: Shard, batches: list[list], claimed: bool = False) -> None:
    async def go() -> None:
        writing = asyncio.create_task(shard.pipeline.run())
        for entries in batches:
            await shard.pipeline.submit(entries, claimed=claimed)
        await shard.pipeline.end_input()
        await writing
        await shard.close()

    asyncio.run(go())


def test_submitted_entries_are_stored_dead_lettered_and_acked(redis_client, database_url, stream_key, settings: Settings):
    """Valid fixes are stored once (a resent fix too), poison is dead-lettered with its fields, all are ACKed."""
    apply_migrations(database_url)
    entries = read_as(
        redis_client,
        stream_key,
        "t-0",
        [
            {b"data": fix("d1", 1_000)},
            {b"data": b"not json", b"extra": b"kept"},
            {b"data": fix("d1", 2_000)},
            {b"data": fix("d1", 1_000)},  # the device resent a fix
            {b"data": fix("d2", 1_000, lat=91)},
        ],
    )
    shard = Shard(settings, 0, StatusBoard(1), consumer="t-0")
    run_pipeline(shard, [entries[:3], entries[3:]])

    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT device_id, extract(epoch FROM ts)::int FROM positions ORDER BY 1, 2").fetchall()
    assert rows == [("d1", 1), ("d1", 2)]
    letters = redis_client.xrange(f"{stream_key}:dlq")
    assert [(f[b"source_id"], f[b"error_kind"]) for _, f in letters] == [(entries[1][0], b"decode"), (entries[4][0], b"validate")]
    assert letters[0][1][b"extra"] == b"kept"
    assert redis_client.xpending(stream_key, "processor")["pending"] == 0
    assert (shard.report.processed, shard.report.dead_lettered, shard.report.in_flight) == (3, 2, set())


def test_claimed_entries_already_in_flight_are_not_submitted_twice(redis_client, database_url, stream_key, settings: Settings):
    """A claim page that repeats entries this shard is writing adds nothing: counted once, stored once."""
    apply_migrations(database_url)
    entries = read_as(redis_client, stream_key, "t-0", [{b"data": fix("d1", ts)} for ts in (1_000, 2_000)])
    shard = Shard(settings, 0, StatusBoard(1), consumer="t-0")
    run_pipeline(shard, [entries, entries], claimed=True)
    assert shard.report.claimed == 2 and shard.report.processed == 2
    assert redis_client.xpending(stream_key, "processor")["pending"] == 0


def test_a_failed_write_ends_the_pipeline_though_only_batches_without_fixes_follow(
    redis_client, database_url, stream_key, settings: Settings
):
    """The write of the one batch with a fix is refused (the runtime role lost INSERT on
    positions) while the batch after it waits in the full intake, so the failed
    write's wake-up finds no room; the batches that follow hold only poison, so no later
    write would fail in its stead. `run` still ends with the refusal, and the fix stays
    pending rather than being acknowledged."""
    apply_migrations(database_url)
    entries = read_as(
        redis_client, stream_key, "t-0", [{b"data": fix("d1", 1_000)}, {b"data": b"poison 1"}, {b"data": b"poison 2"}]
    )
    shard = Shard(settings, 0, StatusBoard(1), consumer="t-0")
    writer = shard.pipeline.writer
    write_now = writer.write_isolating

    async def go() -> None:
        release = asyncio.Event()

        async def held_write(fixes, turn=None):  # type: ignore[no-untyped-def]
            await release.wait()
            return await write_now(fixes, turn)

        writer.write_isolating = held_write  # type: ignore[method-assign]
        running = asyncio.create_task(shard.pipeline.run())
        for batch in ([entries[0]], [entries[1]], [entries[2]]):
            await shard.pipeline.submit(batch)
        # The third submit returned: the second batch waits in the full intake, the third joined it.
        assert shard.pipeline.intake.queue.full() and not running.done()
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("REVOKE INSERT ON positions FROM processor_runtime")
        release.set()
        try:
            with pytest.raises(ConnectionRefusedForGood, match="permission denied for table positions"):
                await asyncio.wait_for(running, 30)
        finally:
            await shard.close()

    asyncio.run(go())
    pending = redis_client.xpending_range(stream_key, "processor", "-", "+", 10)
    assert entries[0][0] in [p["message_id"] for p in pending]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM positions").fetchone() == (0,)


def test_io_numbers_are_stored_exactly_as_sent(redis_client, database_url, stream_key, settings: Settings) -> None:
    """SPEC §2: `io` is stored as positions.attributes. A float64 would round a 20-digit ICCID sent
    as a number, a long decimal, or 1e-400; jsonb keeps every one of them as written."""
    apply_migrations(database_url)
    io = (b'{"iccid":89014103211118510720,"u":18446744073709551616,"n":-9223372036854775809,'
          b'"d":0.12345678901234567890123,"tiny":1e-400,"imei":"356938035643809123","small":1.5}')
    data = b'{"device_id":"iccid-1","ts":1764000000000,"lat":1,"lon":1,"io":' + io + b"}"
    entries = read_as(redis_client, stream_key, "t-0", [{b"data": data}])
    run_pipeline(Shard(settings, 0, StatusBoard(1), consumer="t-0"), [entries])
    with psycopg.connect(database_url) as conn:
        stored = conn.execute("SELECT attributes::text FROM positions UNION ALL SELECT attributes::text FROM last_position").fetchall()
        exact = conn.execute("SELECT %s::jsonb::text", (io.decode(),)).fetchone()[0]  # what Postgres makes of the text sent
    assert "89014103211118510720" in exact and "0.12345678901234567890123" in exact
    assert stored == [(exact,), (exact,)]


def held_writes(shard: Shard) -> tuple[list[int], asyncio.Event]:
    """The writer's batches wait for the event before they are written; returns their sizes as they start."""
    writer = shard.pipeline.writer
    write_now = writer.write_isolating
    sizes: list[int] = []
    release = asyncio.Event()

    async def held_write(fixes, turn=None):  # type: ignore[no-untyped-def]
        sizes.append(len(fixes))
        await release.wait()
        return await write_now(fixes, turn)

    writer.write_isolating = held_write  # type: ignore[method-assign]
    return sizes, release


async def until(condition, seconds: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def test_a_trickle_arriving_during_a_write_is_written_as_one_batch_after_it(
    redis_client, database_url, stream_key, settings: Settings
):
    """Thirty entries submitted one at a time while a batch is being written wait as one batch,
    written in one transaction once the first has ended: not one transaction each, nor two at once."""
    apply_migrations(database_url)
    entries = read_as(redis_client, stream_key, "t-0", [{b"data": fix("d1", 1_000 * (n + 1))} for n in range(31)])
    shard = Shard(settings, 0, StatusBoard(1), consumer="t-0")
    sizes, release = held_writes(shard)

    async def go() -> None:
        running = asyncio.create_task(shard.pipeline.run())
        await shard.pipeline.submit(entries[:1])
        await until(lambda: sizes == [1])
        for entry in entries[1:]:
            await asyncio.wait_for(shard.pipeline.submit([entry]), 5)  # never held up by the write
        for _ in range(20):
            await asyncio.sleep(0)
        assert sizes == [1]  # the second waits for the first to end
        release.set()
        await shard.pipeline.end_input()
        await asyncio.wait_for(running, 30)
        await shard.close()

    asyncio.run(go())
    assert sizes == [1, 30]
    assert (shard.report.batches, shard.report.processed) == (2, 31)
    assert redis_client.xpending(stream_key, "processor")["pending"] == 0


def test_a_backlog_keeps_two_batches_being_written(redis_client, database_url, stream_key, settings: Settings):
    """Batches of a quarter of BATCH_SIZE or more do not wait for the one before them to commit."""
    apply_migrations(database_url)
    size = settings.batch_size // 4
    fields = [{b"data": fix(f"d{n % 7}", 1_000 * (n + 1))} for n in range(2 * size)]
    redis_client.xgroup_create(stream_key, "processor", id="0", mkstream=True)
    for item in fields:
        redis_client.xadd(stream_key, item)
    entries = redis_client.xreadgroup("processor", "t-0", {stream_key: ">"}, count=len(fields))[0][1]
    shard = Shard(settings, 0, StatusBoard(1), consumer="t-0")
    sizes, release = held_writes(shard)

    async def go() -> None:
        running = asyncio.create_task(shard.pipeline.run())
        await shard.pipeline.submit(entries[:size])
        await until(lambda: sizes == [size])
        await asyncio.wait_for(shard.pipeline.submit(entries[size:]), 5)
        await until(lambda: sizes == [size, size])  # while the first is still held
        release.set()
        await shard.pipeline.end_input()
        await asyncio.wait_for(running, 30)
        await shard.close()

    asyncio.run(go())
    assert shard.report.processed == 2 * size
