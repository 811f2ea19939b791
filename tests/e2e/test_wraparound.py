"""Postgres at its transaction-id wraparound stop limit refuses every write until a VACUUM: an
outage of the whole database (SPEC §5), so consumption pauses, /healthz says 503 and nothing is
dead-lettered, however many times each batch fails."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from scripts.toolkit.services import ThrowawayPostgres, free_port, missing_binaries
from scripts.toolkit.writer import steady
from supervisor.migrations import apply_migrations
from tests.e2e.processes import wait_for
from tests.e2e.test_health import get
from tests.e2e.test_outages import wait_unhealthy
from tests.e2e.verify import assert_exact, stored_count, wait_settled

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

XACT_SEGMENT = 1_048_576  # transaction ids per pg_xact segment file (32 pages of 8 KiB, 4 per byte)


@pytest.fixture
def wrapping_postgres() -> Iterator[ThrowawayPostgres]:
    """A Postgres of this test's own, whose autovacuum looks every second (not every minute)
    for a database to rescue from wraparound."""
    if advice := missing_binaries():
        pytest.skip("; ".join(advice))
    with ThrowawayPostgres(fsync=False, settings={"autovacuum_naptime": "1"}) as server:
        yield server


def past_the_stop_limit(server: ThrowawayPostgres, database_url: str) -> psycopg.Connection:
    """Restart `server` with its next transaction id past the stop limit, and hold a lock that keeps
    the emergency autovacuum from ending it; the returned connection lets go when closed."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE dba_hold (x int)")
        (oldest,) = conn.execute("SELECT min(datfrozenxid::text::bigint) FROM pg_database").fetchone()  # type: ignore[misc]
    # Postgres stops assigning ids 3 million short of wraparound (2^31 - 1 past the oldest): between the two.
    target = oldest + 2**31 - 1 - 500_000
    server.stop()
    segment = server.data_dir / "pg_xact" / f"{target // XACT_SEGMENT:04X}"
    segment.write_bytes(bytes(XACT_SEGMENT // 4))
    owner = os.stat(server.data_dir)
    os.chown(segment, owner.st_uid, owner.st_gid)
    reset = server.run_tool("pg_resetwal", "-x", str(target), "-D", str(server.data_dir))
    assert reset.returncode == 0, reset.stdout + reset.stderr
    server.start()
    holder = psycopg.connect(database_url)
    holder.execute("LOCK TABLE dba_hold IN SHARE UPDATE EXCLUSIVE MODE")
    with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="wraparound"), psycopg.connect(database_url) as conn:
        conn.execute("SELECT txid_current()")
    return holder


def test_the_wraparound_stop_pauses_consumption_and_dead_letters_nothing(
    redis_client, stream_key, env, wrapping_postgres, start_processor
):
    database_url = wrapping_postgres.url
    apply_migrations(database_url)
    port = free_port()
    env = {**env, "DATABASE_URL": database_url, "MIGRATION_DATABASE_URL": database_url, "HTTP_PORT": str(port),
           "MAX_FAILURES": "2"}
    processor = start_processor(env)
    wait_for(lambda: get(port, "/healthz")[0] == 200, what="healthy")
    steady(redis_client, stream_key, 500, 1.0, devices=50, seed=31)
    wait_for(lambda: stored_count(database_url) == 500, what="the first fixes stored")
    holder = past_the_stop_limit(wrapping_postgres, database_url)
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(steady, redis_client, stream_key, 200, 6.0, devices=50, seed=32)
        wait_unhealthy(port, b"Postgres", 60)
        load.result(timeout=60)
    assert redis_client.xlen(f"{stream_key}:dlq") == 0
    holder.close()  # the emergency autovacuum can finish: the limit lifts
    wait_settled(redis_client, database_url, stream_key, 90)
    assert_exact(redis_client, database_url, stream_key)
    assert redis_client.xlen(f"{stream_key}:dlq") == 0
    wait_for(lambda: get(port, "/healthz")[0] == 200, 30, what="healthy again")
    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == 0
