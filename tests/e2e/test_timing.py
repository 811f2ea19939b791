"""Geofence timing and odometer are order-proof: the same as a serial, in-order replay."""

from __future__ import annotations

import signal

import pytest
import redis

from supervisor.migrations import apply_migrations
from tests.e2e.fleet import assert_same_result, build_scenario, insert_geofences, serial_replay, stored_result
from tests.e2e.processes import wait_for
from tests.e2e.verify import settled, stored_count

pytestmark = pytest.mark.e2e


def produce(client: redis.Redis, stream: str, entries: list[bytes]) -> None:
    with client.pipeline(transaction=False) as pipe:
        for data in entries:
            pipe.xadd(stream, {"data": data})
        pipe.execute()


def distinct_fixes(scenario) -> int:  # type: ignore[no-untyped-def]
    return len({(f["device_id"], f["ts"]) for f in scenario.fixes})


def test_single_shard_with_late_uploads_equals_serial_replay(redis_client, database_url, stream_key, env, start_processor):
    """One shard, with buffered fixes arriving after newer ones, ends exactly as an in-order replay."""
    scenario = build_scenario()
    apply_migrations(database_url)
    insert_geofences(database_url, scenario.geofences)
    produce(redis_client, stream_key, scenario.entries)
    start_processor({**env, "SHARDS": "1", "BATCH_SIZE": "100"})
    wait_for(lambda: settled(redis_client, database_url, stream_key, distinct_fixes(scenario), 0), 120, 0.2)
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
    import os

    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: settled(redis_client, database_url, stream_key, distinct_fixes(scenario), 0), 120, 0.2)
    assert_same_result(stored_result(database_url), serial_replay(scenario))
