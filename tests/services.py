"""Which Redis and Postgres the tests use: the given ones when they answer, else throwaway servers;
and `execute`, one statement run as a URL's role.

Tests never depend on the shared servers' state: each test gets its own database and its
own stream keys. Tests that stop or restart a server start their own (ThrowawayRedis,
ThrowawayPostgres) instead.
"""

from __future__ import annotations

import os
import shutil
from contextlib import ExitStack

import psycopg

from scripts.toolkit.services import ThrowawayPostgres, ThrowawayRedis, postgres_reachable, redis_reachable, with_database

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _docker_engine() -> bool:
    return shutil.which("docker") is not None and os.path.exists("/var/run/docker.sock")


def provide_redis(stack: ExitStack) -> str:
    url = os.environ.get("TEST_REDIS_URL") or os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    if redis_reachable(url):
        return url
    if _docker_engine():
        from testcontainers.redis import RedisContainer

        container = stack.enter_context(RedisContainer("redis:7"))
        return f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
    return stack.enter_context(ThrowawayRedis()).url


def provide_postgres(stack: ExitStack) -> str:
    """A URL of a server where we may create databases (its `postgres` database)."""
    given = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    url = with_database(given, "postgres") if given else DEFAULT_PG_ADMIN_URL
    if postgres_reachable(url):
        return url
    if _docker_engine():
        from testcontainers.postgres import PostgresContainer

        container = stack.enter_context(PostgresContainer("postgres:15", driver=None))
        return with_database(container.get_connection_url(), "postgres")
    return stack.enter_context(ThrowawayPostgres(fsync=False)).url


def execute(url: str, sql: str) -> None:
    """One statement, committed at once, as the role of `url` (the owner's DDL and GRANTs, an admin's CREATE ROLE)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)
