"""Property tests: whatever a producer XADDs, each entry ends as a fix or as exactly one verbatim
dead letter, and nothing on the way (decode, validate, stage, write, dead-letter) raises.

Hypothesis generates hostile entries: deep and wide JSON, huge numbers, NaN and Infinity
spellings, lone surrogates and invalid UTF-8, NUL anywhere, many fields, binary field
names, colliding and repeated names. The pure test drives decoding alone; the integration
test drives the whole per-entry path against a real Redis and Postgres.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given, strategies as st
from hypothesis import settings as examples

from common.config import Settings
from common.letters import split_letter
from common.redis_client import keep_field_pairs
from common.status import StatusBoard
from shard.batch import decode_batch
from shard.lifecycle import Shard
from supervisor.migrations import apply_migrations

NOW_MS = int(time.time() * 1000)

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(exclude_categories=()), max_size=20),  # NUL, controls and lone surrogates too
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=6)),
    max_leaves=40,
)
device_ids = st.one_of(st.text(min_size=0, max_size=70), st.just("dev-1"), st.sampled_from(["d\x00", "d\n", "é" * 64]))
timestamps = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**53),
    st.integers(min_value=NOW_MS - 10**10, max_value=NOW_MS),
    st.text(max_size=40),
    st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01T00:00:00", "9999-12-31T23:59:59+00:00", "0001-01-01T00:00:00-14:00"]),
    json_value,
)
numbers = st.one_of(st.floats(), st.integers(min_value=-(2**64), max_value=2**64), json_value)


@st.composite
def fix_objects(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly plausible fixes, each member possibly wrong, missing or hostile."""
    obj: dict[str, Any] = {"device_id": draw(device_ids), "ts": draw(timestamps), "lat": draw(numbers), "lon": draw(numbers)}
    for name in draw(st.lists(st.sampled_from(["alt", "speed", "heading", "sats", "io", "extra"]), unique=True)):
        obj[name] = draw(json_value if name in ("io", "extra") else numbers)
    for name in draw(st.lists(st.sampled_from(["device_id", "ts", "lat", "lon"]), max_size=1)):
        del obj[name]
    return obj


def deep(depth: int, member: str) -> bytes:
    return b'{"device_id":"d","ts":1,"lat":1,"lon":1,"' + member.encode() + b'":' + b"[" * depth + b"]" * depth + b"}"


raw_data = st.one_of(
    # json, not orjson: it writes NaN, Infinity and integers beyond 64 bits, as a hostile producer may.
    fix_objects().map(lambda obj: json.dumps(obj).encode()),
    st.binary(max_size=200),
    st.integers(min_value=1, max_value=1_500).map(lambda depth: deep(depth, "io")),
    st.integers(min_value=1, max_value=1_500).map(lambda depth: deep(depth, "device_id")),
    st.sampled_from(
        [
            b'{"device_id":"d","ts":1,"lat":NaN,"lon":1}',
            b'{"device_id":"d","ts":1,"lat":Infinity,"lon":-Infinity}',
            b'{"device_id":"d","ts":1,"lat":1e400,"lon":1}',
            b'{"device_id":"d","ts":1e3,"lat":1,"lon":1}',
            b'{"device_id":"\\ud800","ts":1,"lat":1,"lon":1}',
            b'{"device_id":"d","ts":1,"lat":1,"lon":1,"io":{"a":"\\u0000"}}',
            b'{"device_id":"d","ts":1,"lat":1,"lon":1,"io":{"\\u0000":1}}',
            b'{"device_id":"d","ts":18446744073709551616,"lat":1,"lon":1}',
            b'{"device_id":"d","ts":1,"lat":1,"lon":1,"sats":99999999999999999999}',
            b"\xef\xbb\xbf{}",
            b"\xff\xfe\x00",
            b"",
        ]
    ),
)
field_names = st.one_of(
    st.sampled_from([b"data", b"error", b"error_kind", b"source_id", b"failures", b"consumer", b"failed_at", b"x"]),
    st.binary(min_size=0, max_size=12),
)


@st.composite
def entries(draw: st.DrawFn) -> list[bytes]:
    """An entry's flat field list as Redis keeps it: usually a `data`, sometimes none or two."""
    flat: list[bytes] = []
    if draw(st.integers(0, 9)) > 0:
        flat += [b"data", draw(raw_data)]
    for _ in range(draw(st.integers(0, 6))):
        flat += [draw(field_names), draw(st.one_of(raw_data, st.binary(max_size=30)))]
    if not flat or draw(st.integers(0, 30)) == 0:
        flat += [b"pad%d" % i for i in range(2 * draw(st.integers(1, 150)))]
    return flat


@given(st.lists(entries(), min_size=1, max_size=12))
@examples(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_decoding_never_raises_and_sorts_every_entry_once(batch_entries: list[list[bytes]]) -> None:
    """Every entry becomes exactly one fix or one dead letter whose fields are the entry's, verbatim."""
    ids = [b"%d-0" % i for i in range(len(batch_entries))]
    batch = decode_batch(list(zip(ids, batch_entries)), 5, 300)
    letters = {letter.entry_id: letter for letter in batch.dead}
    assert len(letters) == len(batch.dead) and not batch.gone
    assert set(batch.fixes) | set(letters) == set(ids) and not set(batch.fixes) & set(letters)
    for entry_id, flat in zip(ids, batch_entries):
        if entry_id in letters:
            assert letters[entry_id].fields == flat and letters[entry_id].error_kind in ("decode", "validate")
            # A named rule, not the safety net for bugs (which would still keep the shard alive).
            assert not letters[entry_id].error.startswith("entry could not be validated"), letters[entry_id].error


def test_the_whole_per_entry_path_stores_or_dead_letters_each_entry_once(
    redis_client: redis.Redis, database_url: str, settings: Settings
) -> None:
    """Hostile batches through the shard's pipeline against real servers: no exception, exact outcome."""
    stream, dlq = settings.stream_key, settings.dlq_key
    apply_migrations(database_url)
    keep_field_pairs(redis_client)
    redis_client.xgroup_create(stream, "processor", id="0", mkstream=True)

    @given(st.lists(entries(), min_size=1, max_size=10))
    @examples(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    def run(batch_entries: list[list[bytes]]) -> None:
        ids = [redis_client.execute_command("XADD", stream, "*", *flat) for flat in batch_entries]
        entries_read = redis_client.xreadgroup("processor", "t-0", {stream: ">"})[0][1]
        assert [entry_id for entry_id, _ in entries_read] == ids
        before = redis_client.xlen(dlq)
        asyncio.run(through_pipeline(Shard(settings, 0, StatusBoard(1), consumer="t-0"), entries_read))
        letters = {split_letter(f).added[b"source_id"]: split_letter(f).original for _, f in redis_client.xrange(dlq)[before:]}
        decoded = decode_batch(entries_read, 5, 300)
        assert set(letters) == {letter.entry_id for letter in decoded.dead}, "exactly the poison, each once"
        for entry_id, flat in zip(ids, batch_entries):
            if entry_id in letters:
                assert letters[entry_id] == flat, "verbatim"
        assert redis_client.xpending(stream, "processor")["pending"] == 0, "every entry ACKed"
        stored = stored_keys(database_url)
        assert {(f.device_id, f.ts) for f in decoded.fixes.values()} <= stored

    run()


async def through_pipeline(shard: Shard, entries_read: list[Any]) -> None:
    writing = asyncio.create_task(shard.pipeline.run())
    await shard.pipeline.submit(entries_read)
    await shard.pipeline.end_input()
    await writing
    await shard.close()


def stored_keys(database_url: str) -> set[tuple[str, Any]]:
    with psycopg.connect(database_url) as conn:
        return set(conn.execute("SELECT device_id, ts FROM positions").fetchall())
