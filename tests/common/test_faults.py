"""The error boundary: each exception class the code can meet, and the outcome it gets."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import psycopg
import psycopg.errors
import pytest
import redis.exceptions as rx

from common.errors import ConfigError, ConnectionRefusedForGood, InvalidEntry, MigrationError, ProcessorError, RowRejected
from common.faults import Outcome, acl_refusal, classify, one_line, server_of

O = Outcome


def pg(kind: type[psycopg.Error], message: str = "boom") -> psycopg.Error:
    return kind(message)


CASES = [
    # Redis: outages
    (rx.ConnectionError("Connection reset by peer"), O.OUTAGE),
    (rx.TimeoutError("Timeout reading from socket"), O.OUTAGE),
    (rx.BusyLoadingError("Redis is loading the dataset in memory"), O.OUTAGE),
    (rx.MaxConnectionsError("Too many connections"), O.OUTAGE),
    (rx.ReadOnlyError("You can't write against a read only replica."), O.OUTAGE),
    (rx.ResponseError("READONLY You can't write against a read only replica."), O.OUTAGE),
    (rx.ResponseError("LOADING Redis is loading the dataset in memory"), O.OUTAGE),
    # SCRIPT FLUSH between redis-py's SCRIPT EXISTS and a pipeline's EVALSHA
    (rx.NoScriptError("Command # 2 (EVALSHA 83f03cf1 4 s s:dlq) of pipeline caused error: ('No matching script. Please use EVAL.',)"), O.OUTAGE),
    (rx.ResponseError("NOSCRIPT No matching script. Please use EVAL."), O.OUTAGE),
    (rx.ResponseError("BUSY Redis is busy running a script."), O.OUTAGE),
    (rx.ResponseError("MASTERDOWN Link with MASTER is down"), O.OUTAGE),
    (rx.ResponseError("TRYAGAIN Multiple keys request during rehashing"), O.OUTAGE),
    (rx.ResponseError("OOM command not allowed when used memory > 'maxmemory'."), O.OUTAGE),
    # Redis: refused for good
    (rx.AuthenticationError("invalid username-password pair"), O.REFUSED),
    (rx.AuthorizationError("user is not authorized"), O.REFUSED),
    (rx.NoPermissionError("this user has no permissions to run the 'xadd' command"), O.REFUSED),
    (rx.ResponseError("NOPERM this user has no permissions to access one of the keys"), O.REFUSED),
    (rx.ResponseError("WRONGPASS invalid username-password pair"), O.REFUSED),
    (rx.ResponseError("DB index is out of range"), O.REFUSED),  # REDIS_URL's /99999 beyond `databases`
    (rx.InvalidResponse('Protocol error, got "H" as reply type byte'), O.REFUSED),  # REDIS_URL at an HTTP server
    (rx.ResponseError("NOAUTH Authentication required."), O.REFUSED),
    (rx.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), O.REFUSED),
    (rx.ResponseError("ERR unknown command 'XAUTOCLAIM', with args beginning with:"), O.REFUSED),
    # Redis: anything else is a bug of ours
    (rx.ResponseError("ERR syntax error"), O.BUG),
    (rx.DataError("Invalid input of type: 'dict'"), O.BUG),
    # Postgres: outages
    (pg(psycopg.OperationalError, "connection failed: Connection refused"), O.OUTAGE),
    (pg(psycopg.errors.AdminShutdown), O.OUTAGE),
    # A trigger or function of the operator's refusing a row (RAISE EXCEPTION, ASSERT): the row's failure.
    (pg(psycopg.errors.RaiseException), O.ROW_REJECTED),
    (pg(psycopg.errors.AssertFailure), O.ROW_REJECTED),
    (pg(psycopg.errors.CrashShutdown), O.OUTAGE),
    (pg(psycopg.errors.CannotConnectNow), O.OUTAGE),
    (pg(psycopg.errors.TooManyConnections), O.OUTAGE),
    (pg(psycopg.errors.DeadlockDetected), O.OUTAGE),
    (pg(psycopg.errors.SerializationFailure), O.OUTAGE),
    (pg(psycopg.errors.LockNotAvailable), O.OUTAGE),
    (pg(psycopg.errors.QueryCanceled), O.OUTAGE),
    (pg(psycopg.errors.DiskFull), O.OUTAGE),
    # The wraparound stop limit: every write refused, in any language (the raising function tells).
    (pg(psycopg.errors.ProgramLimitExceeded,
        'database is not accepting commands to avoid wraparound data loss in database "processor"'), O.OUTAGE),
    (pg(psycopg.errors.ProgramLimitExceeded, 'database is not accepting commands that generate new MultiXactIds '
        'to avoid wraparound data loss in database "processor"'), O.OUTAGE),
    (pg(psycopg.errors.ReadOnlySqlTransaction), O.OUTAGE),
    (pg(psycopg.errors.IdleInTransactionSessionTimeout), O.OUTAGE),
    (pg(psycopg.InterfaceError, "the connection is closed"), O.OUTAGE),
    # Postgres: refused for good
    (pg(psycopg.OperationalError, 'FATAL: password authentication failed for user "x"'), O.REFUSED),
    (pg(psycopg.OperationalError, 'invalid integer value "x" for connection option "keepalives_idle"'), O.REFUSED),
    (pg(psycopg.OperationalError, 'invalid port number: "70000"'), O.REFUSED),
    # The server refusing a URL's settings at connection (words only, no SQLSTATE).
    (pg(psycopg.OperationalError, 'failed: FATAL:  invalid value for parameter "client_encoding": "bogus"'), O.REFUSED),
    (pg(psycopg.OperationalError, 'failed: FATAL:  unrecognized configuration parameter "bogus_setting"'), O.REFUSED),
    (pg(psycopg.OperationalError, 'FATAL:  -5 kB is outside the valid range for parameter "work_mem" (64 .. 2147483647)'), O.REFUSED),
    (pg(psycopg.OperationalError, 'connection is bad: definition of service "nonexist" not found'), O.REFUSED),
    (pg(psycopg.OperationalError, 'FATAL: database "nope" does not exist'), O.REFUSED),
    (pg(psycopg.OperationalError, "no pg_hba.conf entry for host"), O.REFUSED),
    (pg(psycopg.errors.InvalidPassword), O.REFUSED),
    (pg(psycopg.errors.InvalidAuthorizationSpecification), O.REFUSED),
    (pg(psycopg.errors.InvalidCatalogName), O.REFUSED),
    (pg(psycopg.errors.InsufficientPrivilege, "permission denied for table positions"), O.REFUSED),
    (pg(psycopg.errors.UndefinedTable), O.REFUSED),
    (pg(psycopg.errors.UndefinedColumn), O.REFUSED),
    (pg(psycopg.errors.UndefinedFunction), O.REFUSED),
    # Postgres: one row at fault
    (pg(psycopg.errors.UniqueViolation), O.ROW_REJECTED),
    (pg(psycopg.errors.CheckViolation), O.ROW_REJECTED),
    (pg(psycopg.errors.ForeignKeyViolation), O.ROW_REJECTED),
    (pg(psycopg.errors.NumericValueOutOfRange), O.ROW_REJECTED),
    (pg(psycopg.errors.UntranslatableCharacter), O.ROW_REJECTED),
    (pg(psycopg.errors.InvalidTextRepresentation), O.ROW_REJECTED),
    (pg(psycopg.errors.ProgramLimitExceeded), O.ROW_REJECTED),
    (pg(psycopg.errors.ProgramLimitExceeded, "index row size 3000 exceeds btree version 4 maximum 2704"), O.ROW_REJECTED),
    (pg(psycopg.errors.StatementTooComplex, "stack depth limit exceeded"), O.ROW_REJECTED),
    # Postgres: our SQL is wrong
    (pg(psycopg.errors.SyntaxError), O.BUG),
    (pg(psycopg.errors.InFailedSqlTransaction), O.BUG),
    # The project's own
    (InvalidEntry("validate", "lat must be a number"), O.POISON),
    (InvalidEntry("decode", "data is not valid UTF-8 JSON"), O.POISON),
    (RowRejected("io cannot be encoded as jsonb"), O.ROW_REJECTED),
    (ConfigError("SHARDS must be a whole number"), O.REFUSED),
    (MigrationError("migration 0001 was changed"), O.REFUSED),
    (ConnectionRefusedForGood("redis refused"), O.REFUSED),
    (ProcessorError("operation failed"), O.BUG),
    # Builtins and the rest
    (ConnectionResetError(104, "Connection reset by peer"), O.OUTAGE),
    (ConnectionRefusedError(111, "Connection refused"), O.OUTAGE),
    (BrokenPipeError(32, "Broken pipe"), O.OUTAGE),
    (TimeoutError(), O.OUTAGE),
    (asyncio.TimeoutError(), O.OUTAGE),
    (socket.gaierror(-3, "Temporary failure in name resolution"), O.OUTAGE),
    (asyncio.CancelledError(), O.CANCELLED),
    (KeyboardInterrupt(), O.CANCELLED),
    (FileNotFoundError(2, "No such file"), O.BUG),
    (ValueError("bad"), O.BUG),
    (KeyError("x"), O.BUG),
    (RecursionError("maximum recursion depth exceeded"), O.BUG),
    (MemoryError(), O.BUG),
]


@pytest.mark.parametrize(("exc", "outcome"), CASES, ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.name)
def test_each_exception_class_has_one_outcome(exc: BaseException, outcome: Outcome) -> None:
    """classify() maps the exception to the outcome the pipeline acts on."""
    assert classify(exc) is outcome


def test_server_of_names_the_client_library() -> None:
    """An outage is attributed to the server whose client raised it."""
    assert server_of(rx.ConnectionError()) == "redis"
    assert server_of(psycopg.OperationalError()) == "postgres"
    assert server_of(ConnectionResetError()) is None


def test_one_line_masks_passwords_and_folds_lines() -> None:
    """Messages quoted in logs and command output never carry a URL's password."""
    exc = rx.ConnectionError("Error connecting to redis://user:s3cret@host:6379/0\nsecond line")
    text = one_line(exc)
    assert "s3cret" not in text
    assert "\n" not in text


def test_a_pipelines_acl_refusal_reads_as_redis_said_it() -> None:
    """redis-py annotates a pipeline's failed command with its error's args as a tuple; the line kept
    its closing `",)`."""
    annotated = rx.NoPermissionError(
        """Command # 1 (XACK s g 1-0) of pipeline caused error: ("this user has no permissions to run the 'xack' command",)""")
    assert acl_refusal(annotated, "redis://u:pw@h:6379/0") == (
        "Redis user u may not run XACK: this user has no permissions to run the 'xack' command (OPERATIONS.md, Redis ACL user)")


class _LocalizedWraparound(psycopg.errors.ProgramLimitExceeded):
    """The wraparound stop as a server with lc_messages=de_DE sends it: only the raising function is in English."""

    @property
    def diag(self) -> SimpleNamespace:  # type: ignore[override]
        return SimpleNamespace(source_function="GetNewTransactionId")


def test_the_wraparound_stop_is_an_outage_in_any_language() -> None:
    stop = _LocalizedWraparound("Datenbank nimmt keine Befehle an, um Datenverlust durch Wraparound zu vermeiden")
    assert classify(stop) is O.OUTAGE
