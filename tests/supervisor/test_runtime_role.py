"""The two Postgres roles (SPEC §3): the owner migrates, `processor_runtime` only reads and writes rows."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import psycopg
import pytest

from common import privileges
from common.errors import ConfigError, ExitCode, MigrationError
from scripts.toolkit.roles import as_user
from supervisor.migrations import Migration, apply_migrations, check_runtime_role, ensure_schema, load_migrations

_GRANTS = """
SELECT table_name, privilege_type FROM information_schema.role_table_grants
WHERE grantee = 'processor_runtime' AND table_catalog = current_database()
"""


def test_runtime_role_holds_exactly_the_grants_the_code_lists(database_url: str) -> None:
    """The migrations grant processor_runtime common.privileges.TABLES, USAGE and TEMPORARY, and nothing else."""
    apply_migrations(database_url)
    expected = {(table, privilege) for table, granted in privileges.TABLES.items() for privilege in granted}
    with psycopg.connect(database_url) as conn:
        assert set(conn.execute(_GRANTS).fetchall()) == expected
        can = conn.execute(
            "SELECT has_schema_privilege('processor_runtime', 'public', 'USAGE'),"
            " has_schema_privilege('processor_runtime', 'public', 'CREATE'),"
            " has_database_privilege('processor_runtime', current_database(), 'TEMPORARY'),"
            " (SELECT rolcanlogin FROM pg_roles WHERE rolname = 'processor_runtime'),"
            " (SELECT count(*) FROM pg_class WHERE relowner = 'processor_runtime'::regrole)"
        ).fetchone()
    assert can == (True, False, True, False, 0)


@pytest.mark.parametrize(
    "ddl",
    [
        "CREATE TABLE intruder (x int)",
        "ALTER TABLE positions ADD COLUMN intruder int",
        "DROP TABLE geofences",
        "TRUNCATE positions",
        "DELETE FROM positions",
        "UPDATE positions SET lat = 0",
        "CREATE INDEX intruder ON positions (lat)",
        "ALTER TABLE last_position OWNER TO CURRENT_USER",
        "INSERT INTO schema_migrations (version, name, checksum) VALUES (999, 'x', 'x')",
    ],
)
def test_runtime_role_cannot_change_the_schema(database_url: str, runtime_database_url: str, ddl: str) -> None:
    apply_migrations(database_url)
    with psycopg.connect(runtime_database_url) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(ddl)


def test_runtime_role_skips_migrating_a_current_schema(database_url: str, runtime_database_url: str) -> None:
    """`processor run` as the runtime role: nothing to apply, nothing attempted; `processor migrate` too."""
    apply_migrations(database_url)
    assert ensure_schema(runtime_database_url, wait_s=0) == []
    assert apply_migrations(runtime_database_url) == []
    check_runtime_role(runtime_database_url)


def test_runtime_role_refuses_to_migrate_with_the_privilege_it_lacks(runtime_database_url: str, runtime_login: str) -> None:
    """Behind, and nobody migrates within the wait: one line naming the role and the privilege, exit 78."""
    with pytest.raises(MigrationError) as waited:
        ensure_schema(runtime_database_url, wait_s=0.5)
    with pytest.raises(MigrationError) as asked:
        apply_migrations(runtime_database_url)
    for error in (waited.value, asked.value):
        assert error.exit_code == ExitCode.CONFIG
        assert f"role {runtime_login} lacks CREATE on schema public" in str(error)
        assert "processor migrate" in str(error) and "\n" not in str(error)
    assert "nobody migrated it within" in str(waited.value)


def test_runtime_role_waits_for_the_owner_to_migrate(database_url: str, runtime_database_url: str) -> None:
    """The runtime role's instance waits while another (the owner) migrates, then goes on."""
    migrations = load_migrations()
    apply_migrations(database_url, migrations[:2])
    looks: list[int] = []
    owner: list[Future[list[Migration]]] = []

    with ThreadPoolExecutor(max_workers=1) as pool:

        def between() -> None:  # the supervisor's signal check; here: the owner migrates at the second look
            looks.append(1)
            if len(looks) == 2:
                owner.append(pool.submit(apply_migrations, database_url))

        assert ensure_schema(runtime_database_url, migrations, wait_s=60, between=between) == []
        assert len(looks) >= 2 and len(owner) == 1
        applied = owner[0].result(timeout=60)  # the owner's exception, if it raised one, fails the test here
    assert [m.version for m in applied] == [m.version for m in migrations[2:]]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == len(migrations)


def test_a_login_outside_the_runtime_role_is_named_with_what_it_lacks(database_url: str, bare_login: str) -> None:
    """A login role nobody granted processor_runtime: start-up says which privileges, and how to grant them."""
    apply_migrations(database_url)
    with pytest.raises(ConfigError) as refused:
        check_runtime_role(as_user(database_url, bare_login))
    message = str(refused.value)
    assert message.startswith(f"Postgres role {bare_login} lacks SELECT on table positions, INSERT on table positions")
    assert f"GRANT processor_runtime TO {bare_login}" in message and refused.value.exit_code == ExitCode.CONFIG


def test_partition_maintenance_as_the_runtime_role_changes_nothing(database_url: str, runtime_database_url: str) -> None:
    """A runtime-only instance (MIGRATION_DATABASE_URL unset) leaves partitions to the owner instead of halting 78."""
    from datetime import datetime, timedelta, timezone

    from supervisor.partitions import maintain, read_partitions

    apply_migrations(database_url)
    with psycopg.connect(database_url) as conn:
        before = [p.name for p in read_partitions(conn)]
    later = datetime.now(timezone.utc) + timedelta(days=30)  # tomorrow's partitions due, old ones expired
    assert maintain(runtime_database_url, 1, 300.0, now=later) is None
    with psycopg.connect(database_url) as conn:
        assert [p.name for p in read_partitions(conn)] == before
    assert maintain(database_url, 1, 300.0, now=later).created  # the owner does the work


def test_a_role_that_may_not_read_the_ledger_is_told_so_not_that_the_schema_is_behind(database_url: str) -> None:
    """A login role outside processor_runtime on a current schema cannot read schema_migrations: that
    missing grant is the news (the schema was said to be 6 migrations behind)."""
    apply_migrations(database_url)
    outsider = f"outsider_{abs(hash(database_url)) % 10**8}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {outsider}")
        conn.execute(f"CREATE ROLE {outsider} LOGIN")
    try:
        url = as_user(database_url, outsider)
        with pytest.raises(MigrationError) as waited:
            ensure_schema(url, wait_s=0.2)
        with pytest.raises(MigrationError) as asked:
            apply_migrations(url)
        for error in (waited.value, asked.value):
            message = str(error)
            assert error.exit_code == ExitCode.CONFIG and "\n" not in message
            assert f"role {outsider} may not read schema_migrations" in message and "behind" not in message
            assert f"GRANT {privileges.RUNTIME_ROLE} TO {outsider}" in message
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {outsider}")
            conn.execute(f"DROP ROLE {outsider}")
