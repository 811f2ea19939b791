"""Fixtures: real Redis and Postgres, a fresh database and fresh stream keys per test."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from contextlib import ExitStack

import psycopg
import pytest
import redis
from psycopg import sql

from common import early_signals
from common.config import Settings
from scripts.toolkit.roles import as_user, create_runtime_login, drop_login
from tests.services import provide_postgres, provide_redis, with_database


@pytest.fixture(autouse=True)
def stop_signals_restored() -> Iterator[None]:
    """A test that runs process code in the test's own process (a command's end sets the stop
    signals to SIG_IGN) must not leave them so: every process a later test starts would inherit
    the ignored SIGINT, and a test that interrupts one saw it run to the end."""
    before = {signum: signal.getsignal(signum) for signum in early_signals.STOP_SIGNALS}
    yield
    for signum, handler in before.items():
        if handler is not None and signal.getsignal(signum) != handler:
            signal.signal(signum, handler)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with ExitStack() as stack:
        yield provide_redis(stack)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    with ExitStack() as stack:
        yield provide_postgres(stack)


@pytest.fixture
def database_url(pg_admin_url: str) -> Iterator[str]:
    """A new, empty database for this test, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield with_database(pg_admin_url, name)
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def runtime_login(pg_admin_url: str) -> Iterator[str]:
    """A login role IN ROLE processor_runtime (SPEC §3): what the e2e tests' DATABASE_URL connects as."""
    name = f"test_app_{uuid.uuid4().hex[:12]}"
    create_runtime_login(pg_admin_url, name)
    yield name
    drop_login(pg_admin_url, name)


@pytest.fixture
def bare_login(pg_admin_url: str) -> Iterator[str]:
    """A login role of its own that nobody granted processor_runtime, dropped afterwards.

    Request it before `start_processor`, so that the processes connected as it are killed first.
    """
    name = f"test_bare_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    yield name
    drop_login(pg_admin_url, name)


@pytest.fixture
def runtime_database_url(database_url: str, runtime_login: str) -> str:
    """This test's database, as the runtime login: no DDL rights, only what the migrations grant."""
    return as_user(database_url, runtime_login)


@pytest.fixture
def stream_key(redis_url: str) -> Iterator[str]:
    """A stream key of this test's own; it and its DLQ are deleted afterwards."""
    key = f"test:{uuid.uuid4().hex[:12]}:telemetry"
    yield key
    with redis.Redis.from_url(redis_url) as client:
        client.delete(key, f"{key}:dlq", *client.scan_iter(match=f"{key}:*", count=1000))


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as client:
        yield client


@pytest.fixture
def env(redis_url: str, database_url: str, runtime_database_url: str, stream_key: str, tmp_path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Environment for a processor under test: its own stream, database and panic dir.

    As in production, the shards and operator commands connect as the runtime role and only
    the migrations as the database's owner.
    """
    return processor_env(redis_url, runtime_database_url, database_url, stream_key, tmp_path / "panic")


def processor_env(redis_url: str, database_url: str, migration_url: str, stream_key: str, panic_dir) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The settings every processor under test starts from: its own stream, consumers and panic dir."""
    return {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "MIGRATION_DATABASE_URL": migration_url,
        "STREAM_KEY": stream_key,
        "INSTANCE_ID": f"t{uuid.uuid4().hex[:6]}",
        "SHARDS": "2",
        "HTTP_PORT": "0",
        "PANIC_DIR": str(panic_dir),
        "DRAIN_TIMEOUT_S": "10",
        "LOG_LEVEL": "INFO",
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture
def start_processor(tmp_path):  # type: ignore[no-untyped-def]
    """Factory: start `processor <args>` with an env; every process is killed at teardown."""
    from tests.e2e.processes import ProcessorProcess

    started: list[ProcessorProcess] = []

    def start(env: dict[str, str], *args: str, name: str = "processor") -> ProcessorProcess:
        process = ProcessorProcess(env, tmp_path / f"{name}-{len(started)}.log", *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()
