"""Upgrade of a live installation: `processor migrate` partitions a filled positions table while writers write."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import orjson
import psycopg
import pytest

from supervisor.migrations import apply_migrations, load_migrations
from tests.e2e.processes import wait_for

pytestmark = pytest.mark.e2e

ROWS = 300_000
LONGEST_WAIT_S = 1.0  # no insert may wait longer than this during the migration


class Writer(threading.Thread):
    """Inserts positions (and upserts last_position) as the shards do, 20 rows a transaction, timing each."""

    def __init__(self, url: str) -> None:
        super().__init__(name="writer", daemon=True)
        self.url = url
        self.stopping = threading.Event()
        self.latencies: list[tuple[float, float]] = []  # (monotonic start, seconds)
        self.rows = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.url) as conn:
                while not self.stopping.is_set():
                    started = time.monotonic()
                    with conn.transaction():
                        conn.execute(
                            "INSERT INTO positions (device_id, ts, lat, lon) SELECT 'live', clock_timestamp() + i * "
                            "interval '1 microsecond', 45, 7 FROM generate_series(1, 20) i ON CONFLICT (device_id, ts) DO NOTHING"
                        )
                        conn.execute(
                            "INSERT INTO last_position AS lp (device_id, ts, lat, lon) VALUES ('live', clock_timestamp(), 45, 7) "
                            "ON CONFLICT (device_id) DO UPDATE SET ts = greatest(lp.ts, EXCLUDED.ts)"
                        )
                    self.latencies.append((started, time.monotonic() - started))
                    self.rows += 20
                    time.sleep(0.002)
        except BaseException as exc:  # reported by the test
            self.error = exc


class Straggler(threading.Thread):
    """A writer whose transactions stay open for HOLD_S: the exclusive steps must not queue the others behind it."""

    HOLD_S = 1.0

    def __init__(self, url: str) -> None:
        super().__init__(name="straggler", daemon=True)
        self.url = url
        self.stopping = threading.Event()
        self.rows = 0

    def run(self) -> None:
        with psycopg.connect(self.url) as conn:
            while not self.stopping.is_set():
                with conn.transaction():
                    conn.execute("INSERT INTO positions (device_id, ts, lat, lon) VALUES ('live', clock_timestamp(), 45, 7)")
                    time.sleep(self.HOLD_S)
                self.rows += 1
                time.sleep(0.2)


def snapshot(conn: psycopg.Connection) -> tuple[int, str]:
    """Count and digest of the rows written before the migration (their SPEC columns: later migrations add others)."""
    return conn.execute(
        "SELECT count(*), md5(string_agg((p.device_id, p.ts, p.lat, p.lon, p.alt, p.speed, p.heading, p.sats, p.attributes,"
        " p.received_at)::text, '|' ORDER BY device_id, ts)) FROM positions p WHERE device_id <> 'live'"
    ).fetchone()


def test_a_filled_live_table_is_partitioned_without_rewrite_or_long_locks(
    database_url, redis_client, stream_key, env, start_processor
) -> None:
    apply_migrations(database_url, load_migrations()[:2])  # the schema before partitioning
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO positions (device_id, ts, lat, lon, alt, speed, heading, sats, attributes) "
            "SELECT 'dev-' || (i %% 300), now() - i * interval '17 seconds', 45 + (i %% 1000) / 1e4, 7, i %% 500, i %% 90, "
            "i %% 360, i %% 12, jsonb_build_object('i', i) FROM generate_series(1, %s) i",
            (ROWS,),
        )
        conn.execute("INSERT INTO positions (device_id, ts, lat, lon) VALUES ('dev-old', '1971-06-01Z', 1, 2)")
        conn.execute(
            "INSERT INTO last_position (device_id, ts, lat, lon) SELECT DISTINCT ON (device_id) device_id, ts, lat, lon "
            "FROM positions ORDER BY device_id, ts DESC"
        )
        filenode = conn.execute("SELECT pg_relation_filenode('positions')").fetchone()[0]
        before = snapshot(conn)
        derived = conn.execute("SELECT * FROM last_position WHERE device_id <> 'live' ORDER BY device_id").fetchall()

    writer, straggler = Writer(database_url), Straggler(database_url)
    writer.start()
    straggler.start()
    wait_for(lambda: writer.rows >= 200, what="the writer's first rows")
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    migrating_from = time.monotonic()
    migrate = start_processor(env, "migrate", name="migrate")
    assert migrate.wait(120) == 0, migrate.log_messages()
    migrating_until = time.monotonic()
    rows_at_end = writer.rows
    wait_for(lambda: writer.rows >= rows_at_end + 20, what="the writer's rows into the partitioned table")
    writer.stopping.set()
    straggler.stopping.set()
    writer.join(10)
    straggler.join(10)
    assert writer.error is None, writer.error

    during = [seconds for started, seconds in writer.latencies if migrating_from - 1 <= started <= migrating_until]
    steps = {e["step"]: e["seconds"] for e in migrate.logs() if e["msg"] == "migration step done"}
    retries = sum(e["msg"].startswith("migration step could not get its lock") for e in migrate.logs())
    print(f"\nupgrade of {ROWS:,} rows in {migrating_until - migrating_from:.2f} s: steps {steps}, {retries} lock retries; "
          f"{len(during)} writer transactions during it, longest {max(during):.3f} s")
    assert len(during) >= 20, "the writer kept writing while the migration ran"
    assert max(during) < LONGEST_WAIT_S

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'positions'::regclass").fetchone() == ("p",)
        old_name, bound = conn.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'positions'::regclass AND c.relname LIKE 'positions_before_%'"
        ).fetchone()
        assert bound.startswith("FOR VALUES FROM (MINVALUE) TO (")
        # Not rewritten: the attached partition is the old table's very file, and holds every old row.
        assert conn.execute("SELECT pg_relation_filenode(%s::regclass)", (old_name,)).fetchone()[0] == filenode
        assert snapshot(conn) == before
        assert conn.execute(f'SELECT count(*) FROM "{old_name}" WHERE device_id <> %s', ("live",)).fetchone()[0] == before[0]
        assert conn.execute("SELECT count(*) FROM positions WHERE device_id = 'live'").fetchone()[0] == writer.rows + straggler.rows
        assert conn.execute("SELECT * FROM last_position WHERE device_id <> 'live' ORDER BY device_id").fetchall() == derived
        cutover = datetime.strptime(old_name[-8:], "%Y%m%d").replace(tzinfo=timezone.utc)
        assert cutover in (today + timedelta(days=2), today + timedelta(days=3))  # the day after tomorrow (at midnight: or the next)

    # The upgraded schema in use: new fixes dated after the cutover land in their day's partition.
    processor = start_processor({**env, "MAX_FUTURE_S": str(3 * 86_400)})
    sent = [(f"new-{i}", int((cutover + timedelta(hours=1, seconds=i)).timestamp() * 1000)) for i in range(5)]
    for device, ts in sent:
        redis_client.xadd(stream_key, {b"data": orjson.dumps({"device_id": device, "ts": ts, "lat": 45.0, "lon": 7.0})})
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = wait_for(
            lambda: conn.execute(
                "SELECT tableoid::regclass::text FROM positions WHERE device_id LIKE 'new-%'"
            ).fetchall() if conn.execute("SELECT count(*) FROM positions WHERE device_id LIKE 'new-%'").fetchone()[0] == 5 else None,
            60, what="the new fixes",
        )
    assert {table for (table,) in rows} == {f"positions_{cutover:%Y%m%d}"}
    processor.signal()
    assert processor.wait(30) == 0
