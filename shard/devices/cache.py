"""Per-shard cache of device state, checked against Postgres (the truth) on every batch.

SPEC §5 "Rehydration": a device met for the first time, or whose cached copy is stale
(another shard, instance or `processor rehydrate` changed it since), is loaded from
`last_position` and its open `timing_records`, with one query per batch. Staleness is
decided by `last_position.state_version`, which every change of a device bumps: the
cached version travels with the staged fixes, and Postgres sends the stored state back
only where the versions differ.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from datetime import datetime

import orjson
import psycopg

from shard.devices.store import LOCK_DEVICES
from shard.devices.track import DeviceState, TrackFix, Visit

# Every device of the batch gets its row version back; its stored state (newest fix, odometer,
# open visits) only where its cached copy is missing or differs (the cached version came in
# with the staged fixes). The state comes as plain columns, which psycopg reads in C; the open
# visits, rare, as JSON (NULL when there are none). Every row also carries the geofence
# revision, read here because this is the batch's first statement after its device locks
# (shard/geofences.py says why that matters); the one-row relation on the left gives one row
# even when no device is stored yet. (Joining the table itself would do too, but its missing
# statistics make the planner expect thousands of rows and switch JIT on: ten milliseconds
# per batch.) One query per batch.
#
# Each device's row is found by one of two joins. The planner cannot count a batch's devices
# (the staging table has no statistics: it guesses 200), so left to itself it reads all of
# last_position into a hash table for a batch of a few devices as for one of hundreds; with
# 2,000 devices stored that was 0.75 ms of a 20-fix batch's 2 ms, growing with the fleet.
# A batch of few devices therefore looks each one up in the primary key (a LATERAL subquery
# with LIMIT is never flattened into a join); larger ones keep the planner's choice, which
# is the hash join while last_position is small and index lookups once it is large.
FEW_DEVICES = 100
_JOIN_ANY = "JOIN last_position lp ON lp.device_id = c.device_id"
_JOIN_EACH = "CROSS JOIN LATERAL (SELECT * FROM last_position WHERE device_id = c.device_id LIMIT 1) AS lp"
_LOAD = """
SELECT r.revision, s.device_id, s.state_version,
       CASE WHEN s.stale THEN s.ts END, CASE WHEN s.stale THEN s.lat END, CASE WHEN s.stale THEN s.lon END,
       CASE WHEN s.stale THEN s.speed END, CASE WHEN s.stale THEN s.odometer_m END,
       CASE WHEN s.stale THEN (
           SELECT json_agg(json_build_array(tr.geofence_id, tr.entered_at, tr.entry_crossing_at,
                                            tr.distance_m, tr.max_speed, tr.samples) ORDER BY tr.entered_at)
           FROM timing_records tr WHERE tr.device_id = s.device_id AND tr.exited_at IS NULL) END
FROM (SELECT (SELECT revision FROM geofence_revision) AS revision) AS r LEFT JOIN (
    SELECT lp.device_id, lp.state_version, lp.ts, lp.lat, lp.lon, lp.speed, lp.odometer_m,
           lp.state_version IS DISTINCT FROM c.version AS stale
    FROM (SELECT DISTINCT ON (device_id) device_id, cached_version AS version FROM staging_positions) AS c
    {join}
) AS s ON true
"""
_LOCK_AND_LOAD_ANY = f"{LOCK_DEVICES};{_LOAD.format(join=_JOIN_ANY)}"
_LOCK_AND_LOAD_EACH = f"{LOCK_DEVICES};{_LOAD.format(join=_JOIN_EACH)}"


class CachedStateDirty(Exception):
    """A cached state this batch picked is dirty (an earlier batch that changes it in place has
    not committed, or the cache let go of it): the batch starts again from a fresh pick."""


class DeviceCache:
    """An LRU of DeviceState; a hit is only used when its version matches the database's.

    Two batches of a shard may be in flight at once (shard/pipeline.py), and a batch changes
    the states it derives in place, version included, before it commits. A picked state whose
    version matches the database's is therefore used only if it is not dirty: the version of
    a copy changed by a transaction that did not commit (or not yet) proves nothing.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._states: OrderedDict[str, DeviceState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def put(self, state: DeviceState) -> None:
        """Keep a state that was just committed."""
        state.dirty = False
        self._states[state.device_id] = state
        self._states.move_to_end(state.device_id)
        while len(self._states) > self.capacity:
            self._states.popitem(last=False)

    def drop(self, device_ids: Iterable[str]) -> None:
        """Forget these devices; a batch that picked their copies may no longer use them."""
        for device_id in device_ids:
            state = self._states.pop(device_id, None)
            if state is not None:
                state.dirty = True

    def snapshot(self, limit: int = 1000) -> dict[str, object]:
        """Part of the cache in plain JSON terms, for panic dumps."""
        return {device_id: _describe(state) for device_id, state in list(self._states.items())[-limit:]}

    def pick(self, device_ids: list[str]) -> dict[str, DeviceState | None]:
        """The cached states a batch starts from (their versions are staged with its fixes)."""
        return {device_id: self._states.get(device_id) for device_id in device_ids}

    async def load(
        self, cur: psycopg.AsyncCursor, cached: dict[str, DeviceState | None]
    ) -> tuple[dict[str, DeviceState], set[str], int]:
        """The current state of each device, from `cached` where it is fresh, else from Postgres.

        Also returns the devices whose state was read from Postgres, and the geofence
        revision committed before this statement. The cached versions travel in the staging
        table. The devices are locked first, in the same round trip (store.LOCK_DEVICES):
        nobody changes them before commit.
        """
        await cur.execute(_LOCK_AND_LOAD_EACH if len(cached) <= FEW_DEVICES else _LOCK_AND_LOAD_ANY)
        cur.nextset()  # past the locks' result
        found: dict[str, DeviceState] = {}
        loaded: set[str] = set()
        revision = -1
        for revision, device_id, version, ts, lat, lon, speed, odometer_m, visits in await cur.fetchall():
            if device_id is None:
                continue  # no device of the batch is stored yet
            state = cached.get(device_id)
            if ts is not None:  # stale or not cached: its stored state came along (ts is NOT NULL)
                state = DeviceState(device_id, version, TrackFix(ts, lat, lon, speed), odometer_m, _open_visits(visits))
                loaded.add(device_id)
            elif state is not None and state.dirty:
                raise CachedStateDirty(device_id)
            found[device_id] = state
        return {d: found.get(d) or DeviceState(d) for d in cached}, loaded, revision


def _open_visits(rows: list[list[object]] | None) -> dict[int, Visit]:
    visits: dict[int, Visit] = {}
    for geofence_id, entered_at, entry_crossing_at, distance_m, max_speed, samples in rows or []:
        visits[int(geofence_id)] = Visit(  # type: ignore[call-overload]
            int(geofence_id),  # type: ignore[call-overload]
            _time(entered_at),  # type: ignore[arg-type]
            _time(entry_crossing_at) if entry_crossing_at else None,  # type: ignore[arg-type]
            distance_m=float(distance_m),  # type: ignore[arg-type]
            max_speed=float(max_speed) if max_speed is not None else None,  # type: ignore[arg-type]
            samples=int(samples),  # type: ignore[call-overload]
        )
    return visits


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _describe(state: DeviceState) -> dict[str, object]:
    # Open visits are keyed by geofence id: JSON keys are strings, and without OPT_NON_STR_KEYS
    # one open visit made the whole dump's state unavailable.
    return orjson.loads(orjson.dumps(state, option=orjson.OPT_NON_STR_KEYS, default=_plain))


def _plain(value: object) -> object:
    """What orjson leaves to us: the last fix (a NamedTuple) by its field names."""
    return value._asdict() if isinstance(value, TrackFix) else str(value)
