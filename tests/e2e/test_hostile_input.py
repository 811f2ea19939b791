"""The worst entries a producer can write, mixed into a live stream, through `processor run`.

No process restarts, every valid fix in the same batches is stored, and every hostile entry
becomes exactly one dead letter that keeps its fields verbatim (SPEC §2, §5).
"""

from __future__ import annotations

import signal
import time

import orjson
import pytest
import redis

from common.letters import split_letter
from common.redis_client import keep_field_pairs
from scripts.toolkit.writer import backlog
from tests.e2e.processes import wait_for
from tests.e2e.verify import stored_count

pytestmark = pytest.mark.e2e

FIX = b'"ts":1767225600000,"lat":52.1,"lon":4.3'


def deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def hostile_entries() -> list[list[bytes]]:
    now_ms = int(time.time() * 1000)
    return [
        [b"data", b'{"device_id":' + b"[" * 300 + b"1" + b"]" * 300 + b"," + FIX + b"}"],  # deeper than orjson writes
        [b"data", b'{"device_id":"h1",' + FIX + b',"io":{"a":' + deep(200) + b"}}"],
        [b"data", b'{"device_id":"h2",' + FIX + b',"io":{"a":[{"b":["x\\u0000y"]}]}}'],  # NUL deep in io
        [b"data", b"not json", *[item for i in range(4_000) for item in (b"f%d" % i, b"v")]],  # thousands of fields
        [b"data", b"{}", b"error", b"mine", b"error", b"again", b"consumer", b"c", b"failures", b"9"],  # collisions
        [b"\xff\xfe", b"\x00binary", b"data", b'{"device_id":"h3",' + FIX + b',"lat":NaN}'],
        [b"data", b'{"device_id":"h4","ts":%d,"lat":1,"lon":1}' % (now_ms + 3_600_000)],  # an hour in the future
        [b"data", b'{"device_id":"\\ud800",' + FIX + b"}"],  # a lone surrogate
        [b"data", orjson.dumps({"device_id": "h5", "ts": 1767225600000, "lat": 1, "lon": 1, "io": {str(i): i for i in range(600)}})],
        [b"data", b'{"device_id":"h6",' + FIX + b"}", b"data", b'{"device_id":"h7",' + FIX + b"}"],  # two data fields
        [b"data", b"\xef\xbb\xbf{}"],
        [b"", b""],
    ]


def test_hostile_entries_are_dead_lettered_once_and_nothing_restarts(
    redis_client: redis.Redis, database_url: str, stream_key: str, env: dict[str, str], start_processor
):  # type: ignore[no-untyped-def]
    keep_field_pairs(redis_client)
    counts = backlog(redis_client, stream_key, 1_000, devices=40, seed=41)
    hostile: dict[bytes, list[bytes]] = {}
    for flat in hostile_entries():
        hostile[redis_client.execute_command("XADD", stream_key, "*", *flat)] = flat
    counts_after = backlog(redis_client, stream_key, 1_000, devices=40, seed=42, start_ms=1_767_312_000_000)  # a day later
    valid = counts.valid + counts_after.valid

    processor = start_processor({**env, "SHARDS": "2", "BATCH_SIZE": "100"})
    shards = processor.wait_for_shards(2)
    dlq = f"{stream_key}:dlq"
    wait_for(lambda: redis_client.xlen(dlq) >= len(hostile) and stored_count(database_url) >= valid, 60,
             what="every valid fix stored and every hostile entry dead-lettered")
    wait_for(lambda: redis_client.xpending(stream_key, "processor")["pending"] == 0, 30, what="nothing pending")

    letters = [split_letter(fields) for _, fields in redis_client.xrange(dlq)]
    by_source = {letter.added[b"source_id"]: letter for letter in letters}
    assert len(letters) == len(by_source) == len(hostile), "each hostile entry dead-lettered exactly once"
    for entry_id, flat in hostile.items():
        assert by_source[entry_id].original == flat, "verbatim"
        assert by_source[entry_id].added[b"error_kind"] in (b"decode", b"validate")
        assert not by_source[entry_id].added[b"error"].startswith(b"entry could not be validated")
    assert stored_count(database_url) == valid
    assert sorted(processor.shard_pids()) == sorted(shards), "no shard restarted"
    messages = processor.log_messages()
    assert not any("restarting" in m or m.startswith("panic") for m in messages)

    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == 0
