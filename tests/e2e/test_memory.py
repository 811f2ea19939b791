"""A shard's memory stays bounded by what it reads at once, whatever the size of the entries (SPEC §2
limits each entry; reads are sized by bytes: common/stream_pages.py)."""

from __future__ import annotations

import signal
import time

import orjson
import pytest

from scripts.toolkit.processes import status_kb
from tests.e2e.verify import assert_exact, wait_settled

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

LARGE_ENTRIES = 120
PADDING = 1_000_000  # bytes of an ignored field: each entry just under the 1 MiB limit
PEAK_LIMIT_MB = 130  # a read of the whole backlog at once would hold 120 MB of entries alone


def test_a_backlog_of_entries_at_the_size_limit_is_stored_in_bounded_memory(redis_client, stream_key, env, start_processor):
    now_ms = int(time.time() * 1000)
    for n in range(LARGE_ENTRIES):
        fix = {"device_id": f"big-{n % 10}", "ts": now_ms - (LARGE_ENTRIES - n) * 1000, "lat": 50.0, "lon": 10.0}
        redis_client.xadd(stream_key, {"data": orjson.dumps(fix), "padding": b"x" * PADDING})
    try:
        processor = start_processor({**env, "SHARDS": "1"})
        (shard,) = processor.wait_for_shards(1)
        wait_settled(redis_client, env["DATABASE_URL"], stream_key, 60)
        peak_mb = status_kb(shard, "VmHWM")["VmHWM"] / 1024
        assert_exact(redis_client, env["DATABASE_URL"], stream_key)
        assert peak_mb < PEAK_LIMIT_MB, f"shard peak RSS {peak_mb:.0f} MB"
        processor.signal(signal.SIGTERM)
        assert processor.wait(30) == 0
    finally:
        redis_client.delete(stream_key)  # 120 MB of the shared Redis
