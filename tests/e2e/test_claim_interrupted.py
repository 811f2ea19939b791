"""`processor claim` interrupted (Ctrl-C, SIGTERM) mid-claim: it ends promptly, and every entry is
stored or still pending, none acknowledged without its row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest
import redis

from scripts.toolkit.fleet import Fleet
from scripts.toolkit.writer import produce
from tests.e2e.processes import wait_for
from tests.e2e.verify import stored_count

pytestmark = pytest.mark.e2e
ENTRIES = 40_000  # in batches of 20: a claim of them all takes long enough to be interrupted, even on a loaded machine
STOP_BOUND_S = 30.0  # the command's drain of what it holds, with room for a slow machine


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_claim_ends_promptly_and_loses_nothing(
    redis_url, runtime_database_url, database_url, stream_key, tmp_path, signum
):
    """40,000 entries pending on a dead consumer; the claim is interrupted once rows arrive. It exits
    within STOP_BOUND_S (its liveness duty, cancelled inside a Redis command, used to swallow the
    cancellation and hang it for good), and entries not pending any more all have their rows."""
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": runtime_database_url,
           "MIGRATION_DATABASE_URL": database_url, "STREAM_KEY": stream_key, "INSTANCE_ID": "interrupted",
           "BATCH_SIZE": "20", "PANIC_DIR": str(tmp_path / "panic")}
    migrated = subprocess.run([sys.executable, "-m", "ops", "migrate"], env=env, capture_output=True, text=True, timeout=60)
    assert migrated.returncode == 0, migrated.stderr
    with redis.Redis.from_url(redis_url) as client:
        client.xgroup_create(stream_key, "processor", id="0", mkstream=True)
        produce(client, stream_key, list(Fleet(500, seed=7).fixes(ENTRIES)))
        client.xreadgroup("processor", "ghost", {stream_key: ">"}, count=ENTRIES)
        # SIGINT as a terminal's Ctrl-C finds it, whatever this process inherited (an ignored one is inherited).
        claim = subprocess.Popen([sys.executable, "-m", "ops", "claim", "--from", "ghost", "--min-idle-ms", "0"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            wait_for(lambda: stored_count(database_url) > 0 or claim.poll() is not None, 60, what="the first rows")
            assert claim.poll() is None, f"the claim ended (exit {claim.returncode}) before any row was seen: {claim.communicate()}"
            sent = time.monotonic()
            claim.send_signal(signum)
            _, stderr = claim.communicate(timeout=STOP_BOUND_S)
            assert time.monotonic() - sent < STOP_BOUND_S
        finally:
            if claim.poll() is None:
                claim.kill()
                claim.wait()
        assert "Traceback" not in stderr
        if signum == signal.SIGINT:  # Ctrl-C is one line and exit 1; SIGTERM ends it at once (143)
            assert claim.returncode == 1 and "processor: interrupted" in stderr, stderr
        pending = client.xpending(stream_key, "processor")["pending"]
    stored = stored_count(database_url)
    assert stored <= ENTRIES and ENTRIES - pending <= stored, (stored, pending)
    with psycopg.connect(database_url) as conn:
        duplicates = conn.execute("SELECT count(*) - count(DISTINCT (device_id, ts)) FROM positions").fetchone()
    assert duplicates == (0,)
