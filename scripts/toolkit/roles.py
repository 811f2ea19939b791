"""Postgres roles for tests, the demo and the benchmark: a login role in `processor_runtime` (SPEC §3).

The migrations create `processor_runtime` too; making it here first lets a login role join it
before any database is migrated. Roles belong to the cluster, so two processes may race to
create one: the loser finds it made.
"""

from __future__ import annotations

import contextlib
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from common.privileges import RUNTIME_ROLE


def as_user(url: str, user: str, password: str | None = None) -> str:
    """The same server and database, connecting as `user`."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    userinfo = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
    return urlunsplit((parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, parts.fragment))


def ensure_role(conn: psycopg.Connection, ddl: str) -> None:
    """Run one CREATE ROLE, taking "it exists already" (another process won the race) as done."""
    with contextlib.suppress(psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
        conn.execute(ddl)


def create_runtime_login(admin_url: str, name: str, password: str | None = None) -> None:
    """A login role `name` IN ROLE processor_runtime, as OPERATIONS.md tells operators to make."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        ensure_role(conn, f"CREATE ROLE {RUNTIME_ROLE} NOLOGIN")
        secret = sql.SQL(" PASSWORD {}").format(sql.Literal(password)) if password else sql.SQL("")
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN{} IN ROLE {}").format(
                sql.Identifier(name), secret, sql.Identifier(RUNTIME_ROLE)
            )
        )


def drop_login(admin_url: str, name: str) -> None:
    """Drop a login made by `create_runtime_login` (what it owns in dropped databases is gone already)."""
    with contextlib.suppress(psycopg.Error), psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
