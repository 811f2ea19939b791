"""Two instances share a stream; when one dies whole, the survivor claims and finishes its work."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from scripts.toolkit.writer import steady
from tests.e2e.processes import stop_holding, wait_for
from tests.e2e.verify import assert_exact, stored_count, wait_settled

pytestmark = pytest.mark.e2e


def dead_consumers_pending(client, stream_key: str, instance: str) -> int:  # type: ignore[no-untyped-def]
    summary = client.xpending(stream_key, "processor")
    return sum(c["pending"] for c in summary["consumers"] if c["name"].decode().startswith(f"{instance}-"))


@pytest.mark.parametrize("threshold_ms", [None, "2000"], ids=["default-threshold", "threshold-2000"])
def test_survivor_finishes_the_work_of_a_killed_instance(
    redis_client, database_url, stream_key, env, start_processor, threshold_ms
):
    """SIGKILL of a whole instance under load: the survivor claims its entries; every fix once."""
    extra = {"CLAIM_THRESHOLD_MS": threshold_ms} if threshold_ms else {}
    alpha = start_processor({**env, **extra, "INSTANCE_ID": "alpha", "BATCH_SIZE": "100"}, name="alpha")
    beta = start_processor({**env, **extra, "INSTANCE_ID": "beta", "BATCH_SIZE": "100"}, name="beta")
    alpha.wait_for_shards(2)
    beta.wait_for_shards(2)
    producer = threading.Thread(target=steady, args=(redis_client, stream_key, 2_000, 6.0), kwargs={"seed": 21})
    producer.start()
    wait_for(lambda: stored_count(database_url) > 2_000, what="the first rows")
    # Stop alpha's shards mid-batch so that it dies holding entries, then kill the instance.
    stop_holding(alpha.shard_pids(), lambda: dead_consumers_pending(redis_client, stream_key, "alpha") > 0,
                 what="alpha holding entries")
    os.killpg(alpha.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    producer.join()
    wait_settled(redis_client, database_url, stream_key, 45)  # the survivor finishes everything
    recovered_s = time.monotonic() - killed_at
    assert_exact(redis_client, database_url, stream_key)
    claims = [e for e in beta.logs() if e["msg"] == "consumer is dead; claiming its entries"]
    assert claims and all(e["dead_consumer"].startswith("alpha-") for e in claims)
    print(f"kill to zero pending: {recovered_s:.1f}s")
