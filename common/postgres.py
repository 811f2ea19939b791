"""Options every Postgres connection of the Processor is opened with, and when a shard's
batch connections may prepare statements after all.

DATABASE_URL may lead through a transaction-pooling PgBouncer (SPEC §4), where each
transaction can run on another server connection. psycopg prepares a statement on the
server once it has run five times on a connection; through such a pooler (PgBouncer before
1.21, or without `max_prepared_statements`) the next transaction then asks a server
connection for a statement it never saw (`prepared statement "_pg3_0" does not exist`: a
shard panicked on it), or finds another client's statement under the same name. So no
connection prepares unless it is known to reach Postgres itself.
"""

from __future__ import annotations

from typing import Any

import psycopg

POOLER_SAFE: dict[str, Any] = {"prepare_threshold": None}
ANSWER_TIMEOUT_S = 30.0  # for a short-lived connection's every answer; see AnswerBounded
PREPARE_THRESHOLD = 5  # psycopg's default: a statement is prepared on its sixth run


async def prepare_if_direct(conn: psycopg.AsyncConnection) -> bool:
    """Let `conn` prepare statements if it reaches Postgres without a pooler; returns whether it does.

    Postgres tells a client its backend's process id when it connects; a pooler, which hands
    the client's transactions to server connections of its choosing, tells one of its own
    (PgBouncer: a random number). So the two ids agree only on a direct connection. Preparing
    saves Postgres planning the batch's statements again: about 5 % of its CPU at 40 fixes a batch.
    """
    cur = await conn.execute("SELECT pg_backend_pid()")
    row = await cur.fetchone()
    direct = row is not None and row[0] == conn.info.backend_pid
    if direct:
        conn.prepare_threshold = PREPARE_THRESHOLD
    return direct


class AnswerBounded(psycopg.Connection):  # type: ignore[type-arg]
    """A connection whose every wait for an answer ends after `answer_timeout_s` (default
    ANSWER_TIMEOUT_S), as an outage (an OperationalError), and closes it: libpq waits for ever on a
    server that stopped answering without closing the connection (frozen, or cut off without a
    reset). For the short statements of operator commands and of partition maintenance, not for
    migrations, whose statements may rightly run for long."""

    answer_timeout_s = ANSWER_TIMEOUT_S

    def wait(self, gen, interval=0.1, timeout=None):  # type: ignore[no-untyped-def]
        try:
            return super().wait(gen, interval, self.answer_timeout_s if timeout is None else timeout)
        except _WAIT_TIMEOUT as exc:
            self.close()  # so that the block's end does not wait again, for a rollback
            raise psycopg.OperationalError(
                f"no answer within {self.answer_timeout_s:.0f}s (the server stopped answering, or a lock is held that long)"
            ) from exc


# psycopg's own (private) timeout of a wait, taken at import so that a psycopg without it fails loudly.
_WAIT_TIMEOUT = psycopg.errors._WaitTimeout
