"""Geofence timing and odometer are order-proof: the same as a serial, in-order replay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import orjson
import psycopg
import pytest
import redis

from supervisor.migrations import apply_migrations
from tests.e2e.fleet import assert_same_result, build_scenario, insert_geofences, serial_replay, stored_result
from tests.e2e.processes import wait_for
from tests.e2e.verify import stored_count, wait_settled

pytestmark = pytest.mark.e2e


def produce(client: redis.Redis, stream: str, entries: list[bytes]) -> None:
    with client.pipeline(transaction=False) as pipe:
        for data in entries:
            pipe.xadd(stream, {"data": data})
        pipe.execute()


def test_single_shard_with_late_uploads_equals_serial_replay(redis_client, database_url, stream_key, env, start_processor):
    """One shard, with buffered fixes arriving after newer ones, ends exactly as an in-order replay."""
    scenario = build_scenario()
    apply_migrations(database_url)
    insert_geofences(database_url, scenario.geofences)
    produce(redis_client, stream_key, scenario.entries)
    start_processor({**env, "SHARDS": "1", "BATCH_SIZE": "100"})
    wait_settled(redis_client, database_url, stream_key, 120)
    expected = serial_replay(scenario)
    assert len(expected[0]) > 50, "the scenario should produce many visits"
    assert_same_result(stored_result(database_url), expected)


def test_two_instances_with_a_killed_shard_equal_serial_replay(
    redis_client, database_url, stream_key, env, start_processor
):
    """Two instances of two shards each, one shard SIGKILLed midway: the same visits and odometers."""
    scenario = build_scenario(seed=7)
    apply_migrations(database_url)
    insert_geofences(database_url, scenario.geofences)
    produce(redis_client, stream_key, scenario.entries)
    first = start_processor({**env, "SHARDS": "2", "BATCH_SIZE": "40", "INSTANCE_ID": "alpha"}, name="alpha")
    start_processor({**env, "SHARDS": "2", "BATCH_SIZE": "40", "INSTANCE_ID": "beta"}, name="beta")
    victim = first.wait_for_shards(2)[0]
    wait_for(lambda: stored_count(database_url) > 2_000, what="the first rows")
    os.kill(victim, signal.SIGKILL)
    wait_settled(redis_client, database_url, stream_key, 120)
    assert_same_result(stored_result(database_url), serial_replay(scenario))


def test_restart_while_devices_are_inside_geofences(redis_client, database_url, stream_key, env, start_processor):
    """SIGTERM while visits are open, then a fresh start: no duplicate visit, and they close as in a replay."""
    scenario = build_scenario(late_devices=0, seed=9)
    apply_migrations(database_url)
    insert_geofences(database_url, scenario.geofences)
    half = len(scenario.entries) // 2
    produce(redis_client, stream_key, scenario.entries[:half])
    first = start_processor({**env, "SHARDS": "2", "BATCH_SIZE": "100"}, name="first")
    wait_settled(redis_client, database_url, stream_key, 60)
    with psycopg.connect(database_url) as conn:
        open_visits = conn.execute("SELECT count(*) FROM timing_records WHERE exited_at IS NULL").fetchone()[0]
    assert open_visits > 0, "the scenario should leave devices inside geofences at the stop"
    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0
    produce(redis_client, stream_key, scenario.entries[half:])
    start_processor({**env, "SHARDS": "2", "BATCH_SIZE": "100"}, name="second")
    wait_settled(redis_client, database_url, stream_key, 60)
    assert_same_result(stored_result(database_url), serial_replay(scenario))


def test_running_shards_pick_up_geofence_changes(redis_client, database_url, stream_key, env, start_processor):
    """Inserted and deactivated geofences reach every running shard within 5 seconds, without a restart."""
    apply_migrations(database_url)
    processor = start_processor({**env, "SHARDS": "2"})
    processor.wait_for_shards(2)

    def loaded(active: int) -> bool:
        entries = [e for e in processor.logs() if e["msg"] == "geofences loaded" and e["active"] == active]
        return len({e["pid"] for e in entries}) >= 2

    wait_for(lambda: loaded(0), 30, what="the initial (empty) geofence load")
    square = {"type": "Polygon", "coordinates": [[[4.0, 52.0], [4.1, 52.0], [4.1, 52.1], [4.0, 52.1], [4.0, 52.0]]]}
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO geofences (name, geometry) VALUES ('depot', %s)", (orjson.dumps(square).decode(),))
    wait_for(lambda: loaded(1), 5.0, what="both shards loading the new geofence")
    fixes = [{"device_id": "truck", "ts": 1_767_225_600_000 + n * 1000, "lat": 52.05, "lon": 3.99 + n * 0.03} for n in range(5)]
    produce(redis_client, stream_key, [orjson.dumps(f) for f in fixes])
    wait_settled(redis_client, database_url, stream_key, 30)
    rows, _ = stored_result(database_url)
    assert [(r[0], r[1], r[8]) for r in rows] == [("truck", "depot", 3)]
    assert rows[0][3] is not None, "the fifth fix at lon 4.11 is outside: the visit is closed"
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE geofences SET active = false WHERE name = 'depot'")
    wait_for(lambda: loaded(0) and sum(1 for e in processor.logs() if e["msg"] == "geofences loaded") >= 6, 5.0,
             what="both shards dropping the deactivated geofence")


def test_rehydrate_makes_running_shards_honour_a_sql_correction(redis_client, database_url, stream_key, env, start_processor):
    """After an operator's SQL fix and `processor rehydrate`, every shard drops the device within a second."""
    apply_migrations(database_url)
    processor = start_processor({**env, "SHARDS": "2"})
    processor.wait_for_shards(2)
    fixes = [{"device_id": "van", "ts": 1_767_225_600_000 + n * 1000, "lat": 52.0, "lon": 4.0 + n * 0.001} for n in range(20)]
    produce(redis_client, stream_key, [orjson.dumps(f) for f in fixes])
    wait_settled(redis_client, database_url, stream_key, 30)
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE last_position SET odometer_m = 1000000 WHERE device_id = 'van'")  # the correction
    result = subprocess.run(
        [sys.executable, "-m", "ops", "rehydrate", "van", "--json"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    dropped = lambda: [e for e in processor.logs() if e["msg"] == "device state dropped on request"]  # noqa: E731
    wait_for(lambda: len({e["pid"] for e in dropped()}) == 2, 1.0, 0.02, what="both shards dropping the device")
    step = {"device_id": "van", "ts": 1_767_225_600_000 + 20_000, "lat": 52.0, "lon": 4.0 + 20 * 0.001}
    produce(redis_client, stream_key, [orjson.dumps(step)])
    wait_settled(redis_client, database_url, stream_key, 30)
    with psycopg.connect(database_url) as conn:
        (odometer,) = conn.execute("SELECT odometer_m FROM last_position WHERE device_id = 'van'").fetchone()
    assert 1_000_000 < odometer < 1_000_100, "the next fix builds on the corrected odometer"
