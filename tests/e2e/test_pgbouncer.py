"""The Processor with DATABASE_URL through a transaction-pooling PgBouncer (SPEC §4): MIGRATION_DATABASE_URL
goes direct, everything else through the pooler, whose two server connections serve every client's
transactions in turn. Nothing a session keeps may be relied on from one transaction to the next."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import pytest

from common.postgres import POOLER_SAFE, prepare_if_direct
from scripts.toolkit.pgbouncer import ThrowawayPgBouncer, pgbouncer_binary
from scripts.toolkit.writer import backlog
from tests.e2e.verify import assert_exact, wait_settled
from tests.files import collection, feature, geojson_file
from tests.ops.letters import run_cli

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(pgbouncer_binary() is None, reason="pgbouncer is not installed (Debian: apt-get install pgbouncer)"),
]


@pytest.fixture
def pooler(database_url: str, runtime_database_url: str) -> Iterator[ThrowawayPgBouncer]:
    users = [urlsplit(database_url).username or "postgres", urlsplit(runtime_database_url).username or ""]
    with ThrowawayPgBouncer(database_url, users, pool_size=2) as bouncer:
        yield bouncer


def test_the_pipeline_and_operator_commands_work_through_a_transaction_pooler(
    redis_client, database_url, runtime_database_url, stream_key, env, pooler, start_processor, tmp_path
):  # type: ignore[no-untyped-def]
    """Two shards write 160 small batches with visits, poll geofences and run operator commands, all
    through the pooler: every entry is stored once, no process panics or restarts. (psycopg prepared a
    statement on the server once it had run five times; the next transaction, on the pooler's other
    server connection, found no such statement and the shard panicked.)"""
    database = urlsplit(database_url).path.lstrip("/")
    pooled = pooler.url(urlsplit(runtime_database_url).username or "", database)
    run_env = {**env, "DATABASE_URL": pooled, "MIGRATION_DATABASE_URL": database_url, "BATCH_SIZE": "50"}
    migrated = run_cli(run_env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    # Rings around the simulated fleet's centre: devices enter and leave them, so visits are written.
    depots = [feature(f"Depot {i}", {"type": "Point", "coordinates": [4.9, 52.37]}, radius_m=5_000 * (i + 1)) for i in range(8)]
    imported = run_cli(run_env, "geofences", "import", str(geojson_file(tmp_path / "depots.geojson", collection(*depots))))
    assert imported.returncode == 0, imported.stderr
    backlog(redis_client, stream_key, 8_000, devices=40, seed=5)

    processor = start_processor(run_env)
    wait_settled(redis_client, database_url, stream_key, timeout_s=120)
    for _ in range(6):  # more than psycopg's five executions before it prepares
        listed = run_cli(run_env, "geofences", "list")
        assert listed.returncode == 0 and "Depot 7" in listed.stdout, listed.stderr
    report = run_cli(run_env, "retention")
    assert report.returncode == 0, report.stderr
    processor.signal()
    assert processor.wait(60) == 0

    assert_exact(redis_client, database_url, stream_key)
    troubles = [e for e in processor.logs() if e["level"] in ("ERROR", "CRITICAL") or "restarting" in e["msg"]]
    assert not troubles, troubles
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM timing_records").fetchone()[0] > 0, "no visit was written"


def test_only_a_direct_connection_prepares_statements(database_url, pooler):  # type: ignore[no-untyped-def]
    """A batch connection prepares its statements (saving Postgres the planning) only where the
    process id Postgres announced at connect time is its backend's: never through the pooler."""
    database = urlsplit(database_url).path.lstrip("/")
    user = urlsplit(database_url).username or "postgres"

    async def threshold(url: str) -> tuple[bool, int | None]:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True, **POOLER_SAFE) as conn:
            return await prepare_if_direct(conn), conn.prepare_threshold

    assert asyncio.run(threshold(database_url)) == (True, 5)
    assert asyncio.run(threshold(pooler.url(user, database))) == (False, None)
