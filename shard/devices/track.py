"""A device's derived state, advanced one fix at a time in `ts` order (SPEC §3).

The same `advance` serves the live path and the replay after late data, which is what
makes the result equal to a serial, in-order replay of the device's fixes. This module
is the only one that changes `odometer_m` (through `_drive`): live steps in `advance`,
and the correction a replay of late data makes in `adopt_replay`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from shard.geo import GeofenceIndex, haversine_m


@dataclass(slots=True)
class Visit:
    """One row of timing_records, identified by (device_id, geofence_id, entered_at)."""

    geofence_id: int
    entered_at: datetime
    entry_crossing_at: datetime | None
    exited_at: datetime | None = None
    exit_crossing_at: datetime | None = None
    distance_m: float = 0.0
    max_speed: float | None = None
    samples: int = 0


class TrackFix(NamedTuple):
    """What the derived state needs of a fix (a tuple: made in C, for every state loaded)."""

    ts: datetime
    lat: float
    lon: float
    speed: float | None = None


@dataclass(slots=True)
class DeviceState:
    """Derived state after the device's newest processed fix; `version` is its row version."""

    device_id: str
    version: int = 0
    last: TrackFix | None = None
    odometer_m: float = 0.0
    open: dict[int, Visit] = field(default_factory=dict)
    # True while a transaction that changes this copy in place has not committed, and for
    # good once the cache let go of it: its version then proves nothing (cache.py).
    dirty: bool = field(default=False, compare=False, repr=False)


def advance(state: DeviceState, fix: TrackFix, inside: frozenset[int], index: GeofenceIndex) -> list[Visit]:
    """Apply the next fix (newer than state.last); returns the visits it changed.

    `fix` may be any object with ts, lat, lon and speed (a decoded Fix is one).
    """
    prev = state.last
    step = haversine_m(prev.lat, prev.lon, fix.lat, fix.lon) if prev is not None else 0.0
    _drive(state, step)
    if not inside and not state.open:  # the common case: nothing to time
        state.last = fix
        return []
    changed: list[Visit] = []
    for geofence_id, visit in list(state.open.items()):
        if geofence_id in inside:
            visit.samples += 1
            visit.distance_m += step
            visit.max_speed = _max(visit.max_speed, fix.speed)
        else:
            assert prev is not None  # an open visit implies an earlier fix
            visit.exited_at = fix.ts
            visit.exit_crossing_at = index.crossing_at(geofence_id, _point(prev), _point(fix))
            del state.open[geofence_id]
        changed.append(visit)
    for geofence_id in sorted(inside - state.open.keys()):
        entry = index.crossing_at(geofence_id, _point(prev), _point(fix)) if prev is not None else None
        visit = Visit(geofence_id, fix.ts, entry, samples=1, max_speed=fix.speed)
        state.open[geofence_id] = visit
        changed.append(visit)
    state.last = fix
    return changed


def adopt_replay(state: DeviceState, replay: DeviceState, replaced_m: float, to_newest: bool, replayed: Collection[int]) -> None:
    """Take over what a replay of a stretch of history computed (see replay.py).

    `replay` advanced over the stretch and measured its distance anew; `replaced_m` is the
    distance the stored fixes of that stretch had contributed before, so the odometer is
    corrected by the difference. When the replay ran through the device's newest fix,
    its end state (last fix, open visits) becomes the state; visits of geofences the
    replay never evaluated (not in `replayed`: inactive throughout its stretch) stay
    open, to close at the next fix as live.
    """
    _drive(state, replay.odometer_m - replaced_m)
    if to_newest:
        untouched = {gid: visit for gid, visit in state.open.items() if gid not in replayed}
        state.last, state.open = replay.last, {**untouched, **replay.open}


def _drive(state: DeviceState, metres: float) -> None:
    """The one place the odometer changes."""
    state.odometer_m += metres


def _point(fix: TrackFix) -> tuple[datetime, float, float]:
    return fix.ts, fix.lat, fix.lon


def _max(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None or a >= b else b
