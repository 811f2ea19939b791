"""Every command-line error path keeps passwords to itself (SPEC §4): wrong credentials in a
URL, in its query (`password`, `sslpassword`) or in a `*_FILE` secret end in a one-line
error and exit 78, and the secret appears nowhere in stdout, stderr or a panic dump.

The servers really check passwords: a throwaway Redis with `requirepass` and a throwaway
Postgres whose TCP connections need scram-sha-256 (the shared servers trust everyone).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from common.errors import ExitCode
from scripts.toolkit.services import ThrowawayPostgres, ThrowawayRedis
from tests.files import secret_file
from tests.ops.letters import run_cli

pytestmark = pytest.mark.e2e

RIGHT = "r1ght-" + uuid.uuid4().hex[:10]
WRONG = "wr0ng-" + uuid.uuid4().hex[:10]
KEY_PASSPHRASE = "k3y-" + uuid.uuid4().hex[:10]
SECRETS = (RIGHT, WRONG, KEY_PASSPHRASE)


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[str]:
    """host:port of a Redis whose default user needs RIGHT."""
    with ThrowawayRedis() as server:
        with redis.Redis.from_url(server.url) as admin:
            admin.config_set("requirepass", RIGHT)
        yield f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def locked_postgres() -> Iterator[str]:
    """host:port of a Postgres where `app` (owner of database `app`) logs in over TCP with RIGHT only."""
    with ThrowawayPostgres(fsync=False) as server:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute(f"create role app login password '{RIGHT}'")
            conn.execute("create role processor_runtime nologin")  # as a deployment's init script does
            conn.execute("create database app owner app")
            hba = conn.execute("show hba_file").fetchone()[0]
            Path(hba).write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
            conn.execute("select pg_reload_conf()")
        yield f"127.0.0.1:{server.port}"


def cli_env(panic_dir: Path, **env: str) -> dict[str, str]:
    """What every command here runs with: its own stream and panic dir, one shard, no HTTP port."""
    return {"HTTP_PORT": "0", "PANIC_DIR": str(panic_dir), "SHARDS": "1", "STREAM_KEY": f"test:{uuid.uuid4().hex[:8]}",
            **env}


def url_file(tmp_path: Path, url: str) -> str:
    """A secret file holding `url` as Docker and Kubernetes mount one: with a trailing newline."""
    return str(secret_file(tmp_path, url + "\n"))


# What the servers answer a wrong password with (Redis' WRONGPASS, libpq's FATAL), quoted in the line.
CAUSES = {
    "Redis": "invalid username-password pair or user is disabled",
    "Postgres": 'password authentication failed for user "app"',
}


def assert_refused_without_secrets(result: subprocess.CompletedProcess[str], panic_dir: Path, server: str) -> None:
    """Exit 78; one line (`processor:` on stderr, or `run`'s halt reason) naming the server and quoting
    its refusal of the password; no secret anywhere."""
    everything = result.stdout + result.stderr
    dumps = [path.read_text() for path in panic_dir.glob("*")] if panic_dir.exists() else []
    for secret in SECRETS:
        assert secret not in everything, f"{secret} leaked:\n{everything}"
        assert not any(secret in dump for dump in dumps), f"{secret} leaked into a panic dump"
    assert result.returncode == ExitCode.CONFIG, everything
    if result.args[-1] == "run":  # the supervisor logs JSON lines on stdout and halts with its reason
        halts = [json.loads(line) for line in result.stdout.splitlines() if '"supervisor halted"' in line]
        assert len(halts) == 1, result.stdout
        line = halts[0]["reason"]
    else:
        errors = [line for line in result.stderr.splitlines() if line.startswith("processor")]
        assert len(errors) == 1, result.stderr
        line = errors[0]
    assert f"{server} at " in line and CAUSES[server] in line, line


def assert_wrong_password_refused(
    tmp_path: Path, command: tuple[str, ...], service: str, name: str, template: str, env: dict[str, str], **values: str
) -> None:
    """`name` (or, for a "file:" template, `<name>_FILE`) holds the template filled in with WRONG and `values`,
    beside the right `env`: `service` refuses the command's password, and no secret is shown."""
    url = template.removeprefix("file:").format(wrong=WRONG, **values)
    variable = {f"{name}_FILE": url_file(tmp_path, url)} if template.startswith("file:") else {name: url}
    panic_dir = tmp_path / "panic"
    result = run_cli(cli_env(panic_dir, **env, **variable), *command)
    assert_refused_without_secrets(result, panic_dir, service)


@pytest.mark.parametrize("command", [("lag",), ("dlq", "list"), ("run",)], ids=" ".join)
@pytest.mark.parametrize(
    "template",
    [
        "redis://:{wrong}@{server}/0",
        "redis://default:{wrong}@{server}/0",
        "redis://{server}/0?password={wrong}",
        "file:redis://default:{wrong}@{server}/0",
    ],
    ids=["userinfo", "user-and-password", "query", "from-file"],
)
def test_wrong_redis_password(locked_redis, locked_postgres, tmp_path, command, template) -> None:  # type: ignore[no-untyped-def]
    """A wrong Redis password, however given, is exit 78 with one line; neither password is shown."""
    right = {"DATABASE_URL": f"postgresql://app:{RIGHT}@{locked_postgres}/app"}
    assert_wrong_password_refused(tmp_path, command, "Redis", "REDIS_URL", template, right, server=locked_redis)


@pytest.mark.parametrize("command", [("migrate",), ("geofences", "list"), ("run",)], ids=" ".join)
@pytest.mark.parametrize(
    "template",
    [
        "postgresql://app:{wrong}@{server}/app",
        "postgresql://{server}/app?user=app&password={wrong}",
        "postgresql://app:{wrong}@{server}/app?sslmode=disable&sslpassword={passphrase}",
        "file:postgresql://app:{wrong}@{server}/app?sslpassword={passphrase}&sslmode=prefer",
    ],
    ids=["userinfo", "query", "sslpassword", "from-file"],
)
def test_wrong_postgres_password(locked_redis, locked_postgres, tmp_path, command, template) -> None:  # type: ignore[no-untyped-def]
    """A wrong Postgres password (with a key passphrase beside it) is exit 78 with one line, no secret shown.

    `migrate` connects with MIGRATION_DATABASE_URL alone: DATABASE_URL is the right URL there, so
    that the only URL that could be refused is the wrong one (not the default of an unset DATABASE_URL).
    """
    right = {"REDIS_URL": f"redis://:{RIGHT}@{locked_redis}/0"}
    if command == ("migrate",):
        name = "MIGRATION_DATABASE_URL"
        right["DATABASE_URL"] = f"postgresql://app:{RIGHT}@{locked_postgres}/app"
    else:
        name = "DATABASE_URL"
    assert_wrong_password_refused(
        tmp_path, command, "Postgres", name, template, right, server=locked_postgres, passphrase=KEY_PASSPHRASE
    )


def test_right_passwords_from_files_work(locked_redis, locked_postgres, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The same secrets, right this time and read from files: migrate and lag succeed and print no secret."""
    env = {
        "REDIS_URL_FILE": url_file(tmp_path, f"redis://default:{RIGHT}@{locked_redis}/0"),
        "DATABASE_URL_FILE": url_file(tmp_path, f"postgresql://app:{RIGHT}@{locked_postgres}/app"),
        "LOG_LEVEL": "DEBUG",
    }
    for command in (("migrate",), ("lag",), ("geofences", "list")):
        result = run_cli(cli_env(tmp_path / "panic", **env), *command)
        assert result.returncode == ExitCode.OK, result.stderr
        assert not any(secret in result.stdout + result.stderr for secret in SECRETS)


def test_panic_dump_and_logs_hold_no_secret(locked_redis, locked_postgres, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A supervisor that panics with every kind of secret configured: exit 70, a dump, and no secret in it or the log."""
    env = {
        "REDIS_URL_FILE": url_file(tmp_path, f"redis://default:{RIGHT}@{locked_redis}/0"),
        "DATABASE_URL": f"postgresql://app:{RIGHT}@{locked_postgres}/app?sslmode=prefer&sslpassword={KEY_PASSPHRASE}",
        "MIGRATION_DATABASE_URL_FILE": url_file(tmp_path, f"postgresql://{locked_postgres}/app?user=app&password={RIGHT}"),
        "PROCESSOR_TEST_CRASH": "supervisor-uncaught",
        "LOG_LEVEL": "DEBUG",
    }
    result = run_cli(cli_env(tmp_path / "panic", **env), "run")
    assert result.returncode == ExitCode.SOFTWARE, result.stdout + result.stderr
    dumps = [path.read_text() for path in (tmp_path / "panic").glob("*.json")]
    assert len(dumps) == 1
    config = json.loads(dumps[0])["config"]
    assert config["database_url"].endswith("sslpassword=***") and config["migration_database_url"].endswith("password=***")
    for secret in SECRETS:
        assert secret not in result.stdout + result.stderr + dumps[0]
