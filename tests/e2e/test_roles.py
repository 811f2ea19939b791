"""`processor run` and the operator commands as a runtime login (SPEC §3): what it may not do is named, exit 78.

The `env` fixture already runs every e2e test as a login in processor_runtime, with the
migrations as the database's owner; these tests take privileges away and add the waits.
"""

from __future__ import annotations

import signal
import time

import pytest

from common.errors import ExitCode
from scripts.toolkit.roles import as_user
from scripts.toolkit.writer import backlog
from supervisor.migrations import apply_migrations
from tests.e2e.processes import wait_for
from tests.e2e.verify import assert_exact, stored_count, wait_settled
from tests.files import collection, feature, geojson_file
from tests.ops.letters import one_line, run_cli
from tests.services import execute

pytestmark = pytest.mark.e2e


def test_a_login_outside_the_runtime_role_halts_78_before_any_shard(database_url, bare_login, env, start_processor):
    """Start-up checks DATABASE_URL's privileges: one line naming the role and what it lacks; no shard is forked."""
    processor = start_processor({**env, "DATABASE_URL": as_user(database_url, bare_login)})
    assert processor.wait(30) == ExitCode.CONFIG
    reason = processor.halted_reason()
    assert f"Postgres role {bare_login} lacks SELECT on table positions" in reason
    assert "GRANT processor_runtime" in reason
    assert "shard spawned" not in processor.log_messages()


def test_a_privilege_revoked_while_running_halts_78_without_a_crash_loop(
    redis_client, database_url, runtime_login, stream_key, env, start_processor
):
    """INSERT on positions taken away mid-run: the shard names role, table and privilege, exits 78, the
    supervisor halts 78 without restarting it; nothing is dead-lettered and, granted again, all is stored once."""
    backlog(redis_client, stream_key, 2_000, devices=20, seed=31)
    processor = start_processor({**env, "SHARDS": "1"})
    wait_settled(redis_client, database_url, stream_key, 60)
    execute(database_url, "REVOKE INSERT ON positions FROM processor_runtime")
    backlog(redis_client, stream_key, 1_000, devices=20, seed=32, start_ms=int(time.time() * 1000) - 3_600_000)
    assert processor.wait(30) == ExitCode.CONFIG
    critical = [e for e in processor.logs() if e["msg"] == "shard cannot work with this configuration"]
    assert critical, processor.log_messages()[-10:]
    assert f"Postgres role {runtime_login} lacks INSERT on table positions" in critical[0]["error"], critical[0]
    assert processor.log_messages().count("shard spawned") == 1, "a refused shard must not be restarted"
    assert "lacks INSERT on table positions" in processor.halted_reason(), "the supervisor's halt says why"
    assert redis_client.xlen(f"{stream_key}:dlq") == 0 and stored_count(database_url) == 2_000

    execute(database_url, "GRANT INSERT ON positions TO processor_runtime")
    again = start_processor({**env, "SHARDS": "1"}, name="again")
    wait_settled(redis_client, database_url, stream_key, 60)
    assert_exact(redis_client, database_url, stream_key)
    again.signal(signal.SIGTERM)
    assert again.wait(30) == ExitCode.OK


def test_a_runtime_only_instance_waits_for_the_owner_to_migrate(
    redis_client, database_url, runtime_database_url, stream_key, env, start_processor
):
    """No DDL rights and an unmigrated database: announced wait; `processor migrate` as the owner lets it go on."""
    backlog(redis_client, stream_key, 500, devices=10, seed=33)
    processor = start_processor({**env, "MIGRATION_DATABASE_URL": runtime_database_url})
    waiting = "schema is behind and this role may not change it: waiting for its owner to migrate it"
    wait_for(lambda: waiting in processor.log_messages(), 30, what="the announced wait")
    assert "shard spawned" not in processor.log_messages()
    migrated = run_cli({**env, "MIGRATION_DATABASE_URL": database_url}, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    wait_settled(redis_client, database_url, stream_key, 60)
    assert_exact(redis_client, database_url, stream_key)
    assert "schema brought up to date by its owner" in processor.log_messages()


def test_processor_migrate_as_the_runtime_role(database_url, env):
    """Current schema: nothing to do, exit 0. Behind: one line naming role and privilege, exit 78."""
    behind = run_cli({**env, "MIGRATION_DATABASE_URL": env["DATABASE_URL"]}, "migrate")
    assert behind.returncode == ExitCode.CONFIG, behind.stderr
    assert "lacks CREATE on schema public" in one_line(behind), behind.stderr
    apply_migrations(database_url)
    current = run_cli({**env, "MIGRATION_DATABASE_URL": env["DATABASE_URL"]}, "migrate")
    assert current.returncode == 0, current.stderr


def test_an_operator_command_names_the_privilege_it_lacks(database_url, env, tmp_path):
    """`geofences import` without INSERT on geofences: exit 78, one line with role, table and privilege."""
    apply_migrations(database_url)
    execute(database_url, "REVOKE INSERT ON geofences FROM processor_runtime")
    depot = feature("Depot", {"type": "Point", "coordinates": [10.0, 50.0]}, radius_m=50)
    path = geojson_file(tmp_path / "one.geojson", collection(depot))
    result = run_cli(env, "geofences", "import", str(path))
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "lacks INSERT on table geofences" in one_line(result), result.stderr


def test_an_owner_who_may_not_create_roles_is_told_what_a_superuser_runs(tmp_path, env):
    """A plain owner (no superuser, no CREATEROLE) on a cluster without processor_runtime: one line, 78, and
    the statement to run once; after it, the same owner migrates everything and its runtime login works."""
    from scripts.toolkit.services import ThrowawayPostgres, with_database

    with ThrowawayPostgres(fsync=False) as server:
        admin = with_database(server.url, "postgres")
        execute(admin, "CREATE ROLE fleet_owner LOGIN")
        execute(admin, "CREATE DATABASE fleet OWNER fleet_owner")
        owner_url = as_user(with_database(server.url, "fleet"), "fleet_owner")
        run_env = {**env, "DATABASE_URL": owner_url, "MIGRATION_DATABASE_URL": owner_url}
        refused = run_cli(run_env, "migrate")
        assert refused.returncode == ExitCode.CONFIG, refused.stderr
        line = one_line(refused)
        assert "may not create the role processor_runtime" in line and "CREATE ROLE processor_runtime NOLOGIN" in line, line

        execute(admin, "CREATE ROLE processor_runtime NOLOGIN")
        execute(admin, "CREATE ROLE fleet_app LOGIN IN ROLE processor_runtime")
        assert run_cli(run_env, "migrate").returncode == 0
        app_url = as_user(with_database(server.url, "fleet"), "fleet_app")
        listed = run_cli({**env, "DATABASE_URL": app_url, "MIGRATION_DATABASE_URL": app_url}, "geofences", "list")
        assert listed.returncode == 0, listed.stderr
