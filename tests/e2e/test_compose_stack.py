"""The Compose stack's secrets work against real servers, as the containers would use them.

No Docker here, so the stack is played by hand: `python -m scripts.secrets` writes the
files; a redis-server loads the generated ACL file (`--aclfile`, as in docker-compose.yml);
a throwaway Postgres gets the owner of POSTGRES_USER and runs deploy/postgres-init's script,
as the postgres image's entrypoint does; the processor reads its URLs from the files (the
host names `redis` and `postgres` swapped for the test's ports). Then a fix XADDed as the
`ingestion` user is stored by `processor run` as the ACL user `processor` and processor_app.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg
import pytest
import redis

from common.errors import ExitCode
from scripts import secrets as stack_secrets
from scripts.toolkit.services import ThrowawayPostgres, free_port
from tests.e2e.processes import wait_for
from tests.test_deployment import service

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]
INIT_SCRIPT = ROOT / "deploy" / "postgres-init" / "10-processor-roles.sh"
STREAM_KEY = "telemetry:t"


def password(directory: Path, name: str) -> str:
    return (directory / name).read_text().strip()


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "secrets"
    stack_secrets.generate(directory, STREAM_KEY, f"{STREAM_KEY}:dlq")
    return directory


@pytest.fixture
def acl_redis(secrets_dir: Path, tmp_path: Path) -> Iterator[int]:
    """A redis-server started as docker-compose.yml starts it, with the generated ACL file; its port."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed")
    port = free_port()
    acl = secrets_dir / "redis_acl"
    version = re.search(r"v=(\d+)\.(\d+)", subprocess.run([binary, "--version"], capture_output=True, text=True).stdout)
    if version and tuple(map(int, version.groups())) < (7, 2):
        # The stack's Redis is 7.2; 7.0 here does not know CLIENT SETINFO, the one permission
        # the file adds for 7.2, and would refuse the whole file.
        acl = tmp_path / "redis_acl_7_0"
        acl.write_text((secrets_dir / "redis_acl").read_text().replace(f" {stack_secrets.REDIS_7_2_PERMISSIONS}", ""))
    log = open(tmp_path / "redis.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--aclfile", str(acl)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        healthcheck = redis.Redis(port=port, username="healthcheck", password=password(secrets_dir, "redis_healthcheck_password"))
        wait_for(lambda: _answers(healthcheck), 10, what="redis-server with the ACL file")
        healthcheck.close()
        yield port
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def stack_postgres(secrets_dir: Path) -> Iterator[int]:
    """A Postgres set up as the postgres image does from the secrets: the owner, its database, the init script."""
    with ThrowawayPostgres(fsync=False) as server:
        with psycopg.connect(server.url, autocommit=True) as conn:
            owner_password = password(secrets_dir, "postgres_owner_password")
            conn.execute(f"create role processor superuser login password '{owner_password}'")
            conn.execute("create database processor owner processor")
        env = {"PATH": os.environ["PATH"], "PGHOST": "127.0.0.1", "PGPORT": str(server.port),
               "POSTGRES_USER": "processor", "POSTGRES_DB": "processor",
               "RUNTIME_PASSWORD_FILE": str(secrets_dir / "postgres_runtime_password")}
        for _ in range(2):  # made only if missing: a second run changes nothing
            result = subprocess.run(["sh", str(INIT_SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            assert password(secrets_dir, "postgres_runtime_password") not in result.stdout + result.stderr
        yield server.port


def local_copy(secrets_dir: Path, tmp_path: Path, redis_port: int, postgres_port: int) -> dict[str, str]:
    """The processor's *_FILE variables, its URL files pointing at this test's servers."""
    local = tmp_path / "local-secrets"
    local.mkdir()
    env = {}
    for name in ("database_url", "migration_database_url", "redis_url"):
        text = (secrets_dir / name).read_text()
        text = text.replace("@postgres:5432/", f"@127.0.0.1:{postgres_port}/").replace("@redis:6379/", f"@127.0.0.1:{redis_port}/")
        (local / name).write_text(text)
        env[f"{name.upper()}_FILE"] = str(local / name)
    return env


def test_init_script_makes_the_roles(secrets_dir: Path, stack_postgres: int) -> None:
    """processor_runtime is NOLOGIN; processor_app logs in, is a member of it and holds no other power."""
    url = f"postgresql://processor:{password(secrets_dir, 'postgres_owner_password')}@127.0.0.1:{stack_postgres}/processor"
    with psycopg.connect(url) as conn:
        roles = {row[0]: row[1:] for row in conn.execute(
            "select rolname, rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolpassword is not null"
            " from pg_authid where rolname in ('processor_runtime', 'processor_app')")}
        member = conn.execute("select pg_has_role('processor_app', 'processor_runtime', 'member')").fetchone()[0]
    assert roles == {"processor_runtime": (False, False, False, False, False), "processor_app": (True, False, False, False, True)}
    assert member


def test_acl_users_are_confined(secrets_dir: Path, acl_redis: int) -> None:
    """default is off; ingestion may only XADD to the stream; healthcheck only PING; processor only its keys."""
    anonymous = redis.Redis(port=acl_redis)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    ingestion = redis.Redis(port=acl_redis, username="ingestion", password=password(secrets_dir, "redis_ingestion_password"))
    assert ingestion.xadd(STREAM_KEY, {"data": "{}"})
    for forbidden in (lambda: ingestion.xadd("elsewhere", {"data": "{}"}), lambda: ingestion.xlen(STREAM_KEY)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()
    healthcheck = redis.Redis(port=acl_redis, username="healthcheck", password=password(secrets_dir, "redis_healthcheck_password"))
    with pytest.raises(redis.exceptions.NoPermissionError):
        healthcheck.get(STREAM_KEY)
    processor = redis.Redis(port=acl_redis, username="processor", password=password(secrets_dir, "redis_processor_password"))
    assert processor.xlen(STREAM_KEY) == 1
    with pytest.raises(redis.exceptions.NoPermissionError):
        processor.get("someone-elses-key")
    for client in (anonymous, ingestion, healthcheck, processor):
        client.close()


def test_processor_runs_on_the_generated_secrets(secrets_dir: Path, acl_redis: int, stack_postgres: int, tmp_path: Path) -> None:
    """migrate as the owner, then run as processor_app and the ACL user: a fix from `ingestion` is stored once."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "SHARDS": "1", "HTTP_PORT": "0",
           "INSTANCE_ID": f"stack{uuid.uuid4().hex[:6]}", "PANIC_DIR": str(tmp_path / "panic"), "DRAIN_TIMEOUT_S": "5",
           **local_copy(secrets_dir, tmp_path, acl_redis, stack_postgres)}
    migrate = subprocess.run([sys.executable, "-m", "ops", "migrate"], env=env, capture_output=True, text=True, timeout=120)
    assert migrate.returncode == ExitCode.OK, migrate.stdout + migrate.stderr

    ingestion = redis.Redis(port=acl_redis, username="ingestion", password=password(secrets_dir, "redis_ingestion_password"))
    fix = {"device_id": "stack-1", "ts": 1_700_000_000_000, "lat": 52.5, "lon": 13.4}
    ingestion.xadd(STREAM_KEY, {"data": orjson.dumps(fix)})
    ingestion.close()

    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115 - closed below
    run = subprocess.Popen([sys.executable, "-m", "ops", "run"], env=env, stdout=log, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        owner_url = Path(env["MIGRATION_DATABASE_URL_FILE"]).read_text().strip()
        with psycopg.connect(owner_url, autocommit=True) as conn:
            stored = "select count(*) from positions where device_id = 'stack-1'"
            wait_for(lambda: run.poll() is not None or conn.execute(stored).fetchone()[0], 30, what="the fix stored")
            assert run.poll() is None, f"processor run exited {run.returncode}:\n{(tmp_path / 'run.log').read_text()[-3000:]}"
            count = conn.execute(stored).fetchone()[0]
        run.send_signal(signal.SIGTERM)
        assert run.wait(30) == ExitCode.OK
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
        log.close()
    assert count == 1
    output = (tmp_path / "run.log").read_text() + migrate.stdout + migrate.stderr
    for name in stack_secrets.PASSWORDS:
        assert password(secrets_dir, name) not in output


def test_redis_health_check_of_the_compose_file_passes(secrets_dir: Path, acl_redis: int) -> None:
    """docker-compose.yml's Redis health check, run as written (secrets from the test's directory), passes;
    with another password it fails."""
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli not installed")
    kind, command = service("redis")["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    command = command.replace("$$", "$").replace("/run/secrets/", f"{secrets_dir}/")
    command = command.replace("redis-cli ", f"redis-cli -p {acl_redis} ", 1)
    assert subprocess.run(["sh", "-c", command], timeout=10).returncode == 0
    (secrets_dir / "redis_healthcheck_password").write_text("not-the-password\n")
    assert subprocess.run(["sh", "-c", command], timeout=10, capture_output=True).returncode != 0
