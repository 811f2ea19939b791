"""The SQL that stores derived state, and the device lock and row version that guard it.

Everything here runs inside the batch's transaction (or the rehydrate command's), after
the writer staged the batch in `staging_positions(seq, cached_version, device_id, ts,
lat, lon, alt, speed, heading, sats, attributes)`. Visits travel as one JSON parameter of
their upsert, and the changed devices' odometers and versions as one of the last_position
upsert: no second staging table, no second COPY.

Two rules keep cached copies honest (SPEC §5 "Rehydration"): every transaction that
changes a device holds its advisory lock (`DEVICE_LOCK_CLASS`, hashtext(device_id))
until commit, and bumps `last_position.state_version`. Both live here, for the batches
(`LOCK_DEVICES`, sent by the state load; `store_derived`) and for `processor rehydrate`
(`bump_state_version`).
"""

from __future__ import annotations

import struct
from datetime import datetime

import orjson
import psycopg
from psycopg.types.json import Json

from common.keys import DEVICE_LOCK_CLASS
from shard.devices.live import Derived

# Every transaction that touches a device holds its lock until commit, so derived state
# is computed from the truth. Locks are taken in one global order: no deadlocks. Without
# parameters (the lock class is a constant), so that the state load (cache.py) can follow
# it in the same round trip: as a statement of its own, the load takes its snapshot once the
# locks are granted (READ COMMITTED takes one per statement) and reads every earlier
# transaction of these devices.
LOCK_DEVICES = f"""
SELECT count(pg_advisory_xact_lock({int(DEVICE_LOCK_CLASS)}, h))
FROM (SELECT DISTINCT hashtext(device_id) AS h FROM staging_positions ORDER BY 1) AS devices
"""
# The same lock for one device. The rehydrate command takes it so that its bump cannot
# land between a shard's read of the version and its write of version + 1 (which would
# overwrite the bump with the same number).
_LOCK_DEVICE = "SELECT pg_advisory_xact_lock(%s, hashtext(%s))"
_BUMP_VERSION = """
UPDATE last_position SET state_version = state_version + 1 WHERE device_id = %s RETURNING state_version
"""

# A fix already stored (redelivered or resent) is skipped; of two with the same key in
# one batch the first entry wins. Key order keeps lock order stable between shards.
# Each fix records the geofence revision its batch derives with: a late fix's replay evaluates
# it with those geofences again (migrations/0006_geofence_history.sql).
_INSERT_POSITIONS = """
INSERT INTO positions (device_id, ts, lat, lon, alt, speed, heading, sats, attributes, geofence_revision)
SELECT device_id, ts, lat, lon, alt, speed, heading, sats, attributes, %s::bigint
FROM staging_positions ORDER BY device_id, ts, seq
ON CONFLICT (device_id, ts) DO NOTHING
RETURNING device_id, ts
"""
# When every fix is newer than its device's last one, none can be stored yet (positions and
# last_position change together, under the device lock): a plain insert, keeping the first
# of a key repeated within the batch, skips the cost of ON CONFLICT. If that belief is
# ever wrong (rows written by hand), the unique violation sends the batch down the safe path.
_INSERT_NEW_POSITIONS = """
INSERT INTO positions (device_id, ts, lat, lon, alt, speed, heading, sats, attributes, geofence_revision)
SELECT DISTINCT ON (device_id, ts) device_id, ts, lat, lon, alt, speed, heading, sats, attributes, %s::bigint
FROM staging_positions ORDER BY device_id, ts, seq
"""

# The batch's newest fix per device replaces the stored one only if newer; the derived
# columns are written for every device the batch changed.
_UPSERT_LAST = """
INSERT INTO last_position AS lp (device_id, ts, lat, lon, alt, speed, heading, sats, attributes,
                                 odometer_m, state_version, updated_at)
SELECT DISTINCT ON (s.device_id) s.device_id, s.ts, s.lat, s.lon, s.alt, s.speed, s.heading, s.sats,
       s.attributes, d.odometer_m, d.state_version, now()
FROM staging_positions s
JOIN json_to_recordset(%s::json) AS d(device_id text, odometer_m float8, state_version int8)
  ON d.device_id COLLATE "C" = s.device_id
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
# Usually the positions go in with the same statement: one round trip fewer.
_INSERT_POSITIONS_AND_UPSERT_LAST = f"WITH stored AS ({_INSERT_NEW_POSITIONS}) {_UPSERT_LAST}"

# A visit is keyed by (device, geofence, entered_at), so writing it again is harmless.
# A geofence deleted since the index was loaded has no visits written.
_UPSERT_VISITS = """
INSERT INTO timing_records AS tr (device_id, geofence_id, entered_at, exited_at, entry_crossing_at,
                                  exit_crossing_at, distance_m, max_speed, samples)
SELECT s.device_id, s.geofence_id, s.entered_at, s.exited_at, s.entry_crossing_at,
       s.exit_crossing_at, s.distance_m, s.max_speed, s.samples
FROM json_to_recordset(%s::json) AS s(
    device_id text COLLATE "C", geofence_id bigint, entered_at timestamptz, exited_at timestamptz,
    entry_crossing_at timestamptz, exit_crossing_at timestamptz, distance_m float8, max_speed float8, samples integer)
WHERE EXISTS (SELECT 1 FROM geofences g WHERE g.id = s.geofence_id)
ORDER BY s.device_id, s.geofence_id, s.entered_at
ON CONFLICT (device_id, geofence_id, entered_at) DO UPDATE SET
    exited_at = EXCLUDED.exited_at, entry_crossing_at = EXCLUDED.entry_crossing_at,
    exit_crossing_at = EXCLUDED.exit_crossing_at, distance_m = EXCLUDED.distance_m,
    max_speed = EXCLUDED.max_speed, samples = EXCLUDED.samples
"""


async def insert_positions_returning(cur: psycopg.AsyncCursor, revision: int) -> set[tuple[str, datetime]]:
    """Store the staged fixes not yet stored, derived with geofence `revision`; returns the keys that were new.

    Only this insert can tell a late fix (new) from a duplicate (stored), so it runs
    before derivation whenever some fix is not newer than its device's state.
    """
    await cur.execute(_INSERT_POSITIONS, (revision,))
    return {(device_id, ts) for device_id, ts in await cur.fetchall()}


async def store_derived(cur: psycopg.AsyncCursor, derived: Derived, positions_inserted: bool, revision: int) -> None:
    """Bump the version of every changed device and write visits, odometers and last_position.

    Unless `positions_inserted`, the staged positions go in with the last_position upsert,
    marked as derived with geofence `revision`.
    """
    for state in derived.touched.values():
        state.version += 1
    if derived.visits:
        # One JSON parameter, written by orjson: times as RFC 3339 with microseconds, and
        # max_speed as the float4 value it will be stored as (`_real`).
        rows = [
            {
                "device_id": device_id,
                "geofence_id": geofence_id,
                "entered_at": entered_at,
                "exited_at": visit.exited_at,
                "entry_crossing_at": visit.entry_crossing_at,
                "exit_crossing_at": visit.exit_crossing_at,
                "distance_m": visit.distance_m,
                "max_speed": _real(visit.max_speed),
                "samples": visit.samples,
            }
            for (device_id, geofence_id, entered_at), visit in derived.visits.items()
        ]
        await cur.execute(_UPSERT_VISITS, (Json(rows, dumps=orjson.dumps),))
    # The changed devices' derived columns travel as one JSON parameter, written by orjson in C:
    # no staging table to fill, and none of the per-element work psycopg's array dumpers do
    # (JSON numbers carry a float8 exactly: shortest round-trip digits both ways).
    derived_columns = Json(
        [{"device_id": s.device_id, "odometer_m": s.odometer_m, "state_version": s.version} for s in derived.touched.values()],
        dumps=orjson.dumps,
    )
    if positions_inserted:
        await cur.execute(_UPSERT_LAST, (derived_columns,))
    else:
        await cur.execute(_INSERT_POSITIONS_AND_UPSERT_LAST, (revision, derived_columns))


def _real(value: float | None) -> float | None:
    """The float4 a real column stores for `value`, rounded to nearest as a binary COPY packs it.

    Sent as that exact value, the float8 in JSON converts to real without a second rounding,
    and a speed too small for a float4 arrives as the 0 it becomes rather than failing the
    batch with Postgres' underflow error.
    """
    return None if value is None else _unpack_f4(_pack_f4(value))[0]


_pack_f4, _unpack_f4 = struct.Struct("f").pack, struct.Struct("f").unpack


def bump_state_version(conn: psycopg.Connection, device_id: str) -> int | None:
    """Make every cached copy of the device stale; returns the new version (None: unknown device).

    Runs inside the caller's transaction and holds the device's lock until it ends.
    """
    conn.execute(_LOCK_DEVICE, (DEVICE_LOCK_CLASS, device_id))
    row = conn.execute(_BUMP_VERSION, (device_id,)).fetchone()
    return int(row[0]) if row is not None else None
