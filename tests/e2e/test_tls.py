"""TLS to both servers (issue 11): rediss:// and sslmode=verify-full with a CA the test makes.

The pipeline, `processor migrate` and operator commands work over TLS; a CA that did not sign
the server's certificate is exit 78 at once with one line, never waited out as an outage.
The servers are this module's own (ThrowawayRedis/ThrowawayPostgres with `tls`); set-up and
checks use their plaintext side, the Processor only TLS.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator

import orjson
import psycopg
import pytest
import redis

from common.errors import ExitCode
from scripts.toolkit.certificates import Certificates, make_certificates, rediss_url, verify_full_url
from scripts.toolkit.roles import as_user, create_runtime_login
from scripts.toolkit.services import ThrowawayPostgres, ThrowawayRedis, with_database
from scripts.toolkit.writer import backlog
from tests.conftest import processor_env
from tests.e2e.processes import wait_for
from tests.e2e.verify import assert_exact, wait_settled
from tests.ops.letters import one_line, run_cli

pytestmark = pytest.mark.e2e

LOGIN = "tls_app"  # the runtime login (SPEC §3) on this module's own cluster
REFUSED_WITHIN_S = 10.0  # far below the supervisor's 60 s wait for a server that is down


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_redis(certificates: Certificates) -> Iterator[ThrowawayRedis]:
    with ThrowawayRedis(tls=certificates) as server:
        yield server


@pytest.fixture(scope="module")
def tls_postgres(certificates: Certificates) -> Iterator[ThrowawayPostgres]:
    with ThrowawayPostgres(fsync=False, tls=certificates) as server:
        create_runtime_login(server.url, LOGIN)
        yield server


@pytest.fixture
def owner_url(tls_postgres: ThrowawayPostgres) -> str:
    """A new database on the TLS cluster; the URL is its owner's, plaintext, for set-up and checks."""
    name = f"tls_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(tls_postgres.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(tls_postgres.url, name)


@pytest.fixture
def admin(tls_redis: ThrowawayRedis) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(tls_redis.url) as client:
        yield client


@pytest.fixture
def tls_env(tls_redis: ThrowawayRedis, owner_url: str, certificates: Certificates, tmp_path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The Processor's environment: every URL over TLS, verified against the test CA."""
    return processor_env(
        rediss_url(tls_redis.tls_port, certificates.ca),  # type: ignore[arg-type]
        verify_full_url(as_user(owner_url, LOGIN), certificates.ca),
        verify_full_url(owner_url, certificates.ca),
        f"tls:{uuid.uuid4().hex[:12]}:telemetry",
        tmp_path / "panic",
    )


def encrypted_backends(owner_url: str) -> list[tuple[str, bool]]:
    """(application name, ssl) of every other connection to the database."""
    with psycopg.connect(owner_url) as conn:
        return conn.execute(
            "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)"
            " WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()"
        ).fetchall()


def redis_clients_by_port(admin: redis.Redis) -> dict[int, set[str]]:
    """The names of Redis' clients, by the server port they connected to."""
    ports: dict[int, set[str]] = {}
    for client in admin.client_list():
        ports.setdefault(int(client["laddr"].rpartition(":")[2]), set()).add(client["name"])
    return ports


def test_pipeline_migrate_and_lag_over_tls(tls_env, tls_redis, admin, owner_url, start_processor):  # type: ignore[no-untyped-def]
    """migrate, run and lag with rediss:// and verify-full: every fix stored once, every poison entry
    dead-lettered once, and every connection of the Processor's to either server encrypted."""
    stream_key, instance = tls_env["STREAM_KEY"], tls_env["INSTANCE_ID"]
    migrate = run_cli(tls_env, "migrate")
    assert migrate.returncode == 0, migrate.stderr
    counts = backlog(admin, stream_key, 3_000, devices=30, seed=61, malformed_fraction=0.02)
    assert counts.malformed > 0
    processor = start_processor(tls_env)
    wait_settled(admin, owner_url, stream_key, 60)
    assert_exact(admin, owner_url, stream_key)

    shards = {f"{instance}-0", f"{instance}-1"}
    by_port = wait_for(lambda: shards <= (p := redis_clients_by_port(admin)).get(tls_redis.tls_port, set()) and p,
                       what="both shards connected to the TLS port")
    assert not {name for name in by_port.get(tls_redis.port, set()) if name.startswith((instance, "processor"))}
    backends = wait_for(lambda: len(b := encrypted_backends(owner_url)) >= 2 and b, what="the shards' connections")
    assert all(ssl for _, ssl in backends), backends

    lag = run_cli(tls_env, "lag", "--json")
    assert lag.returncode == 0, lag.stderr
    report = orjson.loads(lag.stdout)
    assert (report["pending"], report["lag"], report["dlq_length"]) == (0, 0, counts.malformed)
    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == ExitCode.OK


def test_a_wrong_ca_for_redis_is_exit_78_at_once(tls_env, tls_redis, certificates, start_processor):  # type: ignore[no-untyped-def]
    """ssl_ca_certs naming a CA that did not sign Redis' certificate: run and lag exit 78 at once, one line each."""
    env = {**tls_env, "REDIS_URL": rediss_url(tls_redis.tls_port, certificates.other_ca)}
    started = time.monotonic()
    processor = start_processor(env)
    assert processor.wait(REFUSED_WITHIN_S) == ExitCode.CONFIG
    assert processor.halted_reason().startswith(
        "TLS certificate of Redis at REDIS_URL not trusted: certificate verify failed: self-signed certificate"
    )
    assert "shard spawned" not in processor.log_messages()
    assert "Redis at REDIS_URL unreachable, waiting" not in processor.log_messages()

    lag = run_cli(env, "lag")
    assert lag.returncode == ExitCode.CONFIG
    assert one_line(lag).startswith(f"processor: TLS certificate of Redis at rediss://localhost:{tls_redis.tls_port}/0")
    assert "not trusted: certificate verify failed" in lag.stderr
    assert time.monotonic() - started < 2 * REFUSED_WITHIN_S


def test_a_wrong_ca_for_postgres_is_exit_78_at_once(tls_env, certificates, start_processor):  # type: ignore[no-untyped-def]
    """sslrootcert naming a CA that did not sign Postgres' certificate: run, migrate and an operator
    command exit 78 at once, one line each."""
    env = {
        **tls_env,
        "DATABASE_URL": tls_env["DATABASE_URL"].replace(str(certificates.ca), str(certificates.other_ca)),
        "MIGRATION_DATABASE_URL": tls_env["MIGRATION_DATABASE_URL"].replace(str(certificates.ca), str(certificates.other_ca)),
    }
    started = time.monotonic()
    processor = start_processor(env)
    assert processor.wait(REFUSED_WITHIN_S) == ExitCode.CONFIG
    reason = processor.halted_reason()
    assert reason.startswith("TLS certificate of Postgres at MIGRATION_DATABASE_URL not trusted:"), reason
    assert "certificate verify failed" in reason
    assert "shard spawned" not in processor.log_messages()

    for command in (("migrate",), ("geofences", "list")):
        result = run_cli(env, *command)
        assert result.returncode == ExitCode.CONFIG, result.stderr
        line = one_line(result)
        assert line.startswith("processor: TLS certificate of Postgres at postgresql://") and "certificate verify failed" in line
    assert time.monotonic() - started < 2 * REFUSED_WITHIN_S


def test_plaintext_to_the_tls_port_is_an_outage_with_a_reason(tls_env, tls_redis, start_processor):  # type: ignore[no-untyped-def]
    """redis:// to the TLS-only port: the server drops the connection, which looks like any lost
    connection, so lag exits 1 at once and run waits (announced, with the reason) until stopped."""
    env = {**tls_env, "REDIS_URL": f"redis://localhost:{tls_redis.tls_port}/0"}
    lag = run_cli(env, "lag")
    assert lag.returncode == ExitCode.FAILED
    assert one_line(lag).startswith(f"processor: cannot reach Redis at redis://localhost:{tls_redis.tls_port}/0:")
    processor = start_processor(env)
    waiting = wait_for(
        lambda: [e for e in processor.logs() if e["msg"] == "Redis at REDIS_URL unreachable, waiting"],
        REFUSED_WITHIN_S, what="the start-up wait announced",
    )
    assert waiting[0]["error"]
    processor.signal(signal.SIGTERM)
    assert processor.wait(REFUSED_WITHIN_S) == ExitCode.OK


def test_a_certificate_for_another_host_name_is_exit_78(tls_env, tls_postgres, certificates):  # type: ignore[no-untyped-def]
    """verify-full checks the name too: the right CA, but a host name the certificate does not carry."""
    url = (f"postgresql://postgres@db.example:{tls_postgres.port}/postgres"
           f"?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={certificates.ca}")
    result = run_cli({**tls_env, "DATABASE_URL": url}, "geofences", "list")
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert 'does not match host name "db.example"' in one_line(result)


def test_a_certificate_rotated_to_an_unknown_ca_halts_78_without_a_crash_loop(  # type: ignore[no-untyped-def]
    tls_env, tls_redis, admin, owner_url, certificates, start_processor
):
    """Redis switches to a certificate from a CA the Processor does not know, and drops every
    connection: the shards reconnect, are refused, exit 78, and the supervisor halts 78 rather
    than restarting them; what was stored stays stored exactly once."""
    stream_key = tls_env["STREAM_KEY"]
    backlog(admin, stream_key, 500, devices=10, seed=62)
    processor = start_processor(tls_env)
    wait_settled(admin, owner_url, stream_key, 60)
    admin.config_set("tls-cert-file", str(certificates.other_cert), "tls-key-file", str(certificates.other_key))
    try:
        admin.client_kill_filter(_type="normal", skipme=True)
        assert processor.wait(REFUSED_WITHIN_S) == ExitCode.CONFIG
    finally:
        admin.config_set("tls-cert-file", str(certificates.cert), "tls-key-file", str(certificates.key))
    assert processor.halted_reason().startswith("shard ")
    refusals = [e["error"] for e in processor.logs() if e["msg"] == "shard cannot work with this configuration"]
    assert refusals and refusals[0].startswith("TLS certificate of redis not trusted: certificate verify failed"), refusals
    assert not [m for m in processor.log_messages() if m.endswith("; restarting")]
    assert_exact(admin, owner_url, stream_key)
