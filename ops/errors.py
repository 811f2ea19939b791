"""The command line's error boundary: the one place where a Redis or Postgres failure becomes a message.

Every command talks to Redis through `redis_client` and to Postgres through `postgres`.
Whatever the client library raises, `common.faults.classify` decides what it means:

- OUTAGE: "cannot reach Redis at <url>: …" (exit 1; running it again later may work);
- REFUSED: one line naming what was refused, a missing privilege, a wrong password, a
  missing table ("run `processor migrate` first"), exit 78: repeating cannot help;
- any other error the server or its client library raised (a row rejected, a command the
  server refused): "Postgres rejected the command: …" (exit 1);
- anything else (a bug of ours, Ctrl-C) propagates unchanged.

Messages are one line and never show a password.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import redis

from common import refusals
from common.config import redact_url
from common.errors import ExitCode, ProcessorError
from common.faults import Outcome, classify, one_line, server_of, untrusted_certificate
from common.postgres import POOLER_SAFE, AnswerBounded
from common.redis_client import keep_field_pairs, sync_client

REDIS_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10
CLIENT_NAME = "processor-cli"  # Redis CLIENT LIST and Postgres application_name

REDIS, POSTGRES = "Redis", "Postgres"
_LIBRARY = {REDIS: "redis", POSTGRES: "postgres"}  # as common.faults.server_of names them

# Postgres SQLSTATEs that mean the schema is not (fully) migrated.
SCHEMA_SQLSTATES = frozenset({"42P01", "42703", "42883", "3F000"})
PRIVILEGE_SQLSTATE = "42501"
REDIS_CREDENTIALS = (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError)


class UsageError(ProcessorError):
    """The command line asks for something that cannot be done as asked (exit 2)."""

    exit_code = ExitCode.USAGE


class Refused(ProcessorError):
    """A server refused us for good: credentials, a privilege, the schema (exit 78)."""

    exit_code = ExitCode.CONFIG


class SchemaMissing(Refused):
    """The database has not been migrated (far enough) for this command."""


@contextmanager
def redis_client(url: str, *, unreachable: str = "cannot reach", note: str = "") -> Iterator[redis.Redis]:
    """A Redis client returning bytes; its failures become one-line ProcessorErrors.

    `unreachable` starts the message of an outage ("cannot reach" Redis at <url>); `note`
    ends every message (what has been done already, say).
    """
    client = sync_client(url, REDIS_TIMEOUT_S, CLIENT_NAME)
    keep_field_pairs(client)  # stream entries as flat [name, value, …] lists: names may repeat
    try:
        with translated(REDIS, url, unreachable=unreachable, note=note):
            yield client
    finally:
        client.close()


@contextmanager
def postgres(url: str) -> Iterator[psycopg.Connection]:
    """A connection, committed when the block ends (rolled back on an error); failures as in `redis_client`."""
    with translated(POSTGRES, url, unreachable="cannot connect to", connecting=True):
        conn = AnswerBounded.connect(url, connect_timeout=CONNECT_TIMEOUT_S, application_name=CLIENT_NAME, **POOLER_SAFE)
    with translated(POSTGRES, url), conn:
        yield conn


@contextmanager
def translated(
    server: str, url: str, *, unreachable: str = "cannot reach", note: str = "", connecting: bool = False
) -> Iterator[None]:
    """Turn an error of `server`'s client inside the block into a ProcessorError (see the module docstring)."""
    try:
        yield
    except Exception as exc:
        error = translate(server, url, exc, unreachable=unreachable, note=note, connecting=connecting)
        if error is None:
            raise
        raise error from None


def translate(
    server: str, url: str, exc: Exception, *, unreachable: str = "cannot reach", note: str = "", connecting: bool = False
) -> ProcessorError | None:
    """The ProcessorError that stands for `exc`, or None when `exc` is to propagate as it is."""
    if isinstance(exc, ProcessorError):
        return None  # ours, already a message
    library = server_of(exc)
    if library not in (None, _LIBRARY[server]):
        return None  # the other server's: its own boundary translates it
    outcome = classify(exc)
    message = one_line(exc)
    if outcome is Outcome.OUTAGE:
        return ProcessorError(f"{unreachable} {server} at {redact_url(url)}: {message}{note}")
    if outcome is Outcome.REFUSED:
        return _refusal(server, url, exc, message, connecting, note)
    if library is None or outcome is Outcome.CANCELLED:
        return None  # not a server's answer: a bug of ours, or shutdown
    return ProcessorError(f"{server} rejected the command: {message}{note}")


def _refusal(server: str, url: str, exc: Exception, message: str, connecting: bool, note: str) -> Refused:
    """One line naming what was refused, and what to do about it where that is clear."""
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate in SCHEMA_SQLSTATES:
        return SchemaMissing(
            f"the database schema is missing or out of date ({message}); run `processor migrate` first{note}"
        )
    untrusted = untrusted_certificate(exc)
    if untrusted is not None:
        return Refused(f"TLS certificate of {server} at {redact_url(url)} not trusted: {untrusted}{note}")
    explained = refusals.describe(exc, redis_url=url, database_url=url if server == POSTGRES else None)
    if explained:
        return Refused(f"{explained}{note}")
    what = "the connection" if connecting else "the command"
    hint = ""
    if sqlstate == PRIVILEGE_SQLSTATE or isinstance(exc, redis.exceptions.NoPermissionError) or message.startswith("NOPERM"):
        hint = f" (the {server} user lacks this privilege)"
    elif isinstance(exc, REDIS_CREDENTIALS) or message.startswith(("WRONGPASS", "NOAUTH")) or sqlstate in ("28000", "28P01"):
        what = "the credentials"
    return Refused(f"{server} at {redact_url(url)} refused {what}: {message}{hint}{note}")
