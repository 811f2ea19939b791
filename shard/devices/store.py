"""The SQL that stores a batch: positions, derived state, and the device lock and row version that guard it.

Everything here runs inside the batch's transaction (or the rehydrate command's), after
the device locks and the state load (cache.py). The positions go in by a binary COPY
straight into `positions` when every fix is newer than its device's state, and otherwise
by an insert that tells new rows from stored ones; visits travel as one JSON parameter of
their upsert, and the changed devices' newest fixes, odometers and versions as one of the
last_position upsert. No staging table: nothing to fill, truncate or create per connection.

Two rules keep cached copies honest (SPEC §5 "Rehydration"): every transaction that
changes a device holds its advisory lock (`DEVICE_LOCK_CLASS`, hashtext(device_id))
until commit, and bumps `last_position.state_version`. Both live here, for the batches
(`lock_devices`, sent with the state load; `store_derived`) and for `processor rehydrate`
(`bump_state_version`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from datetime import datetime

import orjson
import psycopg
from psycopg.types.json import Json

from common.keys import DEVICE_LOCK_CLASS
from shard.copy_rows import COLUMNS
from shard.decode import Fix
from shard.devices.live import Derived

# Every transaction that touches a device holds its lock until commit, so derived state
# is computed from the truth. Locks are taken in one global order: no deadlocks. The
# batch's devices come as a JSON literal (`devices`, rows with a device_id), so that the
# state load (cache.py) can follow in the same round trip, as a statement of its own: it
# then takes its snapshot once the locks are granted (READ COMMITTED takes one per
# statement) and reads every earlier transaction of these devices.
_LOCK_DEVICES = f"""
SELECT count(pg_advisory_xact_lock({int(DEVICE_LOCK_CLASS)}, h))
FROM (SELECT DISTINCT hashtext(device_id) AS h FROM json_to_recordset({{devices}}) AS c(device_id text) ORDER BY 1) AS d
"""


def lock_devices(devices: str) -> str:
    """The lock statement for the devices in `devices`, a quoted JSON literal."""
    return _LOCK_DEVICES.format(devices=devices)


# The same lock for one device. The rehydrate command takes it so that its bump cannot
# land between a shard's read of the version and its write of version + 1 (which would
# overwrite the bump with the same number).
_LOCK_DEVICE = "SELECT pg_advisory_xact_lock(%s, hashtext(%s))"
_BUMP_VERSION = """
UPDATE last_position SET state_version = state_version + 1 WHERE device_id = %s RETURNING state_version
"""

# When every fix is newer than its device's last one, none can be stored yet (positions and
# last_position change together, under the device lock): the rows are copied straight in.
# If that belief is ever wrong (rows written by hand), the unique violation sends the batch
# down the safe path, `_INSERT_POSITIONS`.
COPY_POSITIONS = f"COPY positions ({', '.join(COLUMNS)}) FROM STDIN (FORMAT BINARY)"

# Otherwise a fix already stored (redelivered or resent) is skipped, and RETURNING tells the
# new ones. The rows come as one JSON parameter (`_rows`: float4 columns sent as the float4
# they become, as the COPY packs them). Key order keeps lock order stable between writers.
_INSERT_POSITIONS = """
INSERT INTO positions (device_id, ts, lat, lon, alt, speed, heading, sats, attributes)
SELECT device_id, ts, lat, lon, alt, speed, heading, sats, attributes
FROM json_to_recordset(%s::json) AS s(device_id text, ts timestamptz, lat float8, lon float8, alt real,
                                      speed real, heading real, sats smallint, attributes jsonb)
ORDER BY device_id COLLATE "C", ts
ON CONFLICT (device_id, ts) DO NOTHING
RETURNING device_id, ts
"""

# Each changed device's newest fix of the batch replaces the stored one only if newer; its
# derived columns are written whatever the fix.
_UPSERT_LAST = """
INSERT INTO last_position AS lp (device_id, ts, lat, lon, alt, speed, heading, sats, attributes,
                                 odometer_m, state_version, updated_at)
SELECT device_id, ts, lat, lon, alt, speed, heading, sats, attributes, odometer_m, state_version, now()
FROM json_to_recordset(%s::json) AS s(device_id text, ts timestamptz, lat float8, lon float8, alt real,
                                      speed real, heading real, sats smallint, attributes jsonb,
                                      odometer_m float8, state_version int8)
ORDER BY device_id COLLATE "C"
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


async def copy_positions(cur: psycopg.AsyncCursor, data: bytes) -> None:
    """Store fixes none of which can be stored yet: `data` is their COPY stream (copy_rows.copy_data)."""
    async with cur.copy(COPY_POSITIONS) as copy:
        await copy.write(data)


async def insert_positions_returning(cur: psycopg.AsyncCursor, fixes: Iterable[Fix]) -> set[tuple[str, datetime]]:
    """Store the fixes not yet stored (each key once among `fixes`); returns the keys that were new.

    Only this insert can tell a late fix (new) from a duplicate (stored), so it runs
    before derivation whenever some fix is not newer than its device's state.
    """
    await cur.execute(_INSERT_POSITIONS, (Json([_row(fix) for fix in fixes], dumps=orjson.dumps),))
    return {(device_id, ts) for device_id, ts in await cur.fetchall()}


async def store_derived(cur: psycopg.AsyncCursor, derived: Derived, newest: dict[str, Fix]) -> None:
    """Bump the version of every changed device and write visits, odometers and last_position.

    `newest` holds each device's newest fix of the batch (the first of them where several
    share its time): what last_position takes where it is newer than the stored one.
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
    # The changed devices' rows travel as one JSON parameter, written by orjson in C: no
    # staging table to fill, and none of the per-element work psycopg's array dumpers do
    # (JSON numbers carry a float8 exactly: shortest round-trip digits both ways).
    rows = []
    for state in derived.touched.values():
        row = _row(newest[state.device_id])
        row["odometer_m"] = state.odometer_m
        row["state_version"] = state.version
        rows.append(row)
    await cur.execute(_UPSERT_LAST, (Json(rows, dumps=orjson.dumps),))


def _row(fix: Fix) -> dict[str, object]:
    """A fix as a JSON object of its columns, each arriving as the binary COPY would store it."""
    device_id, ts, lat, lon, alt, speed, heading, sats, attributes = fix
    return {
        "device_id": device_id, "ts": ts, "lat": lat, "lon": lon, "alt": _real(alt), "speed": _real(speed),
        "heading": _real(heading), "sats": sats, "attributes": attributes,
    }


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
