"""The shard's side of Postgres: one transaction per batch, idempotent under redelivery."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import psycopg
from psycopg.types.json import set_json_dumps

from common.config import Settings
from shard.decode import Fix
from shard.faults import POSTGRES_ROW_REJECTED, POSTGRES_TRANSIENT

CONNECT_TIMEOUT_S = 10

_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS staging_positions (
    device_id text, ts timestamptz, lat double precision, lon double precision,
    alt real, speed real, heading real, sats smallint, attributes jsonb
) ON COMMIT DELETE ROWS
"""
_COPY = "COPY staging_positions FROM STDIN (FORMAT BINARY)"
_COPY_TYPES = ("text", "timestamptz", "float8", "float8", "float4", "float4", "float4", "int2", "jsonb")

# Rows go in key order, so two shards writing the same keys lock them in the same order
# and cannot deadlock. A fix already stored (redelivered or resent) is skipped.
_INSERT_POSITIONS = """
INSERT INTO positions (device_id, ts, lat, lon, alt, speed, heading, sats, attributes)
SELECT device_id, ts, lat, lon, alt, speed, heading, sats, attributes
FROM staging_positions ORDER BY device_id, ts
ON CONFLICT (device_id, ts) DO NOTHING
"""
# The newest fix of the batch per device, written only over an older one.
_UPSERT_LAST = """
INSERT INTO last_position AS lp (device_id, ts, lat, lon, alt, speed, heading, sats, attributes, updated_at)
SELECT DISTINCT ON (device_id) device_id, ts, lat, lon, alt, speed, heading, sats, attributes, now()
FROM staging_positions ORDER BY device_id, ts DESC
ON CONFLICT (device_id) DO UPDATE SET
    ts = EXCLUDED.ts, lat = EXCLUDED.lat, lon = EXCLUDED.lon, alt = EXCLUDED.alt,
    speed = EXCLUDED.speed, heading = EXCLUDED.heading, sats = EXCLUDED.sats,
    attributes = EXCLUDED.attributes, updated_at = EXCLUDED.updated_at
WHERE lp.ts < EXCLUDED.ts
"""


class PositionWriter:
    """Writes batches of fixes; the connection is opened lazily and again after it breaks."""

    def __init__(self, settings: Settings, application_name: str) -> None:
        self.url = settings.database_url
        self.application_name = application_name
        self.conn: psycopg.AsyncConnection | None = None

    async def connect(self) -> None:
        if self.conn is not None and not self.conn.closed:
            return
        conn = await psycopg.AsyncConnection.connect(
            self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, application_name=self.application_name
        )
        set_json_dumps(orjson.dumps, context=conn)
        await conn.execute(_STAGING)
        self.conn = conn

    async def write_isolating(self, fixes: Sequence[Fix], attempts: int) -> dict[int, str]:
        """Store a batch; rows Postgres rejects are isolated so that every other row commits.

        Returns {position in `fixes`: error} for rows rejected `attempts` times in a row.
        A rejection is deterministic, so the retries happen at once, not on redelivery.
        """
        try:
            await self.write(fixes)
            return {}
        except POSTGRES_ROW_REJECTED as exc:
            if len(fixes) == 1:
                return await self._retry_one(fixes[0], attempts - 1, exc)
        middle = len(fixes) // 2
        left = await self.write_isolating(fixes[:middle], attempts)
        right = await self.write_isolating(fixes[middle:], attempts)
        return left | {middle + position: error for position, error in right.items()}

    async def _retry_one(self, fix: Fix, attempts: int, error: Exception) -> dict[int, str]:
        for _ in range(attempts):
            try:
                await self.write([fix])
                return {}
            except POSTGRES_ROW_REJECTED as exc:
                error = exc
        return {0: f"{type(error).__name__}: {error}".strip()}

    async def write(self, fixes: Sequence[Fix]) -> int:
        """Store a batch in one transaction; returns how many positions were new."""
        try:
            return await self._write(fixes)
        except POSTGRES_TRANSIENT:
            await self.close()  # the next attempt starts from a fresh connection
            raise

    async def _write(self, fixes: Sequence[Fix]) -> int:
        await self.connect()
        conn = self.conn
        assert conn is not None
        async with conn.transaction():
            async with conn.cursor() as cur:
                async with cur.copy(_COPY) as copy:
                    copy.set_types(_COPY_TYPES)
                    for fix in fixes:
                        await copy.write_row(fix)
                await cur.execute(_INSERT_POSITIONS)
                inserted = cur.rowcount
                await cur.execute(_UPSERT_LAST)
        return inserted

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()
