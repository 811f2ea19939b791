"""The shard's side of Postgres: one transaction per batch, idempotent under redelivery.

A batch's transaction: the prologue (BEGIN, the temporary staging table, settings), a
binary COPY of the fixes into `staging_positions`, then `shard.devices` stores the
positions and the derived state they cause (with the geofence index of the revision it
reads after the device locks: shard/geofences.py); commit. Only then is anything ACKed.
Rows Postgres rejects are isolated by bisection, so that every other row commits.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import orjson
import psycopg
from psycopg.pq import TransactionStatus
from psycopg.types.json import set_json_dumps, set_json_loads

from common.config import Settings
from common.faults import Outcome, classify, one_line
from common.postgres import POOLER_SAFE, prepare_if_direct
from shard.decode import Fix
from shard.devices import CachedStateDirty, DeviceStates, LockTurn
from shard.geofences import GeofenceSource
from shard.staging_rows import COLUMNS, copy_data

log = logging.getLogger("processor.writer")

CONNECT_TIMEOUT_S = 10
# A server that vanished without closing the connection is noticed within ~30 s.
TCP_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}

# `cached_version` is the version of the shard's cached state of the fix's device: the
# state load compares it with the stored one (shard/devices/cache.py).
_STAGING_POSITIONS = """
CREATE TEMP TABLE IF NOT EXISTS staging_positions (
    seq integer, cached_version bigint, device_id text COLLATE "C", ts timestamptz,
    lat double precision, lon double precision, alt real, speed real, heading real, sats smallint,
    attributes jsonb
) ON COMMIT DELETE ROWS
"""
# Every transaction starts with this: behind a transaction-pooling PgBouncer a batch may
# land on a server connection that has not seen our temporary table or settings yet.
# The device locks of a client that went quiet inside a batch (partitioned, frozen by
# SIGSTOP or a debugger, starved) are released after 10 s, so every other shard waits at
# most that long for them; between the statements of a batch a shard needs milliseconds.
# A lock waited for a minute fails the batch as an outage (retried), rather than stalling
# the shard.
# The staging table is never analysed, so the planner's guesses can cross jit_above_cost
# and spend 10-20 ms compiling a statement that runs in a fraction of that: no JIT.
# The BEGIN goes out with it: one round trip fewer (`batch_transaction` sends it, and ends the transaction).
_PROLOGUE = f"""BEGIN;{_STAGING_POSITIONS};
SET LOCAL TimeZone = 'UTC';
SET LOCAL lock_timeout = '60s';
SET LOCAL idle_in_transaction_session_timeout = '10s';
SET LOCAL jit = off
"""
_COPY_POSITIONS = f"COPY staging_positions ({', '.join(COLUMNS)}) FROM STDIN (FORMAT BINARY)"


@contextlib.asynccontextmanager
async def batch_transaction(conn: psycopg.AsyncConnection) -> AsyncIterator[psycopg.AsyncCursor]:
    """A cursor inside one batch's transaction, begun by the prologue; a clean exit commits it.

    Otherwise it is rolled back; a connection that cannot even do that (broken, or a
    statement cut off by a cancellation) is closed, so that no later batch could run inside
    a transaction left open here.
    """
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise psycopg.InterfaceError(f"connection not idle before a batch: {conn.info.transaction_status.name}")
    try:
        async with conn.cursor() as cur:
            await cur.execute(_PROLOGUE)
            yield cur
        await conn.commit()
    except BaseException:
        try:
            await conn.rollback()
        except Exception:
            await conn.close()
        raise


async def stage(cur: psycopg.AsyncCursor, data: bytes) -> None:
    """Stage a batch: `data` is its fixes with their devices' cached versions, as `copy_data` packs them."""
    async with cur.copy(_COPY_POSITIONS) as copy:
        await copy.write(data)


class PositionWriter:
    """Writes batches of fixes, each on a connection of its own while two are in flight.

    Connections are opened lazily, kept while they work, and replaced after they break.
    """

    def __init__(self, settings: Settings, application_name: str, geofences: GeofenceSource) -> None:
        self.url = settings.database_url
        self.application_name = application_name
        self.devices = DeviceStates(settings.device_cache_size)
        self.cache = self.devices.cache
        self.geofences = geofences
        self._idle: list[psycopg.AsyncConnection] = []
        self._open: set[psycopg.AsyncConnection] = set()

    async def _take(self) -> psycopg.AsyncConnection:
        if self._idle:
            return self._idle.pop()  # one broken since fails its batch as an outage, and is closed
        conn = await psycopg.AsyncConnection.connect(
            self.url,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name=self.application_name,
            client_encoding="UTF8",  # the staging rows' text is UTF-8 (shard/staging_rows.py)
            **TCP_KEEPALIVES,
            **POOLER_SAFE,
        )
        set_json_dumps(orjson.dumps, context=conn)
        set_json_loads(orjson.loads, context=conn)
        try:
            await prepare_if_direct(conn)
        except BaseException:
            await conn.close()
            raise
        self._open.add(conn)
        return conn

    async def write_isolating(self, fixes: Sequence[Fix], turn: LockTurn | None = None) -> dict[int, str]:
        """Store a batch; rows Postgres rejects are isolated so that every other row commits.

        Returns {position in `fixes`: error} for the rows that were rejected on their own.
        `turn` orders the batch's device locks after those of the batch before it.
        """
        try:
            await self.write(fixes, turn)
            return {}
        except Exception as exc:
            if classify(exc) is not Outcome.ROW_REJECTED:
                raise
            if len(fixes) == 1:
                return {0: f"{type(exc).__name__}: {one_line(exc)}"}  # a letter's `error` is one line
        middle = len(fixes) // 2
        left = await self.write_isolating(fixes[:middle])
        right = await self.write_isolating(fixes[middle:])
        return left | {middle + position: error for position, error in right.items()}

    async def write(self, fixes: Sequence[Fix], turn: LockTurn | None = None) -> None:
        """Store a batch and its derived state in one transaction."""
        conn = await self._take()
        try:
            safe = False
            while True:
                try:
                    await self._write(conn, fixes, safe, turn)
                    return
                except psycopg.errors.UniqueViolation:
                    if safe:
                        raise
                    log.warning("positions held rows newer than their devices' state; batch written the safe way")
                    safe = True
                except CachedStateDirty as exc:
                    log.debug("cached state changed under the batch; writing it again", extra={"device_id": str(exc)})
        except Exception as exc:
            if classify(exc) is Outcome.OUTAGE:
                # The next attempt starts from a fresh connection; so does every later batch: an
                # idle connection was most likely cut by the same outage, and taking it after the
                # server is back would fail a batch (and log a second outage) for nothing.
                await conn.close()
                idle, self._idle = self._idle, []
                for other in idle:
                    self._open.discard(other)
                    await other.close()
            raise
        finally:
            if conn.closed:
                self._open.discard(conn)
            else:
                self._idle.append(conn)

    async def _write(self, conn: psycopg.AsyncConnection, fixes: Sequence[Fix], safe: bool, turn: LockTurn | None) -> None:
        with self.devices.batch(fixes) as batch:  # the cache keeps the states only after commit
            data = copy_data(fixes, batch.cached_versions())  # a RowRejected here costs no round trip
            if turn is not None:
                await turn.come()
            async with batch_transaction(conn) as cur:
                await stage(cur, data)
                # The geofence index is chosen inside, after the device locks.
                await batch.apply(cur, self.geofences, safe=safe, turn=turn)

    async def close(self) -> None:
        opened, self._open, self._idle = self._open, set(), []
        for conn in opened:
            await conn.close()
