"""The migration runner against a real, empty Postgres database per test."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from common.errors import MigrationError
from supervisor.migrations import apply_migrations, load_migrations
from tests.services import execute

ROOT = Path(__file__).parents[2]


def query(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def columns(url: str, table: str) -> dict[str, str]:
    rows = query(url, "SELECT column_name, data_type FROM information_schema.columns "
                      "WHERE table_schema = 'public' AND table_name = %s", (table,))
    return dict(rows)


def primary_key(url: str, table: str) -> list[str]:
    rows = query(url, "SELECT a.attname FROM pg_index i "
                      "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                      "WHERE i.indrelid = %s::regclass AND i.indisprimary "
                      "ORDER BY array_position(i.indkey, a.attnum)", (table,))
    return [r[0] for r in rows]


def advisory_locks(url: str) -> int:
    return query(url, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                      "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")[0][0]


def table_exists(url: str, table: str) -> bool:
    return query(url, "SELECT to_regclass(%s) IS NOT NULL", (table,))[0][0]


def write(folder: Path, name: str, sql: str) -> Path:
    path = folder / name
    path.write_text(sql, encoding="utf-8")
    return path


def test_project_migrations_create_the_spec_schema(database_url: str) -> None:
    """On an empty database the project's migrations create positions, last_position, schema_migrations per SPEC §3."""
    applied = apply_migrations(database_url)
    assert [m.version for m in applied] == [m.version for m in load_migrations()]
    assert columns(database_url, "positions") == {
        "device_id": "text", "ts": "timestamp with time zone", "lat": "double precision",
        "lon": "double precision", "alt": "real", "speed": "real", "heading": "real", "sats": "smallint",
        "attributes": "jsonb", "received_at": "timestamp with time zone",
        "geofence_revision": "bigint",  # more columns allowed: the revision a fix was derived with
    }
    assert primary_key(database_url, "positions") == ["device_id", "ts"]
    last = columns(database_url, "last_position")
    assert set(last) >= {"device_id", "ts", "lat", "lon", "alt", "speed", "heading", "sats", "attributes",
                         "odometer_m", "updated_at"}
    assert (last["device_id"], last["odometer_m"], last["attributes"]) == ("text", "double precision", "jsonb")
    assert primary_key(database_url, "last_position") == ["device_id"]
    assert set(columns(database_url, "schema_migrations")) >= {"version", "name", "checksum", "applied_at"}
    assert primary_key(database_url, "schema_migrations") == ["version"]
    assert advisory_locks(database_url) == 0


def test_second_run_applies_nothing(database_url: str) -> None:
    """Applying again finds every file applied, changes nothing and releases the lock."""
    first = apply_migrations(database_url)
    ledger = query(database_url, "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY 1")
    assert len(ledger) == len(first) > 0
    assert apply_migrations(database_url) == []
    assert query(database_url, "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY 1") == ledger
    assert advisory_locks(database_url) == 0


def test_own_migrations_apply_in_version_order(database_url: str, tmp_path: Path) -> None:
    """Files are loaded in version order, non-SQL files are ignored, and the ledger records each."""
    write(tmp_path, "0002_add_b.sql", "ALTER TABLE a ADD COLUMN b int;")
    write(tmp_path, "0001_create_a.sql", "CREATE TABLE a (x int); INSERT INTO a VALUES (1);")
    write(tmp_path, "README.md", "not a migration")
    migrations = load_migrations(tmp_path)
    assert [(m.version, m.name) for m in migrations] == [(1, "create_a"), (2, "add_b")]
    assert apply_migrations(database_url, migrations) == migrations
    assert query(database_url, "SELECT version, name, checksum FROM schema_migrations ORDER BY 1") == [
        (m.version, m.name, m.checksum) for m in migrations]
    assert query(database_url, "SELECT x, b FROM a") == [(1, None)]


def test_changed_checksum_is_a_clear_error(database_url: str, tmp_path: Path) -> None:
    """Editing an applied file raises MigrationError naming the file; nothing more is applied."""
    path = write(tmp_path, "0001_create_a.sql", "CREATE TABLE a (x int);")
    apply_migrations(database_url, load_migrations(tmp_path))
    path.write_text("CREATE TABLE a (x bigint);", encoding="utf-8")
    write(tmp_path, "0002_create_b.sql", "CREATE TABLE b (y int);")
    with pytest.raises(MigrationError, match=r"0001_create_a\.sql.*changed"):
        apply_migrations(database_url, load_migrations(tmp_path))
    assert not table_exists(database_url, "b")
    assert query(database_url, "SELECT version FROM schema_migrations") == [(1,)]
    assert advisory_locks(database_url) == 0


def test_failing_migration_applies_nothing_of_itself(database_url: str, tmp_path: Path) -> None:
    """A failing file is rolled back entirely and raises; the files before it stay applied."""
    write(tmp_path, "0001_ok.sql", "CREATE TABLE ok (x int);")
    write(tmp_path, "0002_broken.sql", "CREATE TABLE half (x int); INSERT INTO half VALUES (1); SELECT 1/0;")
    write(tmp_path, "0003_after.sql", "CREATE TABLE after_broken (x int);")
    with pytest.raises(MigrationError, match=r"0002_broken\.sql"):
        apply_migrations(database_url, load_migrations(tmp_path))
    assert table_exists(database_url, "ok")
    assert not table_exists(database_url, "half")
    assert not table_exists(database_url, "after_broken")
    assert query(database_url, "SELECT version FROM schema_migrations") == [(1,)]
    assert advisory_locks(database_url) == 0


@pytest.mark.parametrize(
    "name", ["1_short.sql", "0001-dash.sql", "0001_Upper.sql", "0001_.sql", "00001_five.sql", "create.sql"]
)
def test_misnamed_file_is_rejected(tmp_path: Path, name: str) -> None:
    """A .sql file not named NNNN_name.sql raises MigrationError naming it."""
    write(tmp_path, "0001_fine.sql", "SELECT 1;")
    write(tmp_path, name, "SELECT 1;")
    with pytest.raises(MigrationError, match=re.escape(name)):
        load_migrations(tmp_path)


def test_duplicate_version_is_rejected(tmp_path: Path) -> None:
    """Two files with the same version raise MigrationError."""
    write(tmp_path, "0001_a.sql", "SELECT 1;")
    write(tmp_path, "0001_b.sql", "SELECT 1;")
    with pytest.raises(MigrationError, match="version 1"):
        load_migrations(tmp_path)


def test_parallel_migrate_commands(database_url: str) -> None:
    """Four `processor migrate` started at once on one empty database all exit 0; each version is applied once."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "DATABASE_URL": database_url, "HTTP_PORT": "0"}
    procs = [
        subprocess.Popen([sys.executable, "-m", "ops", "migrate"], env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(4)
    ]
    try:
        outputs = [proc.communicate(timeout=60)[0].decode() for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0], outputs
    versions = query(database_url, "SELECT version, count(*) FROM schema_migrations GROUP BY version ORDER BY 1")
    assert versions == [(m.version, 1) for m in load_migrations()]
    assert sum("migrations applied" in out for out in outputs) == 1, outputs
    assert advisory_locks(database_url) == 0


# --- no-transaction files -------------------------------------------------------------------

NO_TX = "-- processor: no-transaction\n"
STEP = "-- processor: step\n"


def test_project_positions_is_partitioned_by_day(database_url: str) -> None:
    """positions is range-partitioned on ts: a far-past partition from MINVALUE, then days, no DEFAULT."""
    apply_migrations(database_url)
    assert query(database_url, "SELECT relkind FROM pg_class WHERE oid = 'positions'::regclass") == [("p",)]
    assert query(database_url, "SELECT pg_get_partkeydef('positions'::regclass)") == [("RANGE (ts)",)]
    bounds = [b for (b,) in query(database_url, "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                                                "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'positions'::regclass")]
    assert sum("MINVALUE" in b for b in bounds) == 1
    assert not any(b == "DEFAULT" for b in bounds)
    assert len(bounds) == 15  # the far past and 14 days


def test_no_transaction_steps_commit_one_by_one(database_url: str, tmp_path: Path) -> None:
    """Each step commits on its own; a failing step leaves the earlier ones and no ledger row; a re-run completes."""
    path = write(tmp_path, "0001_steps.sql", NO_TX + "CREATE TABLE IF NOT EXISTS a (x int);\n" + STEP
                 + "INSERT INTO a SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM a);\nSELECT 1/(SELECT count(*) - 1 FROM a);\n"
                 + STEP + "CREATE TABLE IF NOT EXISTS b (y int);\n")
    migrations = load_migrations(tmp_path)
    assert not migrations[0].in_transaction and len(migrations[0].steps) == 3
    with pytest.raises(MigrationError, match=r"0001_steps\.sql.*division by zero"):
        apply_migrations(database_url, migrations)
    assert table_exists(database_url, "a") and not table_exists(database_url, "b")
    assert query(database_url, "SELECT x FROM a") == []  # the failing step was one transaction: its INSERT is gone
    assert query(database_url, "SELECT count(*) FROM schema_migrations") == [(0,)]
    execute(database_url, "INSERT INTO a VALUES (1), (2)")  # the cause is fixed; the same file runs again from the top
    assert apply_migrations(database_url, load_migrations(tmp_path)) == migrations
    assert table_exists(database_url, "b")
    assert query(database_url, "SELECT version, checksum FROM schema_migrations") == [(1, migrations[0].checksum)]
    assert path.exists() and advisory_locks(database_url) == 0


def test_no_transaction_step_may_call_a_procedure_that_commits(database_url: str, tmp_path: Path) -> None:
    """A one-statement step runs outside a transaction block: CALL of a procedure with COMMIT works."""
    write(tmp_path, "0001_call.sql", NO_TX + "CREATE TABLE t (x int);\nCREATE OR REPLACE PROCEDURE fill() LANGUAGE plpgsql AS $$\n"
          "BEGIN INSERT INTO t VALUES (1); COMMIT; INSERT INTO t VALUES (2); COMMIT; END $$;\n" + STEP + "CALL fill();\n"
          + STEP + "DROP PROCEDURE fill();\n")
    apply_migrations(database_url, load_migrations(tmp_path))
    assert query(database_url, "SELECT x FROM t ORDER BY x") == [(1,), (2,)]


def test_a_step_refused_its_lock_is_tried_again(database_url: str, tmp_path: Path) -> None:
    """A step failing on its own lock_timeout is retried until the lock is free; writers never queue long behind it."""
    execute(database_url, "CREATE TABLE busy (x int)")
    write(tmp_path, "0001_lock.sql", NO_TX + "SET LOCAL lock_timeout = '100ms';\nALTER TABLE busy ADD COLUMN IF NOT EXISTS y int;\n")
    holder = psycopg.connect(database_url)
    holder.execute("LOCK TABLE busy IN ACCESS SHARE MODE")
    timer = threading.Timer(1.5, holder.commit)
    timer.start()
    try:
        started = time.monotonic()
        apply_migrations(database_url, load_migrations(tmp_path))
        assert time.monotonic() - started >= 1.0
    finally:
        timer.join()
        holder.close()
    assert set(columns(database_url, "busy")) == {"x", "y"}


@pytest.mark.parametrize("done", [1, 2, 3])
def test_partition_migration_resumes_after_an_interruption(database_url: str, done: int) -> None:
    """Migration 0003 stopped after any step (its ledger row not written) completes when run again."""
    migrations = load_migrations()
    apply_migrations(database_url, migrations[:2])
    execute(database_url, "INSERT INTO positions (device_id, ts, lat, lon) VALUES ('d', now(), 1, 2), ('d', '1970-01-02Z', 3, 4)")
    for step in migrations[2].steps[:done]:
        execute(database_url, step)
    assert apply_migrations(database_url) == migrations[2:]
    assert query(database_url, "SELECT relkind FROM pg_class WHERE oid = 'positions'::regclass") == [("p",)]
    assert query(database_url, "SELECT count(*) FROM positions") == [(2,)]
    assert len(query(database_url, "SELECT 1 FROM pg_inherits WHERE inhparent = 'positions'::regclass")) == 15


def test_a_leftover_cutover_too_close_is_replaced(database_url: str) -> None:
    """A CHECK left by an interrupted run whose cutover is less than a day ahead would soon refuse fixes: it is replaced."""
    migrations = load_migrations()
    apply_migrations(database_url, migrations[:2])
    execute(database_url, "ALTER TABLE positions ADD CONSTRAINT positions_ts_before_19990101 CHECK (ts < '1999-01-01Z') NOT VALID")
    apply_migrations(database_url)
    assert query(database_url, "SELECT count(*) FROM pg_constraint WHERE conname = 'positions_ts_before_19990101'") == [(0,)]
    execute(database_url, "INSERT INTO positions (device_id, ts, lat, lon) VALUES ('d', now(), 1, 2)")


def test_a_file_waiting_for_a_table_lock_lets_the_supervisor_look_at_its_signals(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration in a transaction that waits for a table lock gives up at its lock_timeout and asks
    again; between the tries the caller's check runs (a stop signal ends the wait), so a lock held
    for ever no longer holds a SIGTERM for ever."""
    import supervisor.migrations as runner

    monkeypatch.setattr(runner, "MIGRATION_LOCK_TIMEOUT", "100ms")
    execute(database_url, "CREATE TABLE busy (x int)")
    write(tmp_path, "0001_lock.sql", "ALTER TABLE busy ADD COLUMN y int;\n")
    checks: list[float] = []

    def between() -> None:
        checks.append(time.monotonic())
        if len(checks) == 3:
            raise KeyboardInterrupt("stop asked")  # the supervisor raises Halt here

    with psycopg.connect(database_url) as holder:
        holder.execute("LOCK TABLE busy IN ACCESS SHARE MODE")
        with runner._connect(database_url) as conn, pytest.raises(KeyboardInterrupt):
            runner._migrate(conn, load_migrations(tmp_path), between)
    assert len(checks) == 3
    assert advisory_locks(database_url) == 0 and set(columns(database_url, "busy")) == {"x"}


def test_an_outage_during_a_migration_is_an_outage_not_a_bad_migration(database_url: str, tmp_path: Path) -> None:
    """The server ends the migration's session (a restart: admin shutdown) while it waits for a lock:
    the error comes back as the outage it is, for the caller to wait out, not as exit 78."""
    execute(database_url, "CREATE TABLE busy (x int)")
    write(tmp_path, "0001_lock.sql", "ALTER TABLE busy ADD COLUMN y int;\n")
    with psycopg.connect(database_url) as holder:
        holder.execute("LOCK TABLE busy IN ACCESS SHARE MODE")

        def terminate() -> None:
            deadline = time.monotonic() + 60  # the migration asks again after each 5 s lock_timeout
            while time.monotonic() < deadline:
                rows = query(database_url, "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                           "AND datname = current_database()")
                if rows:
                    query(database_url, "SELECT pg_terminate_backend(%s)", (rows[0][0],))
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=terminate)
        killer.start()
        with pytest.raises(psycopg.OperationalError) as raised:
            apply_migrations(database_url, load_migrations(tmp_path))
        killer.join()
    assert not isinstance(raised.value, MigrationError)
    assert apply_migrations(database_url, load_migrations(tmp_path))  # and then it applies


def test_a_file_that_times_out_is_a_failed_migration_not_an_outage(database_url: str, tmp_path: Path) -> None:
    """Its own statement_timeout (an OperationalError too) is the file's failure: exit 78, the file named."""
    write(tmp_path, "0001_slow.sql", "SET LOCAL statement_timeout = '50ms';\nSELECT pg_sleep(2);\n")
    with pytest.raises(MigrationError, match="0001_slow.sql failed: .*statement timeout"):
        apply_migrations(database_url, load_migrations(tmp_path))
