"""`processor run` as a real process: backlogs, poison, SIGKILL of a shard, SIGTERM and restart."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from scripts.toolkit.fleet import DEFAULT_START_MS
from scripts.toolkit.writer import backlog, steady
from tests.e2e.processes import wait_for
from tests.e2e.verify import assert_exact, stored_count, wait_settled

pytestmark = pytest.mark.e2e


def test_backlog_is_stored_exactly(redis_client, database_url, stream_key, env, start_processor):
    """A backlog of 10,000 fixes ends with exactly the right positions and last_position, nothing pending."""
    backlog(redis_client, stream_key, 10_000, devices=100, seed=11)
    processor = start_processor(env)
    wait_settled(redis_client, database_url, stream_key, 90)
    assert_exact(redis_client, database_url, stream_key)
    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == 0


def test_poison_goes_to_the_dlq_and_nowhere_else(redis_client, database_url, stream_key, env, start_processor):
    """Malformed entries end in the DLQ with their fields verbatim; the entries around them are stored."""
    counts = backlog(redis_client, stream_key, 5_000, devices=50, seed=12, malformed_fraction=0.05)
    assert counts.malformed > 100
    start_processor(env)
    wait_settled(redis_client, database_url, stream_key, 90)
    assert_exact(redis_client, database_url, stream_key)
    letters = redis_client.xrange(f"{stream_key}:dlq")
    assert len(letters) == counts.malformed
    for _, fields in letters:
        assert fields[b"error_kind"] in (b"decode", b"validate")
        assert fields[b"error"] and fields[b"source_stream"] == stream_key.encode()
        assert fields[b"consumer"].startswith(env["INSTANCE_ID"].encode())
        assert int(fields[b"failures"]) >= 1 and fields[b"failed_at"]


def test_sigkill_of_a_shard_loses_nothing(redis_client, database_url, stream_key, env, start_processor):
    """A shard SIGKILLed mid-stream is restarted in its slot, and the counts stay exact."""
    producer = threading.Thread(target=steady, args=(redis_client, stream_key, 3_000, 4.0), kwargs={"devices": 200, "seed": 13})
    processor = start_processor({**env, "BATCH_SIZE": "100"})
    before = processor.wait_for_shards(2)
    producer.start()
    wait_for(lambda: stored_count(database_url) > 1_000, what="the first rows")
    victim = before[0]
    processor_pids = set(before)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(set(processor.shard_pids()) - processor_pids) == 1, what="a replacement shard")
    producer.join()
    wait_settled(redis_client, database_url, stream_key, 90)
    assert_exact(redis_client, database_url, stream_key)
    assert any(e["msg"].startswith("shard killed") for e in processor.logs())


def test_sigterm_exits_zero_and_a_restart_completes_the_rest(redis_client, database_url, stream_key, env, start_processor):
    """SIGTERM under load drains and exits 0; a second run stores the rest, each fix once."""
    backlog(redis_client, stream_key, 60_000, devices=300, seed=14)
    first = start_processor({**env, "BATCH_SIZE": "200"})
    wait_for(lambda: stored_count(database_url) > 2_000, what="the first rows")
    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0
    assert "supervisor stopped" in first.log_messages()
    second = start_processor({**env, "BATCH_SIZE": "200"})
    wait_settled(redis_client, database_url, stream_key, 90)
    assert_exact(redis_client, database_url, stream_key)
    second.signal(signal.SIGINT)
    assert second.wait(30) == 0


def test_sigterm_under_sustained_load_then_restart(redis_client, database_url, stream_key, env, start_processor):
    """SIGTERM while a producer keeps writing: exit 0 within the drain budget, report logged, restart completes exactly."""
    producer = threading.Thread(target=steady, args=(redis_client, stream_key, 3_000, 5.0), kwargs={"devices": 300, "seed": 15})
    first = start_processor({**env, "DRAIN_TIMEOUT_S": "5"})
    first.wait_for_shards(2)
    producer.start()
    wait_for(lambda: stored_count(database_url) > 3_000, what="the first rows")
    first.signal(signal.SIGTERM)
    assert first.wait(5 + 5) == 0
    exits = [e for e in first.logs() if e["msg"].startswith("shard exited")]
    assert len(exits) == 2 and all(e["exit_status"] == 0 for e in exits), "shards stop cleanly too"
    assert not [e for e in first.logs() if e["msg"].startswith("panic")]
    report = [e for e in first.logs() if e["msg"] == "drain report"]
    assert len(report) == 1 and set(report[0]["shards"]) == {"0", "1"}
    producer.join()
    second = start_processor(env)
    wait_settled(redis_client, database_url, stream_key, 90)
    assert_exact(redis_client, database_url, stream_key)
    second.signal(signal.SIGTERM)
    assert second.wait(30) == 0


def test_second_signal_cuts_the_drain_short(redis_client, database_url, stream_key, env, start_processor):
    """A second SIGTERM makes the stop quick even when Postgres holds the shards' batches; nothing is lost."""
    backlog(redis_client, stream_key, 20_000, devices=100, seed=16)
    processor = start_processor({**env, "DRAIN_TIMEOUT_S": "60"})
    wait_for(lambda: stored_count(database_url) > 1_000, what="the first rows")
    import psycopg

    with psycopg.connect(database_url) as blocker:
        blocker.execute("LOCK TABLE positions IN ACCESS EXCLUSIVE MODE")  # every batch now waits
        processor.signal(signal.SIGTERM)
        wait_for(lambda: "stopping shards" in processor.log_messages(), 10)
        processor.signal(signal.SIGTERM)
        assert processor.wait(10) == 0
    again = start_processor(env)
    wait_settled(redis_client, database_url, stream_key, 90)
    assert_exact(redis_client, database_url, stream_key)
    again.signal(signal.SIGTERM)
    assert again.wait(30) == 0


def test_a_stream_deleted_while_running_is_created_again(redis_client, database_url, stream_key, env, start_processor):
    """An operator deletes the stream (or Redis restarts without its data). A read blocked on it
    is told UNBLOCKED: a shard panic (exit 70), and three in a minute halted the instance. Now the
    stream and group are created again at id 0 and what is written next is stored, with no panic
    and no restart. (A claim pass that meets the gap: tests/shard/test_claim.py.)"""
    backlog(redis_client, stream_key, 2_000, devices=50, seed=21)
    processor = start_processor(env)
    wait_settled(redis_client, database_url, stream_key, 90)
    redis_client.delete(stream_key)
    wait_for(lambda: redis_client.exists(stream_key) == 1, what="the stream created again")
    backlog(redis_client, stream_key, 2_000, devices=50, seed=22, start_ms=DEFAULT_START_MS + 86_400_000)
    wait_for(lambda: stored_count(database_url) == 4_000, timeout_s=90, what="both backlogs stored")
    wait_for(lambda: redis_client.xpending(stream_key, "processor")["pending"] == 0, what="nothing pending")
    troubles = [e for e in processor.logs() if e["level"] in ("ERROR", "CRITICAL") or "restarting" in e["msg"]]
    assert troubles == []
    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == 0
