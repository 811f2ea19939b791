"""A partition of `positions` dropped by hand while the Processor runs (SPEC §3: "partitions exist
ahead of time, so no fix in the accepted range is ever refused for a missing partition")."""

from __future__ import annotations

from datetime import datetime, timezone

import orjson
import psycopg
import pytest

from scripts.toolkit.services import free_port
from supervisor.partitions import read_partitions
from tests.e2e.processes import wait_for
from tests.e2e.test_health import get
from tests.e2e.verify import finish_exactly, stored_count

pytestmark = pytest.mark.e2e

FIXES = 30
_END = datetime.max.replace(tzinfo=timezone.utc)


def test_the_partition_of_today_dropped_is_made_again_at_once(env, start_processor, redis_client, stream_key, database_url):
    """The shards' writes wait out the missing partition; the maintenance process, told of it, creates
    it within seconds, rather than at its next pass ten minutes later."""
    port = free_port()
    processor = start_processor({**env, "SHARDS": "2", "HTTP_PORT": str(port)})
    wait_for(lambda: get(port, "/healthz")[0] == 200, 60, what="healthy")
    now = datetime.now(timezone.utc)
    with psycopg.connect(database_url, autocommit=True) as conn:
        (today,) = [p for p in read_partitions(conn) if (p.lower or now) <= now < (p.upper or _END)]
        conn.execute(f"DROP TABLE {today.name}")
    now_ms = int(now.timestamp() * 1000)
    for i in range(FIXES):
        redis_client.xadd(stream_key, {b"data": orjson.dumps({"device_id": f"d-{i}", "ts": now_ms - i, "lat": 1.0, "lon": 2.0})})
    wait_for(lambda: stored_count(database_url) == FIXES, 45, 0.2, "the fixes stored in a new partition")
    assert redis_client.xlen(f"{stream_key}:dlq") == 0
    finish_exactly(processor, redis_client, database_url, stream_key)
