"""The live path of derived state: a batch's fixes applied to the devices' states in order.

Late fixes are only marked here (a device with one is replayed from history by
replay.py); every other new fix advances its device through `advance`, with the
geofence test made once for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from shard.decode import Fix
from shard.devices.track import DeviceState, Visit, advance
from shard.geo import GeofenceIndex


@dataclass
class Derived:
    """What one batch changes, besides the positions themselves."""

    touched: dict[str, DeviceState] = field(default_factory=dict)
    visits: dict[tuple[str, int, datetime], Visit] = field(default_factory=dict)
    late: dict[str, set[datetime]] = field(default_factory=dict)  # device → ts of all its new fixes

    def add_visits(self, device_id: str, visits: list[Visit]) -> None:
        for visit in visits:
            self.visits[(device_id, visit.geofence_id, visit.entered_at)] = visit


def older_than_state(fixes: list[Fix], states: dict[str, DeviceState]) -> bool:
    """Whether any fix is not newer than its device's last one: a duplicate, or late data."""
    for fix in fixes:
        last = states[fix.device_id].last
        if last is not None and fix.ts <= last.ts:
            return True
    return False


def derive(
    fixes: list[Fix], states: dict[str, DeviceState], index: GeofenceIndex, inserted: set[tuple[str, datetime]] | None
) -> Derived:
    """Advance every device by its new fixes, in `ts` order.

    `fixes` are in (device_id, ts, entry) order. A device with a new fix older than its
    last one is only marked late: its history is replayed by replay_late() instead.
    `inserted` (the keys the positions insert returned) is needed only when some fix is
    not newer than its device's last.
    """
    derived = Derived()
    forward: list[Fix] = []
    previous: tuple[str, datetime] | None = None
    for fix in fixes:
        key = (fix.device_id, fix.ts)
        if key == previous:
            continue  # the same fix twice in one batch counts once (the first was stored)
        previous = key
        last = states[fix.device_id].last
        if last is None or fix.ts > last.ts:
            forward.append(fix)
        elif inserted is not None and key in inserted:
            derived.late.setdefault(fix.device_id, set()).add(fix.ts)
    for fix in forward:
        if fix.device_id in derived.late:
            derived.late[fix.device_id].add(fix.ts)
    forward = [fix for fix in forward if fix.device_id not in derived.late]
    inside = index.inside([f.lat for f in forward], [f.lon for f in forward]) if len(index) else None
    for position, fix in enumerate(forward):
        state = states[fix.device_id]
        covering = inside[position] if inside is not None else frozenset()
        visits = advance(state, fix, covering, index)  # type: ignore[arg-type]
        if visits:
            derived.add_visits(fix.device_id, visits)
        derived.touched[fix.device_id] = state
    for device_id in derived.late:
        derived.touched[device_id] = states[device_id]
    return derived
