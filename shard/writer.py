"""The shard's side of Postgres: one transaction per batch, idempotent under redelivery.

A batch's transaction: stage the fixes (binary COPY), lock their devices, load the
devices' state (cache checked against the row version), insert the positions, derive
odometer and visits in `ts` order (replaying history where a fix arrived late), write
them, commit. Only then is anything ACKed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

import orjson
import psycopg
from psycopg.types.json import set_json_dumps, set_json_loads

from common.config import Settings
from common.keys import DEVICE_LOCK_CLASS
from shard.decode import Fix
from shard.derive import Derived, derive, older_than_state
from shard.geofences import GeofenceSource
from shard.recompute import recompute
from shard.state import DeviceCache
from shard.faults import POSTGRES_ROW_REJECTED, POSTGRES_TRANSIENT

log = logging.getLogger("processor.writer")

CONNECT_TIMEOUT_S = 10
# A server that vanished without closing the connection is noticed within ~30 s.
TCP_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}

_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS staging_positions (
    seq integer, cached_version bigint, device_id text COLLATE "C", ts timestamptz,
    lat double precision, lon double precision, alt real, speed real, heading real, sats smallint,
    attributes jsonb
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS staging_devices (
    device_id text COLLATE "C", odometer_m double precision, state_version bigint
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS staging_visits (
    device_id text COLLATE "C", geofence_id bigint, entered_at timestamptz, exited_at timestamptz,
    entry_crossing_at timestamptz, exit_crossing_at timestamptz, distance_m double precision,
    max_speed real, samples integer
) ON COMMIT DELETE ROWS
"""
# Every transaction starts with this: behind a transaction-pooling PgBouncer a batch may
# land on a server connection that has not seen our temporary tables or settings yet.
# A partitioned client's locks are released after a minute; a lock waited for a minute
# fails the batch as an outage (retried), rather than stalling the shard.
_PROLOGUE = _STAGING + """;
SET LOCAL TimeZone = 'UTC';
SET LOCAL lock_timeout = '60s';
SET LOCAL idle_in_transaction_session_timeout = '60s'
"""
_COPY_POSITIONS = "COPY staging_positions FROM STDIN (FORMAT BINARY)"
_POSITION_TYPES = ("int4", "int8", "text", "timestamptz", "float8", "float8", "float4", "float4", "float4", "int2", "jsonb")
_COPY_VISITS = "COPY staging_visits FROM STDIN (FORMAT BINARY)"
_COPY_DEVICES = "COPY staging_devices FROM STDIN (FORMAT BINARY)"
_DEVICE_TYPES = ("text", "float8", "int8")
_VISIT_TYPES = ("text", "int8", "timestamptz", "timestamptz", "timestamptz", "timestamptz", "float8", "float4", "int4")

# Every transaction that touches a device holds its lock until commit, so derived state
# is computed from the truth. Locks are taken in one global order: no deadlocks.
_LOCK_DEVICES = """
SELECT count(pg_advisory_xact_lock(%s, h))
FROM (SELECT DISTINCT hashtext(device_id) AS h FROM staging_positions ORDER BY 1) AS devices
"""

# A fix already stored (redelivered or resent) is skipped; of two with the same key in
# one batch the first entry wins. Key order keeps lock order stable between shards.
_INSERT_POSITIONS = """
INSERT INTO positions (device_id, ts, lat, lon, alt, speed, heading, sats, attributes)
SELECT device_id, ts, lat, lon, alt, speed, heading, sats, attributes
FROM staging_positions ORDER BY device_id, ts, seq
ON CONFLICT (device_id, ts) DO NOTHING
"""
_RETURNING_KEYS = " RETURNING device_id, ts"
# When every fix is newer than its device's last one, none can be stored yet (positions and
# last_position change together, under the device lock): a plain insert, keeping the first
# of a key repeated within the batch, skips the cost of ON CONFLICT. If that belief is
# ever wrong (rows written by hand), the unique violation sends the batch down the safe path.
_INSERT_NEW_POSITIONS = """
INSERT INTO positions (device_id, ts, lat, lon, alt, speed, heading, sats, attributes)
SELECT DISTINCT ON (device_id, ts) device_id, ts, lat, lon, alt, speed, heading, sats, attributes
FROM staging_positions ORDER BY device_id, ts, seq
"""

# The batch's newest fix per device replaces the stored one only if newer; the derived
# columns are written for every device the batch changed.
_UPSERT_LAST = """
INSERT INTO last_position AS lp (device_id, ts, lat, lon, alt, speed, heading, sats, attributes,
                                 odometer_m, state_version, updated_at)
SELECT DISTINCT ON (s.device_id) s.device_id, s.ts, s.lat, s.lon, s.alt, s.speed, s.heading, s.sats,
       s.attributes, d.odometer_m, d.state_version, now()
FROM staging_positions s JOIN staging_devices d ON d.device_id = s.device_id
ORDER BY s.device_id, s.ts DESC, s.seq
ON CONFLICT (device_id) DO UPDATE SET
    ts = CASE WHEN EXCLUDED.ts > lp.ts THEN EXCLUDED.ts ELSE lp.ts END,
    lat = CASE WHEN EXCLUDED.ts > lp.ts THEN EXCLUDED.lat ELSE lp.lat END,
    lon = CASE WHEN EXCLUDED.ts > lp.ts THEN EXCLUDED.lon ELSE lp.lon END,
    alt = CASE WHEN EXCLUDED.ts > lp.ts THEN EXCLUDED.alt ELSE lp.alt END,
    speed = CASE WHEN EXCLUDED.ts > lp.ts THEN EXCLUDED.speed ELSE lp.speed END,
    heading = CASE WHEN EXCLUDED.ts > lp.ts THEN EXCLUDED.heading ELSE lp.heading END,
    sats = CASE WHEN EXCLUDED.ts > lp.ts THEN EXCLUDED.sats ELSE lp.sats END,
    attributes = CASE WHEN EXCLUDED.ts > lp.ts THEN EXCLUDED.attributes ELSE lp.attributes END,
    odometer_m = EXCLUDED.odometer_m,
    state_version = EXCLUDED.state_version,
    updated_at = EXCLUDED.updated_at
"""

_INSERT_POSITIONS_AND_UPSERT_LAST = f"WITH stored AS ({_INSERT_NEW_POSITIONS}) {_UPSERT_LAST}"

# A visit is keyed by (device, geofence, entered_at), so writing it again is harmless.
# A geofence deleted since the index was loaded has no visits written.
_UPSERT_VISITS = """
INSERT INTO timing_records AS tr (device_id, geofence_id, entered_at, exited_at, entry_crossing_at,
                                  exit_crossing_at, distance_m, max_speed, samples)
SELECT s.device_id, s.geofence_id, s.entered_at, s.exited_at, s.entry_crossing_at,
       s.exit_crossing_at, s.distance_m, s.max_speed, s.samples
FROM staging_visits s WHERE EXISTS (SELECT 1 FROM geofences g WHERE g.id = s.geofence_id)
ORDER BY s.device_id, s.geofence_id, s.entered_at
ON CONFLICT (device_id, geofence_id, entered_at) DO UPDATE SET
    exited_at = EXCLUDED.exited_at, entry_crossing_at = EXCLUDED.entry_crossing_at,
    exit_crossing_at = EXCLUDED.exit_crossing_at, distance_m = EXCLUDED.distance_m,
    max_speed = EXCLUDED.max_speed, samples = EXCLUDED.samples
"""


class PositionWriter:
    """Writes batches of fixes; the connection is opened lazily and again after it breaks."""

    def __init__(self, settings: Settings, application_name: str, geofences: GeofenceSource) -> None:
        self.url = settings.database_url
        self.application_name = application_name
        self.conn: psycopg.AsyncConnection | None = None
        self.cache = DeviceCache(settings.device_cache_size)
        self.geofences = geofences

    async def connect(self) -> None:
        if self.conn is not None and not self.conn.closed:
            return
        conn = await psycopg.AsyncConnection.connect(
            self.url,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name=self.application_name,
            **TCP_KEEPALIVES,
        )
        set_json_dumps(orjson.dumps, context=conn)
        set_json_loads(orjson.loads, context=conn)
        self.conn = conn

    async def write_isolating(self, fixes: Sequence[Fix]) -> dict[int, str]:
        """Store a batch; rows Postgres rejects are isolated so that every other row commits.

        Returns {position in `fixes`: error} for the rows that were rejected on their own.
        """
        try:
            await self.write(fixes)
            return {}
        except POSTGRES_ROW_REJECTED as exc:
            if len(fixes) == 1:
                return {0: f"{type(exc).__name__}: {exc}".strip()}
        middle = len(fixes) // 2
        left = await self.write_isolating(fixes[:middle])
        right = await self.write_isolating(fixes[middle:])
        return left | {middle + position: error for position, error in right.items()}

    async def write(self, fixes: Sequence[Fix]) -> None:
        """Store a batch and its derived state in one transaction."""
        try:
            try:
                await self._write(fixes, safe=False)
            except psycopg.errors.UniqueViolation:
                log.warning("positions held rows newer than their devices' state; batch written the safe way")
                await self._write(fixes, safe=True)
        except POSTGRES_TRANSIENT:
            await self.close()  # the next attempt starts from a fresh connection
            raise

    async def _write(self, fixes: Sequence[Fix], safe: bool) -> None:
        await self.connect()
        conn = self.conn
        assert conn is not None
        index = self.geofences.index
        # Stable sort: fixes with the same key keep entry order, as `seq` does in SQL.
        ordered = sorted(fixes, key=lambda fix: (fix.device_id, fix.ts))
        devices = sorted({fix.device_id for fix in fixes})
        self.cache.begin_batch()
        cached = self.cache.pick(devices)
        try:
            async with conn.transaction():
                async with conn.cursor() as cur:
                    await cur.execute(_PROLOGUE)
                    versions = {d: (state.version if state is not None else None) for d, state in cached.items()}
                    async with cur.copy(_COPY_POSITIONS) as copy:
                        copy.set_types(_POSITION_TYPES)
                        for seq, fix in enumerate(fixes):
                            await copy.write_row((seq, versions[fix.device_id], *fix))
                    await cur.execute(_LOCK_DEVICES, (DEVICE_LOCK_CLASS,))
                    states = await self.cache.load(cur, cached)
                    inserted: set[tuple[str, datetime]] | None = None
                    if safe or older_than_state(ordered, states):
                        # Only the insert can tell a late fix (new) from a duplicate (stored).
                        await cur.execute(_INSERT_POSITIONS + _RETURNING_KEYS)
                        inserted = {(device_id, ts) for device_id, ts in await cur.fetchall()}
                    derived = derive(ordered, states, index, inserted)
                    for device_id, new_ts in derived.late.items():
                        derived.add_visits(device_id, await recompute(cur, states[device_id], new_ts, index))
                    for state in derived.touched.values():
                        state.version += 1
                    await self._write_derived(cur, derived, positions_inserted=inserted is not None)
        except BaseException:
            self.cache.drop(devices)  # states were changed in place for a transaction that did not commit
            raise
        for state in states.values():
            self.cache.put(state)

    async def _write_derived(self, cur: psycopg.AsyncCursor, derived: Derived, positions_inserted: bool) -> None:
        if derived.visits:
            async with cur.copy(_COPY_VISITS) as copy:
                copy.set_types(_VISIT_TYPES)
                for (device_id, geofence_id, entered_at), visit in derived.visits.items():
                    await copy.write_row(
                        (
                            device_id,
                            geofence_id,
                            entered_at,
                            visit.exited_at,
                            visit.entry_crossing_at,
                            visit.exit_crossing_at,
                            visit.distance_m,
                            visit.max_speed,
                            visit.samples,
                        )
                    )
            await cur.execute(_UPSERT_VISITS)
        async with cur.copy(_COPY_DEVICES) as copy:
            copy.set_types(_DEVICE_TYPES)
            for state in derived.touched.values():
                await copy.write_row((state.device_id, state.odometer_m, state.version))
        # Usually the positions go in with the same statement: one round trip fewer.
        await cur.execute(_UPSERT_LAST if positions_inserted else _INSERT_POSITIONS_AND_UPSERT_LAST)

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()
