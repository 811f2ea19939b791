"""Derived state: each device's odometer and geofence visits, in one home.

The writer calls `DeviceStates` inside its batch transaction; `processor rehydrate` calls
`bump_state_version` inside its own. Modules:

- track.py   the state model and `advance`, one fix at a time in `ts` order; the only
             code that changes the odometer
- cache.py   the per-shard LRU, checked against `last_position.state_version`, and the
             load of missing or stale devices (one round trip with the device locks)
- live.py    a batch's new fixes applied in order; late ones only marked
- replay.py  late data: a device's stored history replayed through `advance`
- store.py   the SQL: device lock, positions insert, visits and last_position upserts,
             the version bump
- states.py  `DeviceStates`/`DeviceBatch`: the order of all of the above in a transaction
"""

from shard.devices.cache import CachedStateDirty
from shard.devices.states import DERIVED_COUNTS, Applied, DeviceBatch, DeviceStates, LockTurn
from shard.devices.store import bump_state_version

__all__ = [
    "DERIVED_COUNTS",
    "Applied",
    "CachedStateDirty",
    "DeviceBatch",
    "DeviceStates",
    "LockTurn",
    "bump_state_version",
]
