"""Late data: a fix older than the device's newest processed fix rewrites history from there.

The replay starts at F0, the newest stored fix before the late one that lies inside no
visit (so no visit spans it and none of its aggregates are needed), and runs in `ts`
order through `advance`, the live path's own function. It stops at Q, the first stored
fix after the newest new fix that lies inside no geofence: from Q on, nothing can differ.
Visits entered between F0 and Q are replaced; the odometer is corrected by the difference
between the new and the old distances over the same stretch.

Every stored fix is evaluated with the geofences of the revision it was first derived with
(`GeofenceSource.at`), the late ones with their batch's: a geofence change made since never
reaches the history before it, so a replay reproduces every visit it does not touch, and
where entries are split across shards does not matter (SPEC §5). Visits are replaced only
for the geofences of the indexes the stretch was evaluated with.

Retention (POSITIONS_RETENTION_DAYS) drops whole partitions of old fixes, never derived
state. Once partitions were dropped (the *floor*: below it, history is gone), nothing below
the floor is replayed: a stored fix there is no F0 (its neighbours may be gone), and a late
fix there is stored without touching derived state (a warning says so; the device's other
fixes of the batch are replayed without it, or, if none is late, advance it as on the live
path), as is one whose device sat in a visit entered below the floor and still open where
the replay would start (its start was dropped). Otherwise, when no F0
lies at or above the floor, the replay starts at F1, the device's first stored fix from the
floor on, with the state right after it rebuilt from what is stored (F1 is inside only the
geofences of visits entered at F1: a visit entered earlier would reach across the floor),
so that the entry crossings interpolated from a dropped fix before F1 are kept. Only a late
fix older than F1 itself is replayed with no fix before it. Without dropped partitions
nothing of this applies.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import NamedTuple

import psycopg

from shard.devices.track import DeviceState, TrackFix, Visit, adopt_replay, advance
from shard.geo import GeofenceIndex, haversine_m, id_ranges, multirange
from shard.geofences import GeofenceSource

log = logging.getLogger("processor.writer")

REPLAY_CHUNK = 2_000
# The newest fix before a late one is first looked for within this window: the bound lets
# the planner skip all older partitions of positions (and their locks); only if the window
# holds none is the whole history searched.
PREVIOUS_WINDOW = timedelta(days=1)
_TICK = timedelta(microseconds=1)

_PREVIOUS_FIX = """
SELECT ts, lat, lon, speed FROM positions WHERE device_id = %s AND ts < %s AND ts >= %s ORDER BY ts DESC LIMIT 1
"""
# Below this, history was dropped: the lower bound of the lowest partition of positions (NULL
# while one starts at MINVALUE), or higher where retention once dropped more than the
# partitions show now (retention grown, or back at 0, since: migrations/0005_retention_floor.sql).
# NULL: nothing is missing.
_FLOOR = """
SELECT greatest(
    (SELECT CASE WHEN bool_or(b[1] = 'MINVALUE') THEN NULL
                 ELSE min(trim(BOTH '''' FROM b[1])::timestamptz) FILTER (WHERE b[1] <> 'MINVALUE') END
     FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid,
          regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\((.+)\\) TO') AS b
     WHERE i.inhparent = 'positions'::regclass AND NOT i.inhdetachpending),
    (SELECT dropped_below FROM retention_floor))
"""
# Visits of every geofence, active now or not: a replay evaluates each fix with the geofences
# of its own revision, so it may rebuild a visit of one deactivated since.
# A visit entered below the floor and still open at where the replay starts (F1, or the late fix).
_VISIT_ACROSS = """
SELECT EXISTS (SELECT 1 FROM timing_records
               WHERE device_id = %s AND entered_at < %s AND (exited_at IS NULL OR exited_at > %s))
"""
_RECORDED_FLOOR = "SELECT dropped_below FROM retention_floor"
# F1, the device's first stored fix from the floor on (and older than the late fixes), and the
# visits entered at it.
_FIRST_ABOVE_FLOOR = """
SELECT f.ts, f.lat, f.lon, f.speed, tr.geofence_id, tr.entry_crossing_at
FROM (SELECT ts, lat, lon, speed FROM positions
      WHERE device_id = %(device)s AND ts >= %(floor)s AND ts < %(before)s ORDER BY ts LIMIT 1) AS f
LEFT JOIN timing_records tr ON tr.device_id = %(device)s AND tr.entered_at = f.ts
"""
_EARLIEST_VISIT_AROUND = """
SELECT min(entered_at) FROM timing_records
WHERE device_id = %s AND entered_at <= %s AND (exited_at IS NULL OR exited_at > %s)
"""
_FIXES_AFTER = """
SELECT ts, lat, lon, speed, geofence_revision FROM positions WHERE device_id = %s AND ts > %s ORDER BY ts LIMIT %s
"""
# The common case of every late device of a batch in one statement: its newest stored fix before
# the late ones within PREVIOUS_WINDOW, when no visit covers that fix (so the replay starts there),
# and the first chunk of stored fixes after it. A device with no such fix gets no rows and takes
# the step-by-step path of replay_late.
_PREFETCH = """
SELECT l.device_id, prev.ts, prev.lat, prev.lon, prev.speed, f.ts, f.lat, f.lon, f.speed, f.geofence_revision
FROM unnest(%(devices)s::text[], %(earliest)s::timestamptz[]) AS l(device_id, earliest)
CROSS JOIN LATERAL (
    SELECT ts, lat, lon, speed FROM positions p
    WHERE p.device_id = l.device_id AND p.ts < l.earliest AND p.ts >= l.earliest - %(window)s
    ORDER BY ts DESC LIMIT 1) AS prev
CROSS JOIN LATERAL (
    SELECT ts, lat, lon, speed, geofence_revision FROM positions p
    WHERE p.device_id = l.device_id AND p.ts > prev.ts ORDER BY ts LIMIT %(chunk)s) AS f
WHERE NOT EXISTS (
    SELECT 1 FROM timing_records tr
    WHERE tr.device_id = l.device_id AND tr.entered_at <= prev.ts AND (tr.exited_at IS NULL OR tr.exited_at > prev.ts))
ORDER BY l.device_id, f.ts
"""
# Up to this many runs of ids are sent with the delete; more are narrowed first (`delete_replayed_visits`).
_RUNS_SENT_WHOLE = 64
# Both name the devices twice: `= ANY` lets the planner use the index on timing_records'
# device_id whatever it guesses of the unnest, which pairs each device with its bounds.
_VISITED_BETWEEN = """
SELECT DISTINCT tr.device_id, tr.geofence_id
FROM timing_records tr
JOIN unnest(%(devices)s::text[], %(lower)s::timestamptz[], %(upper)s::timestamptz[]) AS d(device_id, lower, upper)
  ON tr.device_id = d.device_id COLLATE "C" AND tr.entered_at > d.lower AND tr.entered_at < d.upper
WHERE tr.device_id = ANY(%(devices)s::text[])
"""
_DELETE_VISITS = """
DELETE FROM timing_records tr
USING unnest(%(devices)s::text[], %(ids)s::int8multirange[], %(lower)s::timestamptz[], %(upper)s::timestamptz[])
  AS d(device_id, ids, lower, upper)
WHERE tr.device_id = ANY(%(devices)s::text[]) AND tr.device_id = d.device_id COLLATE "C"
  AND tr.geofence_id <@ d.ids AND tr.entered_at > d.lower AND tr.entered_at < d.upper
"""


Stored = tuple[TrackFix, "int | None"]  # a stored fix, and the geofence revision it was derived with
Prefetched = tuple[TrackFix, list[Stored]]  # where a replay starts, and the first chunk after it


async def prefetch_replays(cur: psycopg.AsyncCursor, late: dict[str, set[datetime]]) -> dict[str, Prefetched]:
    """For every late device at once, what replay_late would read first (see _PREFETCH)."""
    devices = sorted(late)
    await cur.execute(_PREFETCH, {
        "devices": devices, "earliest": [min(late[d]) for d in devices], "window": PREVIOUS_WINDOW,
        "chunk": REPLAY_CHUNK,
    })
    found: dict[str, Prefetched] = {}
    for device_id, *row in await cur.fetchall():
        if device_id not in found:
            found[device_id] = (TrackFix(*row[:4]), [])
        found[device_id][1].append((TrackFix(*row[4:8]), row[8]))
    return found


async def replay_late(
    cur: psycopg.AsyncCursor,
    state: DeviceState,
    new_ts: set[datetime],
    index: GeofenceIndex,
    source: GeofenceSource,
    deletions: list[VisitDeletion],
    prefetched: Prefetched | None = None,
    recorded: datetime | None = None,
) -> list[Visit]:
    """Bring `state` to what an in-order replay gives; returns visits to upsert, and adds to
    `deletions` the stored visits they replace (for `delete_replayed_visits`, after every late
    device of the batch: each replay reads only its own device's visits).

    `new_ts` are the times of the device's fixes this batch stored (already in
    `positions`, inside the caller's transaction, under the device's lock), derived with
    `index`; `source` gives the indexes of earlier revisions. `prefetched` is what
    prefetch_replays found for the device, if anything; `recorded` what `recorded_floor` read.

    Only the floor maintenance recorded can lie above a stored fix (the lowest partition holds
    fixes itself), so it alone decides whether a fix is below the floor; the whole floor is
    read only for a replay with no F0.
    """
    earliest = min(new_ts)
    if recorded is not None and earliest < recorded:
        above = {ts for ts in new_ts if ts >= recorded}
        if not above:
            return await _advance_newer(cur, state, earliest, index)
        _not_replayed(state.device_id, earliest)
        new_ts, earliest, prefetched = above, min(above), None  # the rest is replayed without it
    first_chunk: list[Stored] | None = None
    if prefetched is not None:
        start, first_chunk = prefetched
    else:
        start = await _quiet_fix_before(cur, state.device_id, earliest)
    floor = None
    if start is None or (recorded is not None and start.ts < recorded):
        floor = await dropped_below(cur)
    opened: dict[int, Visit] = {}
    if floor is not None:
        first = await _first_above_floor(cur, state.device_id, floor, earliest)
        if await _visit_across(cur, state.device_id, floor, first[0].ts if first is not None else earliest):
            return await _advance_newer(cur, state, earliest, index)
        start, first_chunk = None, None
        if first is not None:
            start, opened = first
    replay = DeviceState(state.device_id, last=start, open=opened)
    newest_new = max(new_ts)
    old_prev, old_distance = start, 0.0
    visits: dict[tuple[int, datetime], Visit] = {}
    used: dict[int, GeofenceIndex] = {}  # the indexes the stretch was evaluated with, by revision
    stop: TrackFix | None = None
    if start is not None:
        after = start.ts
    else:  # from the device's first fix (from the floor on: fixes stored below it since are no history)
        after = floor - _TICK if floor is not None else datetime.min.replace(tzinfo=newest_new.tzinfo)
    lower = after  # visits entered after it are replaced; those entered at F0 or F1 the replay upserts
    more = True
    while stop is None and more:
        if first_chunk is not None:
            chunk, first_chunk = first_chunk, None
        else:
            await cur.execute(_FIXES_AFTER, (state.device_id, after, REPLAY_CHUNK))
            chunk = [(TrackFix(*row[:4]), row[4]) for row in await cur.fetchall()]
        more = len(chunk) == REPLAY_CHUNK  # a short chunk is the end: no round trip to learn it
        if not chunk:
            break
        for fix, covering, fix_index in await _evaluated(cur, chunk, index, source, used):
            if fix.ts not in new_ts:
                if old_prev is not None:
                    old_distance += haversine_m(old_prev.lat, old_prev.lon, fix.lat, fix.lon)
                old_prev = fix
            for visit in advance(replay, fix, covering, fix_index):
                visits[(visit.geofence_id, visit.entered_at)] = visit
            if fix.ts > newest_new and not covering:
                stop = fix
                break
        after = chunk[-1][0].ts
    upper = stop.ts if stop is not None else datetime.max.replace(tzinfo=newest_new.tzinfo)
    replayed, runs = _replayed_geofences(used)
    if replayed:  # visits of no other geofence can have been entered in the stretch
        deletions.append(VisitDeletion(state.device_id, replayed, runs, lower, upper))
    adopt_replay(state, replay, old_distance, to_newest=stop is None, replayed=replayed)
    return list(visits.values())


def _replayed_geofences(used: dict[int, GeofenceIndex]) -> tuple[Collection[int], list[tuple[int, int]]]:
    """The ids of the geofences a replay evaluated, and their runs (`id_ranges`): usually one
    index's own, made once, as a union built per replay cost O(geofences) each time (a third of a
    shard's time with 10,000 of them)."""
    if len(used) == 1:
        (only,) = used.values()
        return only.by_id.keys(), only.id_ranges
    union = {geofence_id for used_index in used.values() for geofence_id in used_index.by_id}
    return union, id_ranges(union)


class VisitDeletion(NamedTuple):
    """A replayed device's stored visits of `replayed` geofences (in `runs`) entered between `lower` and `upper`."""

    device_id: str
    replayed: Collection[int]
    runs: list[tuple[int, int]]
    lower: datetime
    upper: datetime


async def delete_replayed_visits(cur: psycopg.AsyncCursor, deletions: list[VisitDeletion]) -> None:
    """Delete the visits the batch's replays rebuilt, every device's in one statement.

    Ids in many runs (geofences deactivated here and there) are first narrowed to those the
    stretch has visits of (a few): each run costs Postgres parsing, for every replayed device.
    """
    wide = [d for d in deletions if len(d.runs) > _RUNS_SENT_WHOLE]
    if wide:
        await cur.execute(_VISITED_BETWEEN, _bounds(wide))
        visited: dict[str, list[int]] = {}
        for device_id, geofence_id in await cur.fetchall():
            visited.setdefault(device_id, []).append(geofence_id)
        narrowed = {d.device_id: id_ranges(g for g in visited.get(d.device_id, ()) if g in d.replayed) for d in wide}
        deletions = [d._replace(runs=narrowed.get(d.device_id, d.runs)) for d in deletions]
        deletions = [d for d in deletions if d.runs]
    if deletions:
        await cur.execute(_DELETE_VISITS, {**_bounds(deletions), "ids": [multirange(d.runs) for d in deletions]})


def _bounds(deletions: list[VisitDeletion]) -> dict[str, list]:
    return {
        "devices": [d.device_id for d in deletions],
        "lower": [d.lower for d in deletions],
        "upper": [d.upper for d in deletions],
    }


async def _evaluated(
    cur: psycopg.AsyncCursor, chunk: list[Stored], current: GeofenceIndex, source: GeofenceSource, used: dict[int, GeofenceIndex]
) -> list[tuple[TrackFix, frozenset[int], GeofenceIndex]]:
    """Each stored fix with the geofences covering it, by the index of the revision it was derived
    with (`source.at`: `current` for this batch's)."""
    by_revision: dict[int | None, list[int]] = {}
    for position, (_, revision) in enumerate(chunk):
        by_revision.setdefault(revision, []).append(position)
    evaluated: list[tuple[TrackFix, frozenset[int], GeofenceIndex]] = [None] * len(chunk)  # type: ignore[list-item]
    for revision, positions in by_revision.items():
        index = await source.at(cur, revision, current)
        used[index.revision] = index
        fixes = [chunk[position][0] for position in positions]
        for position, fix, covering in zip(positions, fixes, index.inside([f.lat for f in fixes], [f.lon for f in fixes])):
            evaluated[position] = (fix, covering, index)
    return evaluated


async def _quiet_fix_before(cur: psycopg.AsyncCursor, device_id: str, before: datetime) -> TrackFix | None:
    """The newest stored fix older than `before` that no visit covers."""
    while True:
        fix = await _previous_fix(cur, device_id, before)
        if fix is None:
            return fix
        await cur.execute(_EARLIEST_VISIT_AROUND, (device_id, fix.ts, fix.ts))
        (entered_at,) = await cur.fetchone()  # type: ignore[misc]
        if entered_at is None:
            return fix
        before = entered_at


async def _previous_fix(cur: psycopg.AsyncCursor, device_id: str, before: datetime) -> TrackFix | None:
    """The newest stored fix older than `before`: within PREVIOUS_WINDOW first, then anywhere."""
    for since in (before - PREVIOUS_WINDOW, datetime.min.replace(tzinfo=before.tzinfo)):
        await cur.execute(_PREVIOUS_FIX, (device_id, before, since))
        row = await cur.fetchone()
        if row is not None:
            return TrackFix(*row)
    return None


async def dropped_below(cur: psycopg.AsyncCursor) -> datetime | None:
    """The floor: below it, partitions of positions were dropped (None: nothing was)."""
    await cur.execute(_FLOOR)
    return (await cur.fetchone())[0]  # type: ignore[index]


async def _first_above_floor(
    cur: psycopg.AsyncCursor, device_id: str, floor: datetime, before: datetime
) -> tuple[TrackFix, dict[int, Visit]] | None:
    """F1 and the device's open visits right after it, rebuilt from the visits entered at F1."""
    await cur.execute(_FIRST_ABOVE_FLOOR, {"device": device_id, "floor": floor, "before": before})
    rows = await cur.fetchall()
    if not rows:
        return None
    fix = TrackFix(*rows[0][:4])
    opened = {
        geofence_id: Visit(geofence_id, fix.ts, entry_crossing_at, samples=1, max_speed=fix.speed)
        for *_, geofence_id, entry_crossing_at in rows
        if geofence_id is not None
    }
    return fix, opened


async def recorded_floor(cur: psycopg.AsyncCursor) -> datetime | None:
    """The floor partition maintenance recorded when it last dropped (None: it never did)."""
    await cur.execute(_RECORDED_FLOOR)
    row = await cur.fetchone()
    return row[0] if row is not None else None


async def _visit_across(cur: psycopg.AsyncCursor, device_id: str, floor: datetime, at: datetime) -> bool:
    """Whether a visit of the device entered in dropped history is still open at `at`, where the replay starts."""
    await cur.execute(_VISIT_ACROSS, (device_id, floor, at))
    return bool((await cur.fetchone())[0])  # type: ignore[index]


def _not_replayed(device_id: str, ts: datetime) -> None:
    log.warning(
        "late fix reaches history that retention dropped: stored, derived state not replayed",
        extra={"device_id": device_id, "ts": ts.isoformat()},
    )


async def _advance_newer(cur: psycopg.AsyncCursor, state: DeviceState, earliest: datetime, index: GeofenceIndex) -> list[Visit]:
    """No exact replay is possible: only the stored fixes newer than the state's last advance it."""
    assert state.last is not None  # a late fix is older than the device's last one
    _not_replayed(state.device_id, earliest)
    visits: dict[tuple[int, datetime], Visit] = {}
    after = state.last.ts
    while True:
        await cur.execute(_FIXES_AFTER, (state.device_id, after, REPLAY_CHUNK))
        chunk = [TrackFix(*row[:4]) for row in await cur.fetchall()]  # this batch's fixes: `index`'s revision
        if not chunk:
            return list(visits.values())
        inside = index.inside([f.lat for f in chunk], [f.lon for f in chunk])
        for fix, covering in zip(chunk, inside):
            for visit in advance(state, fix, covering, index):
                visits[(visit.geofence_id, visit.entered_at)] = visit
        after = chunk[-1].ts
