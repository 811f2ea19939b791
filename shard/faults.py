"""Error classification, in one visible place: transient, permanent, or a bug.

Transient errors (a server unreachable, restarting, a timeout, a deadlock victim) pause
the shard with backoff and dead-letter nothing. Permanent errors belong to one entry
(it cannot be decoded, is invalid, or Postgres rejects its row) and dead-letter that
entry only. Anything else is a bug: it reaches the panic handler.
"""

from __future__ import annotations

import psycopg
import redis.exceptions

REDIS_TRANSIENT: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError while Redis loads its data set
    redis.exceptions.TimeoutError,
    ConnectionError,
    TimeoutError,
)

POSTGRES_TRANSIENT: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,  # connection lost, admin shutdown, deadlock victim, lock timeout
    psycopg.InterfaceError,  # the connection was already closed
    psycopg.errors.ReadOnlySqlTransaction,  # a failover left us on a standby for a moment
)

# Errors that one row causes: the batch is split so that the other rows commit.
POSTGRES_ROW_REJECTED: tuple[type[BaseException], ...] = (
    psycopg.DataError,
    psycopg.IntegrityError,
)


def is_transient(server: str, exc: BaseException) -> bool:
    """An outage of `server` ("redis" or "postgres"): wait and retry, dead-letter nothing."""
    if server == "redis":
        return isinstance(exc, REDIS_TRANSIENT) or redis_readonly_or_loading(exc)
    return isinstance(exc, POSTGRES_TRANSIENT)


def redis_readonly_or_loading(exc: BaseException) -> bool:
    """A replica promoted mid-write or a server still loading its data set: retry later."""
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(("READONLY", "LOADING", "MASTERDOWN"))


# Postgres says the credentials or the database are wrong; Redis refuses our password.
# These look like outages (connection errors) but waiting cannot fix them.
FATAL_SQLSTATES = frozenset({"28000", "28P01", "3D000"})
FATAL_MESSAGES = ("password authentication failed", "no pg_hba.conf entry", "does not exist")


def is_configuration_error(exc: BaseException) -> bool:
    """A connection refused for good: wrong credentials, database or permissions."""
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return True
    if not isinstance(exc, psycopg.OperationalError):
        return False
    # A failed connection often carries no SQLSTATE, only the server's message.
    return exc.sqlstate in FATAL_SQLSTATES or (exc.sqlstate is None and any(t in str(exc) for t in FATAL_MESSAGES))
