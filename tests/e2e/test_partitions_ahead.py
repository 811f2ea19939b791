"""Partitions for every day a fix may be dated exist before the shards start (SPEC §3)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import orjson
import psycopg
import pytest

from tests.e2e.processes import wait_for

pytestmark = pytest.mark.e2e

FIXES = 20


def test_a_raised_max_future_is_ready_before_the_first_batch(env, start_processor, redis_client, stream_key, database_url):
    """MAX_FUTURE_S raised to 200 days: fixes dated 199 days ahead, waiting in the stream when the
    Processor starts, are stored by its first batch, without a pause for a missing partition
    (the maintenance process's first pass runs beside the shards, so it cannot be relied on)."""
    ahead = datetime.now(timezone.utc) + timedelta(days=199)
    for i in range(FIXES):
        fix = {"device_id": f"far-{i}", "ts": int((ahead + timedelta(seconds=i)).timestamp() * 1000), "lat": 1.0, "lon": 2.0}
        redis_client.xadd(stream_key, {b"data": orjson.dumps(fix)})
    processor = start_processor({**env, "MAX_FUTURE_S": str(200 * 86_400), "SHARDS": "1"})
    wait_for(lambda: _stored(database_url) == FIXES, 60, what="every fix stored")
    pauses = [m for m in processor.log_messages() if "unavailable" in m]
    assert pauses == []
    assert redis_client.xlen(f"{stream_key}:dlq") == 0
    processor.signal()
    assert processor.wait(30) == 0


def _stored(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            return conn.execute("SELECT count(*) FROM positions").fetchone()[0]
        except psycopg.errors.UndefinedTable:
            return -1  # not migrated yet
