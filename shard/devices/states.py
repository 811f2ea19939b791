"""The entry to derived state: what one batch's transaction does to its devices.

SPEC §5 "Derived state is order-proof": odometers and visits must equal a serial,
in-order replay of each device's fixes, although a device's fixes reach different
shards and instances, are redelivered, or arrive late. Inside the batch's transaction
`DeviceBatch.apply` therefore:

1. locks the batch's devices (whoever else touches them waits until commit);
2. loads their state: the cached copy where its version still matches
   `last_position.state_version` (and no uncommitted batch changed it: cache.py),
   otherwise from Postgres, one query for the batch; the
   same query reads the geofence revision, and the batch derives with the index of that
   revision, loaded in this transaction if the shard holds another (shard/geofences.py:
   this is what makes each device switch geofence sets at one point of its history);
3. stores the positions (with ON CONFLICT and RETURNING only when some fix is not newer
   than its device's state, to tell late fixes from duplicates);
4. advances every device by its new fixes in `ts` order (live.py), and replays devices
   with late fixes from their stored history (replay.py), both through `advance` and
   with the same index;
5. bumps the changed devices' versions and writes visits, odometers and last_position.

The cache only keeps the new states once the transaction committed (the batch's
context manager exits cleanly); otherwise the batch's devices are dropped from it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from datetime import datetime
from types import TracebackType

import psycopg

from shard.decode import Fix
from shard.devices.cache import DeviceCache
from shard.devices.live import derive, older_than_state
from shard.devices.replay import VisitDeletion, delete_replayed_visits, prefetch_replays, recorded_floor, replay_late
from shard.devices.store import insert_positions_returning, store_derived
from shard.devices.track import DeviceState
from shard.geofences import GeofenceSource

_DEVICE_AND_TS = itemgetter(0, 1)  # a Fix's (device_id, ts), read in C
DERIVED_COUNTS = ("devices_reloaded", "devices_replayed", "visits_written")  # DeviceStates.counts, in the shard's logs


@dataclass(frozen=True)
class Applied:
    """What one batch did to derived state."""

    reloaded: frozenset[str]  # read from Postgres: not cached, or the cached copy was stale
    late: frozenset[str]  # replayed from stored history because of a late fix
    changed: frozenset[str]  # state and version changed (and written)
    visits: int  # timing_records rows written
    revision: int  # the geofence revision the batch was derived with


@dataclass
class LockTurn:
    """A batch's place in its shard's order of device locks: after the batch before it.

    A shard writes two batches at once (shard/pipeline.py); the later one asks for its
    locks only once the earlier one's are granted, so where both hold fixes of a device,
    Postgres makes the later wait for the earlier's commit, and each device's fixes are
    applied in the order the shard read them (rather than the earlier batch's looking late).
    """

    previous: asyncio.Event | None = None
    granted: asyncio.Event = field(default_factory=asyncio.Event)

    async def come(self) -> None:
        """Wait until the batch before this one holds its locks (or has given up on them)."""
        if self.previous is not None:
            await self.previous.wait()


class DeviceStates:
    """The derived state of every device a shard meets: its cache and how batches change it."""

    def __init__(self, cache_size: int) -> None:
        self.cache = DeviceCache(cache_size)
        # Of committed batches: devices read from Postgres (not cached, or stale), devices replayed
        # because of a late fix, visits written. What derived state costs a shard, for its logs.
        self.counts = dict.fromkeys(DERIVED_COUNTS, 0)

    def batch(self, fixes: Sequence[Fix]) -> DeviceBatch:
        """Start a batch: `with states.batch(fixes) as batch:` around the transaction."""
        return DeviceBatch(self.cache, fixes, self.counts)


class DeviceBatch:
    """One batch's devices, from the cached states it starts with to the states it commits."""

    def __init__(self, cache: DeviceCache, fixes: Sequence[Fix], counts: dict[str, int]) -> None:
        self.fixes = fixes
        self.counts = counts
        self.applied: Applied | None = None
        self.devices = sorted({fix.device_id for fix in fixes})
        self._cache = cache
        self._cached = cache.pick(self.devices)
        self._states: dict[str, DeviceState] = {}

    def cached_versions(self) -> dict[str, int | None]:
        """Device → version of its cached copy (None: not cached), to stage beside each fix."""
        return {device_id: (state.version if state is not None else None) for device_id, state in self._cached.items()}

    async def apply(
        self, cur: psycopg.AsyncCursor, geofences: GeofenceSource, *, safe: bool = False, turn: LockTurn | None = None
    ) -> Applied:
        """Store the staged positions and the derived state they cause (steps 1-5 above).

        `geofences` gives the index of the revision read after the locks. `safe` inserts
        the positions with ON CONFLICT even when every fix looks new. `turn` is told once
        the locks are granted.
        """
        # Stable sort: fixes with the same key keep entry order, as `seq` does in SQL.
        ordered = sorted(self.fixes, key=_DEVICE_AND_TS)
        # The locks, then the first statement after them: its snapshot follows every earlier
        # transaction of these devices, so the revision it reads is the one this batch must use.
        self._states, reloaded, revision = await self._cache.load(cur, self._cached)
        if turn is not None:
            turn.granted.set()
        for state in self._states.values():
            state.dirty = True  # until commit: changed in place from here on
        index = await geofences.for_revision(cur, revision)
        inserted: set[tuple[str, datetime]] | None = None
        if safe or older_than_state(ordered, self._states):
            inserted = await insert_positions_returning(cur, index.revision)
        derived = derive(ordered, self._states, index, inserted)
        if derived.late:
            prefetched = await prefetch_replays(cur, derived.late)
            recorded = await recorded_floor(cur)
            deletions: list[VisitDeletion] = []
            for device_id, new_ts in derived.late.items():
                state = self._states[device_id]
                visits = await replay_late(cur, state, new_ts, index, geofences, deletions, prefetched.get(device_id), recorded)
                derived.add_visits(device_id, visits)
            await delete_replayed_visits(cur, deletions)
        # The revision derived with: `index`'s, which may be newer than the one the load read, if the
        # set had to be loaded (in another snapshot) and changed meanwhile.
        await store_derived(cur, derived, positions_inserted=inserted is not None, revision=index.revision)
        self.applied = Applied(
            frozenset(reloaded), frozenset(derived.late), frozenset(derived.touched), len(derived.visits), index.revision
        )
        return self.applied

    def __enter__(self) -> DeviceBatch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            # States may have been changed in place for a transaction that did not commit:
            # they stay dirty, and the cache forgets its copies.
            self._cache.drop(self.devices)
            return
        for state in self._states.values():
            self._cache.put(state)
        if self.applied is not None:
            self.counts["devices_reloaded"] += len(self.applied.reloaded)
            self.counts["devices_replayed"] += len(self.applied.late)
            self.counts["visits_written"] += self.applied.visits
