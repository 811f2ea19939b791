"""Late data: a fix older than the device's newest processed fix rewrites history from there.

The replay starts at F0, the newest stored fix before the late one that lies inside no
visit (so no visit spans it and none of its aggregates are needed), and runs in `ts`
order through `advance`, the live path's own function. It stops at Q, the first stored
fix after the newest new fix that lies inside no geofence: from Q on, nothing can differ.
Visits entered between F0 and Q are replaced; the odometer is corrected by the difference
between the new and the old distances over the same stretch.
"""

from __future__ import annotations

from datetime import datetime

import psycopg

from shard.devices.track import DeviceState, TrackFix, Visit, adopt_replay, advance
from shard.geo import GeofenceIndex, haversine_m

REPLAY_CHUNK = 2_000

_PREVIOUS_FIX = """
SELECT ts, lat, lon, speed FROM positions WHERE device_id = %s AND ts < %s ORDER BY ts DESC LIMIT 1
"""
_EARLIEST_VISIT_AROUND = """
SELECT min(entered_at) FROM timing_records
WHERE device_id = %s AND geofence_id = ANY(%s) AND entered_at <= %s AND (exited_at IS NULL OR exited_at > %s)
"""
_FIXES_AFTER = """
SELECT ts, lat, lon, speed FROM positions WHERE device_id = %s AND ts > %s ORDER BY ts LIMIT %s
"""
_DELETE_VISITS = """
DELETE FROM timing_records
WHERE device_id = %s AND geofence_id = ANY(%s) AND entered_at > %s AND entered_at < %s
"""


async def replay_late(
    cur: psycopg.AsyncCursor, state: DeviceState, new_ts: set[datetime], index: GeofenceIndex
) -> list[Visit]:
    """Bring `state` (and timing_records) to what an in-order replay gives; returns visits to upsert.

    `new_ts` are the times of the device's fixes this batch stored (already in
    `positions`, inside the caller's transaction, under the device's lock).
    """
    active = list(index.by_id)
    start = await _quiet_fix_before(cur, state.device_id, min(new_ts), active)
    replay = DeviceState(state.device_id, last=start)
    newest_new = max(new_ts)
    old_prev, old_distance = start, 0.0
    visits: dict[tuple[int, datetime], Visit] = {}
    stop: TrackFix | None = None
    after = start.ts if start is not None else datetime.min.replace(tzinfo=newest_new.tzinfo)
    while stop is None:
        await cur.execute(_FIXES_AFTER, (state.device_id, after, REPLAY_CHUNK))
        chunk = [TrackFix(*row) for row in await cur.fetchall()]
        if not chunk:
            break
        inside = index.inside([f.lat for f in chunk], [f.lon for f in chunk])
        for fix, covering in zip(chunk, inside):
            if fix.ts not in new_ts:
                if old_prev is not None:
                    old_distance += haversine_m(old_prev.lat, old_prev.lon, fix.lat, fix.lon)
                old_prev = fix
            for visit in advance(replay, fix, covering, index):
                visits[(visit.geofence_id, visit.entered_at)] = visit
            if fix.ts > newest_new and not covering:
                stop = fix
                break
        after = chunk[-1].ts
    upper = stop.ts if stop is not None else datetime.max.replace(tzinfo=newest_new.tzinfo)
    lower = start.ts if start is not None else datetime.min.replace(tzinfo=newest_new.tzinfo)
    await cur.execute(_DELETE_VISITS, (state.device_id, active, lower, upper))
    adopt_replay(state, replay, old_distance, to_newest=stop is None, index=index)
    return list(visits.values())


async def _quiet_fix_before(cur: psycopg.AsyncCursor, device_id: str, before: datetime, active: list[int]) -> TrackFix | None:
    """The newest stored fix older than `before` that no visit of an active geofence covers."""
    while True:
        await cur.execute(_PREVIOUS_FIX, (device_id, before))
        row = await cur.fetchone()
        if row is None:
            return None
        fix = TrackFix(*row)
        await cur.execute(_EARLIEST_VISIT_AROUND, (device_id, active, fix.ts, fix.ts))
        (entered_at,) = await cur.fetchone()  # type: ignore[misc]
        if entered_at is None:
            return fix
        before = entered_at
