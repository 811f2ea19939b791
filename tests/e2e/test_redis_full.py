"""Redis out of memory (maxmemory, noeviction) is an outage like any other: the shards pause,
nothing panics or restarts, and once Redis has room every entry ends stored or dead-lettered once."""

from __future__ import annotations

import signal

import pytest
import redis

from scripts.toolkit.services import ThrowawayRedis, missing_binaries
from scripts.toolkit.writer import backlog
from tests.e2e.processes import wait_for
from tests.e2e.verify import assert_exact, wait_settled

pytestmark = pytest.mark.e2e


def test_redis_out_of_memory_pauses_and_loses_nothing(database_url, env, start_processor, tmp_path):
    if advice := missing_binaries():
        pytest.skip("; ".join(advice))
    with ThrowawayRedis() as server, redis.Redis.from_url(server.url) as client:
        stream = env["STREAM_KEY"]
        counts = backlog(client, stream, 400, devices=20, seed=51, malformed_fraction=0.1)
        assert counts.malformed > 10
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)  # every write that may grow memory is refused with OOM
        processor = start_processor({**env, "REDIS_URL": server.url, "MAX_FAILURES": "1"})
        shards = processor.wait_for_shards(2)
        wait_for(lambda: "redis unavailable, pausing" in processor.log_messages(), what="a pause on the full Redis")
        client.config_set("maxmemory", 0)
        wait_settled(client, database_url, stream, 60)
        assert_exact(client, database_url, stream)
        assert client.xlen(f"{stream}:dlq") == counts.malformed
        messages = processor.log_messages()
        assert not [m for m in messages if m.startswith(("panic", "shard exited", "supervisor halting"))], messages
        assert processor.shard_pids() == shards, "no shard was restarted"
        processor.signal(signal.SIGTERM)
        assert processor.wait(30) == 0
