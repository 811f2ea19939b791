"""The error boundary: every exception the Processor can meet, mapped to what happens next.

One decision, made here and nowhere else. Callers catch broadly and ask `classify`:

- OUTAGE: a server is unreachable, restarting, read-only or full, refusing new transactions
  (its wraparound stop), or `positions` has no partition for a row yet (partition maintenance
  is behind). Pause with backoff and retry;
  dead-letter nothing.
- REFUSED: credentials, a missing privilege, a missing table, an unsupported server, a
  server at REDIS_URL that does not speak Redis' protocol, or a
  TLS certificate the client does not trust (wrong CA, expired, another host's name).
  Waiting cannot fix it: exit 78, and the supervisor halts rather than crash-looping.
- ROW_REJECTED: Postgres refused the data of one row (a data or integrity error, or a trigger
  of the operator's that raised). The batch is split so that every other row commits; the
  row's failures are counted until it is dead-lettered.
- POISON: the entry itself breaks the stream contract. Dead-letter it at once.
- CANCELLED: shutdown. Let it propagate.
- BUG: anything else. Panic: log, dump state, exit 70.
"""

from __future__ import annotations

import asyncio
import enum
import re
import socket
import ssl
from collections.abc import Awaitable, Iterator
from typing import TypeVar
from urllib.parse import urlsplit

import psycopg
import psycopg.errors
import redis.exceptions

from common.errors import ExitCode, InvalidEntry, ProcessorError, RowRejected
from common.logs import scrub

T = TypeVar("T")


class Outcome(enum.Enum):
    OUTAGE = "outage"
    REFUSED = "refused"
    ROW_REJECTED = "row-rejected"
    POISON = "poison"
    CANCELLED = "cancelled"
    BUG = "bug"


# Redis replies (the first word of the error) that mean "not now": a replica promoted
# mid-write, a server loading its data set, a script running too long, memory full.
REDIS_NOT_NOW = ("READONLY", "LOADING", "MASTERDOWN", "BUSY", "TRYAGAIN", "CLUSTERDOWN", "OOM")
# Replies that mean "never, as configured": our ACL user lacks a command or key, the
# password is wrong, the server is too old for a command, or a key holds another type.
# Matched with any leading "ERR " removed: redis-py strips it from most replies, not all.
# (A database number beyond the server's `databases` is only known once SELECT fails.)
REDIS_REFUSED = ("NOPERM", "NOAUTH", "WRONGPASS", "WRONGTYPE", "unknown command", "DB index is out of range")
# What Redis says when a command inside one of our Lua scripts is denied by the ACL: 7.0 in
# its own words (without naming the command), 7.2 and later as "ACL failure in script: …".
REDIS_SCRIPT_DENIED = ("The user executing the script can't", "ACL failure in script")
# redis-py sends MULTI, the commands and EXEC at once: with MULTI denied, the commands run
# one by one and EXEC fails thus. Our code sends no EXEC of its own.
REDIS_MULTI_DENIED = "EXEC without MULTI"
# redis-py puts this before the server's reply when a command of a pipeline failed.
_PIPELINE_ERROR = re.compile(r"^Command # \d+ \(.*?\) of pipeline caused error: ", re.S)

# Credentials or database refused; a failed connection often carries only the message.
POSTGRES_REFUSED_SQLSTATES = frozenset(
    {
        "28000",  # invalid authorization specification
        "28P01",  # invalid password
        "3D000",  # database does not exist
        "3F000",  # schema does not exist
        "42501",  # insufficient privilege
        "42P01",  # table does not exist: not migrated
        "42703",  # column does not exist: migrated by another release
        "42883",  # function does not exist
        "42704",  # object does not exist (a role, a type)
    }
)
POSTGRES_REFUSED_MESSAGES = (
    "password authentication failed",
    "no pg_hba.conf entry",
    "does not exist",  # also libpq's "root certificate file … does not exist" (sslrootcert)
    "server does not support SSL",  # sslmode=require or stricter against a server without TLS
    # libpq checks its parameters' values only when it connects (common/config.py checks the
    # ones with a fixed set of values before): `connect_timeout=abc`, a port beyond 65535.
    "invalid integer value",
    "invalid port number",
    # The server refuses the settings a URL sends at connection (`client_encoding=bogus`,
    # `options=-c x=y`): no SQLSTATE reaches the client then, only the words.
    "invalid value for parameter",
    "unrecognized configuration parameter",
    "is outside the valid range for parameter",
    'definition of service "',  # `service=name` missing from libpq's service file
)
# libpq says that it does not trust the server's certificate only in words (no SQLSTATE,
# no exception type): signed by a CA other than sslrootcert's, expired, or for another host.
POSTGRES_UNTRUSTED_MESSAGES = ("certificate verify failed", "does not match host name")
# One row's content exceeds what Postgres can hold or process (an over-long value, a
# document nested too deep): the row is at fault, not the server.
POSTGRES_ROW_SQLSTATES = frozenset({"54000", "54001"})
# ... except the same 54000 raised while the server assigns a transaction or MultiXact id: it
# refuses every write until a VACUUM prevents wraparound, whatever the row. Known by the function
# that raised it (sent in every language), or by the words.
POSTGRES_ID_ASSIGNERS = frozenset({"GetNewTransactionId", "GetNewMultiXactId"})
POSTGRES_WRAPAROUND_MESSAGE = "to avoid wraparound data loss"
# PL/pgSQL's own errors (RAISE EXCEPTION, ASSERT, ...): our statements call none of it, so they
# come from a trigger or function of the operator's refusing a row, as a CHECK constraint would.
POSTGRES_PLPGSQL_CLASS = "P0"

OUTAGE_TYPES: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError and MaxConnectionsError
    redis.exceptions.TimeoutError,
    psycopg.OperationalError,  # connection lost, admin shutdown, deadlock victim, lock timeout
    psycopg.InterfaceError,  # the connection was already closed
    psycopg.errors.ReadOnlySqlTransaction,  # a failover left us on a standby for a moment
    psycopg.errors.IdleInTransactionSessionTimeout,
    ConnectionError,  # builtin: resets and refusals below either client
    TimeoutError,  # includes asyncio.TimeoutError
    socket.gaierror,  # a host name that does not resolve now may resolve later
)


def classify(exc: BaseException) -> Outcome:
    """What to do about `exc`; see the module docstring."""
    if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
        return Outcome.CANCELLED
    if isinstance(exc, InvalidEntry):
        return Outcome.POISON
    if isinstance(exc, RowRejected):
        return Outcome.ROW_REJECTED
    if isinstance(exc, ProcessorError):
        return Outcome.REFUSED if exc.exit_code == ExitCode.CONFIG else Outcome.BUG
    if untrusted_certificate(exc) is not None:
        return Outcome.REFUSED
    if isinstance(exc, redis.exceptions.RedisError):
        return _classify_redis(exc)
    if isinstance(exc, psycopg.Error):
        return _classify_postgres(exc)
    if isinstance(exc, OUTAGE_TYPES):
        return Outcome.OUTAGE
    return Outcome.BUG


def _classify_redis(exc: redis.exceptions.RedisError) -> Outcome:
    if isinstance(
        exc,
        (
            redis.exceptions.AuthenticationError,
            redis.exceptions.AuthorizationError,
            redis.exceptions.NoPermissionError,
            redis.exceptions.AuthenticationWrongNumberOfArgsError,
        ),
    ):
        return Outcome.REFUSED
    if isinstance(exc, redis.exceptions.InvalidResponse):
        return Outcome.REFUSED  # what answers at REDIS_URL does not speak Redis' protocol: another service's port
    if isinstance(exc, redis.exceptions.ResponseError):
        message = redis_reply(str(exc))
        if message.startswith((*REDIS_REFUSED, *REDIS_SCRIPT_DENIED, REDIS_MULTI_DENIED)):
            return Outcome.REFUSED
        # redis-py takes the reply's first word off for these and says it with the class. A script
        # missing from the cache (SCRIPT FLUSH, a restart, a failover) between redis-py's check
        # and a pipeline's EVALSHA is not for long: the retried pipeline loads it again.
        if isinstance(exc, (redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError, redis.exceptions.NoScriptError)):
            return Outcome.OUTAGE
        if message.startswith((*REDIS_NOT_NOW, "NOSCRIPT")):
            return Outcome.OUTAGE
        return Outcome.BUG
    if isinstance(exc, OUTAGE_TYPES):
        return Outcome.OUTAGE
    return Outcome.BUG


def _classify_postgres(exc: psycopg.Error) -> Outcome:
    sqlstate = exc.sqlstate
    if sqlstate in POSTGRES_REFUSED_SQLSTATES:
        return Outcome.REFUSED
    if sqlstate is None and isinstance(exc, psycopg.OperationalError):
        if any(text in str(exc) for text in POSTGRES_REFUSED_MESSAGES):
            return Outcome.REFUSED
    if missing_partition(exc) or wraparound_stop(exc):
        return Outcome.OUTAGE
    if sqlstate in POSTGRES_ROW_SQLSTATES or isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
        return Outcome.ROW_REJECTED
    if sqlstate is not None and sqlstate.startswith(POSTGRES_PLPGSQL_CLASS):
        return Outcome.ROW_REJECTED
    if isinstance(exc, OUTAGE_TYPES):
        return Outcome.OUTAGE
    return Outcome.BUG


def wraparound_stop(exc: psycopg.Error) -> bool:
    """True when the server refuses new transaction ids (its wraparound stop limit): an outage
    of the whole database until an operator's VACUUM, not a fault of any row."""
    return exc.sqlstate == "54000" and (
        exc.diag.source_function in POSTGRES_ID_ASSIGNERS or POSTGRES_WRAPAROUND_MESSAGE in str(exc)
    )


def missing_partition(exc: BaseException) -> bool:
    """True for "no partition of relation "positions" found for row": no constraint of the row
    is broken; its partition is missing (dropped or detached by hand), and a maintenance pass
    creates it (supervisor/partitions.py), one asked for at once (shard/reporting.py)."""
    return (
        isinstance(exc, psycopg.Error) and exc.sqlstate == "23514"
        and exc.diag.constraint_name is None and exc.diag.table_name is not None
    )


def untrusted_certificate(exc: BaseException) -> str | None:
    """Why the client refused the server's TLS certificate, when that is what `exc` means; else None.

    redis-py wraps the ssl module's error in a ConnectionError raised while handling it, so
    the chain is searched; libpq reports it only in its message.
    """
    for link in chain(exc):
        if isinstance(link, ssl.SSLCertVerificationError):
            reason = getattr(link, "verify_message", None)  # set by the ssl module's handshake
            return f"certificate verify failed: {reason}" if reason else one_line(link)
    if isinstance(exc, psycopg.OperationalError) and any(text in str(exc) for text in POSTGRES_UNTRUSTED_MESSAGES):
        return one_line(exc)
    return None


def chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it was raised from or while handling, each once."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def server_of(exc: BaseException) -> str | None:
    """Which server an error came from, when its type tells: "redis", "postgres" or None."""
    if isinstance(exc, redis.exceptions.RedisError):
        return "redis"
    if isinstance(exc, psycopg.Error):
        return "postgres"
    return None


def one_line(exc: BaseException) -> str:
    """The error's own message on one line, passwords masked, for logs and command output.

    For Postgres errors, the server's primary message without the SQL excerpt.
    """
    diag = getattr(exc, "diag", None)
    text = (diag.message_primary if diag is not None else None) or str(exc)
    return scrub(" ".join(text.split()) or type(exc).__name__)


# What Redis replies when the stream or the group is gone (deleted, or Redis restarted
# without its data): NOGROUP from the commands that name the group (inside our scripts too),
# `no such key` from XINFO, and UNBLOCKED to a read that was blocked on a stream deleted meanwhile.
_GONE_REPLIES = ("NOGROUP", "no such key", "UNBLOCKED")


def stream_or_group_gone(exc: BaseException) -> bool:
    """Whether `exc` is Redis saying the stream or the consumer group does not exist (any more)."""
    return isinstance(exc, redis.exceptions.ResponseError) and redis_reply(str(exc)).startswith(_GONE_REPLIES)


async def unless_gone(call: Awaitable[T], gone: T) -> T:
    """The reply of `call`, or `gone` when Redis says the stream or the group does not exist:
    what a group that is gone holds (no consumers, nothing pending)."""
    try:
        return await call
    except redis.exceptions.ResponseError as exc:
        if stream_or_group_gone(exc):
            return gone
        raise


def redis_reply(message: str) -> str:
    """What Redis replied, without redis-py's pipeline annotation and the "ERR " it sometimes leaves."""
    reply = _PIPELINE_ERROR.sub("", message, count=1)
    # A transaction's failed command is annotated with its error's args as a tuple: ('…',)
    for quote in ("'", '"'):
        if reply.startswith(f"({quote}"):
            reply = reply[2:].removesuffix(f"{quote},)")
            break
    return reply.removeprefix("ERR ")


def acl_refusal(exc: BaseException, redis_url: str) -> str | None:
    """One line for a Redis ACL denial in `exc` or what caused it: which user may not do what.

    None when `exc` is no ACL denial. Redis names the command it denied (XACK), not the key
    or channel; inside a script Redis 7.0 names neither, but its ACL LOG does.
    """
    for link in chain(exc):
        if not isinstance(link, redis.exceptions.RedisError):
            continue
        message = redis_reply(one_line(link))
        denied = isinstance(link, redis.exceptions.NoPermissionError) or message.startswith("NOPERM")
        message = message.removeprefix("NOPERM ")
        script, multi = message.startswith(REDIS_SCRIPT_DENIED), message.startswith(REDIS_MULTI_DENIED)
        if not (denied or script or multi):
            continue
        command = re.search(r"run the '([^']+)' command", message)
        if command or multi:
            what = f"run {command.group(1).upper() if command else 'MULTI'}"
        elif "key" in message:
            what = "access one of the keys a command names"
        elif "channel" in message:
            what = "use one of the pub/sub channels a command names"
        else:
            what = "run a command"
        where = ""
        if script:
            where = " inside a Lua script" + ("" if command else " (ACL LOG names the command)")
        user = urlsplit(redis_url).username or "default"
        return f"Redis user {user} may not {what}{where}: {message} (OPERATIONS.md, Redis ACL user)"
    return None
