"""/healthz while Postgres fails in ways the shards' own calls do not report at once: it answers
reads but refuses every write, or it is frozen while the shards are idle (SPEC §6: 503 unless
every shard is connected and working)."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from scripts.toolkit.services import free_port
from scripts.toolkit.writer import steady
from supervisor.migrations import apply_migrations
from tests.e2e.processes import wait_for
from tests.e2e.test_health import get
from tests.e2e.test_outages import frozen_postgres, wait_unhealthy
from tests.e2e.test_outages import private_postgres  # noqa: F401 - the fixture: a Postgres of the test's own
from tests.e2e.verify import assert_exact, stored_count, wait_settled

pytestmark = pytest.mark.e2e

SAMPLES_S = 6.0  # three polls of the geofences, each a read that works


def read_only(url: str, on: bool) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET default_transaction_read_only = {'on' if on else 'off'}")
        conn.execute("SELECT pg_reload_conf()")


def test_a_read_only_postgres_is_unhealthy_the_whole_time(redis_client, stream_key, env, private_postgres, start_processor):
    """Every write waits out "read-only transaction" with backoff, while the geofence poll's read works
    every 2 s: that read made Postgres "reachable" again, and /healthz flapped to 200 with nothing stored."""
    url = private_postgres.url
    apply_migrations(url)
    port = free_port()
    processor = start_processor({**env, "DATABASE_URL": url, "MIGRATION_DATABASE_URL": url, "HTTP_PORT": str(port)})
    wait_for(lambda: get(port, "/healthz")[0] == 200, what="healthy")
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(steady, redis_client, stream_key, 100, SAMPLES_S + 6, devices=20, seed=41)
        wait_for(lambda: stored_count(url) > 50, what="the first rows")
        read_only(url, True)
        try:
            wait_for(lambda: get(port, "/healthz")[0] == 503, 30, 0.2, "503 once the writes fail")
            samples = []
            until = time.monotonic() + SAMPLES_S
            while time.monotonic() < until:
                samples.append(get(port, "/healthz")[0])
                time.sleep(0.2)
        finally:
            read_only(url, False)
        load.result(timeout=60)
    assert set(samples) == {503}, samples
    wait_settled(redis_client, url, stream_key, 90)
    assert_exact(redis_client, url, stream_key)
    wait_for(lambda: get(port, "/healthz")[0] == 200, what="healthy again")
    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == 0


def test_a_frozen_postgres_makes_idle_shards_unhealthy(redis_client, stream_key, env, private_postgres, start_processor):
    """SIGSTOP of the whole server while nothing is written: only the shards' geofence poll talks to
    Postgres then, and it waited for ever for its answer, so /healthz stayed 200 for as long as the
    server was frozen."""
    url = private_postgres.url
    apply_migrations(url)
    port = free_port()
    processor = start_processor({**env, "DATABASE_URL": url, "MIGRATION_DATABASE_URL": url, "HTTP_PORT": str(port)})
    wait_for(lambda: get(port, "/healthz")[0] == 200, what="healthy")
    with frozen_postgres(private_postgres, postmaster=True):
        wait_unhealthy(port, b"Postgres", 40)
    wait_for(lambda: get(port, "/healthz")[0] == 200, 60, what="healthy again")
    steady(redis_client, stream_key, 100, 1.0, devices=5, seed=43)
    wait_settled(redis_client, url, stream_key, 60)
    assert_exact(redis_client, url, stream_key)
    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == 0
