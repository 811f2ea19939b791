"""Shared memory through which shards report heartbeat, health and counters to the supervisor.

The supervisor maps it before the first fork, so every shard inherits the same pages; a
restarted shard continues its slot's counters, which therefore only ever grow. A second
part holds what only the supervisor knows (which slots run, their pids, start times and
restarts, whether it is stopping, its own beat); it writes that part from its loop. A third
part is the maintenance process's (its counters and beat), written by it alone. The HTTP
process the supervisor forks reads these three for /healthz and /metrics; no shard needs an
HTTP server of its own. Each of these three is a record with one writer, which readers in
other processes always see whole (`_Record`). A fourth part holds last words: the one line a shard or the
maintenance process leaves when it exits 78, which the supervisor takes into its halt reason.
"""

from __future__ import annotations

import mmap
import struct
import time
from dataclasses import dataclass, field, replace

# Upper bounds of the batch-duration histogram buckets (the last bucket is +Inf).
BATCH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# heartbeat (CLOCK_MONOTONIC is system-wide on Linux, so parent and child compare it),
# pid, redis_ok, postgres_ok, processed, dead_lettered, claimed, batches, in_flight, lost,
# expired, partitions_missed, batch-seconds sum, then one count per bucket (+Inf included),
# not cumulative.
_SLOT = struct.Struct(f"<d i B B 2x Q Q Q Q Q Q Q Q d {len(BATCH_BUCKETS_S) + 1}Q")
_SLOT_FIELDS = 13  # values before the buckets
# The supervisor's part: its pid, its stopping flag, its last beat; then per slot: running,
# the shard's pid, its start time (monotonic) and the slot's restarts.
_SUPERVISOR = "<i B 3x d"
_SUPERVISED = " B 3x i d Q"
_SUPERVISED_FIELDS = 4
# The maintenance process's part: entries it found lost (trimmed or deleted before they were
# delivered to the group), and the monotonic time its last stream pass ended.
_MAINTENANCE = struct.Struct("<Q d")
# Last words: the one line a process that cannot go on (exit 78) leaves for the supervisor's
# halt reason, one area per shard slot and one for the maintenance process. Written once,
# just before the writer exits; read after the supervisor reaped it, so no lock is needed.
LAST_WORDS_BYTES = 1024
_READ_ATTEMPTS = 1000  # a write takes microseconds; a reader never needs more than a few


class _Record:
    """A record with one writer at a time and readers in other processes, in two copies.

    `struct.pack_into` zeroes its target before it packs the values, so a reader of a record
    being written in place can see every counter at 0 (Prometheus reads a drop as a reset),
    and a writer killed mid-write would leave it so for its successor. Here the writer fills
    the copy readers are not directed to, then advances the sequence that directs them; a
    reader takes the copy the sequence names and checks that the sequence did not move
    meanwhile. A writer killed at any point leaves the last whole copy in force.
    """

    _SEQUENCE = struct.Struct("<Q")

    def __init__(self, layout: struct.Struct, at: int) -> None:
        self.layout = layout
        self.at = at

    @classmethod
    def size(cls, layout: struct.Struct) -> int:
        return cls._SEQUENCE.size + 2 * layout.size

    def _copy_at(self, sequence: int) -> int:
        return self.at + self._SEQUENCE.size + (sequence % 2) * self.layout.size

    def write(self, memory: mmap.mmap, *values: object) -> None:
        sequence = self._SEQUENCE.unpack_from(memory, self.at)[0]
        self.layout.pack_into(memory, self._copy_at(sequence + 1), *values)
        self._SEQUENCE.pack_into(memory, self.at, sequence + 1)

    def read(self, memory: mmap.mmap) -> tuple[object, ...]:
        for _ in range(_READ_ATTEMPTS):
            sequence = self._SEQUENCE.unpack_from(memory, self.at)[0]
            values = self.layout.unpack_from(memory, self._copy_at(sequence))
            if self._SEQUENCE.unpack_from(memory, self.at)[0] == sequence:
                break
        return values


@dataclass(frozen=True)
class ShardStatus:
    heartbeat: float = 0.0
    pid: int = 0
    redis_ok: bool = False
    postgres_ok: bool = False
    processed: int = 0
    dead_lettered: int = 0
    claimed: int = 0
    batches: int = 0
    in_flight: int = 0  # entries read and not yet settled
    lost: int = 0  # pending entries found deleted or trimmed (nothing left to store)
    expired: int = 0  # fixes older than the POSITIONS_RETENTION_DAYS horizon: acknowledged, not stored
    # writes that found a partition of `positions` missing: the maintenance process, seeing this
    # grow, runs its partition pass at once rather than at its next turn
    partitions_missed: int = 0
    batch_seconds_sum: float = 0.0
    batch_buckets: tuple[int, ...] = field(default=(0,) * (len(BATCH_BUCKETS_S) + 1))


@dataclass(frozen=True)
class SlotState:
    """One slot as the supervisor sees it."""

    running: bool = False
    pid: int = 0
    started_at: float = 0.0  # monotonic
    restarts: int = 0


@dataclass(frozen=True)
class MaintenanceState:
    lost: int = 0  # entries trimmed or deleted before they were delivered to the group, counted by this instance
    pass_at: float = 0.0  # monotonic end of the last stream pass (0: none yet)


@dataclass(frozen=True)
class SupervisorState:
    pid: int = 0
    stopping: bool = False
    beat: float = 0.0  # monotonic time of the supervisor's last loop iteration
    slots: tuple[SlotState, ...] = ()


def bucket_of(seconds: float) -> int:
    """Index of the histogram bucket a batch duration falls in."""
    for index, bound in enumerate(BATCH_BUCKETS_S):
        if seconds <= bound:
            return index
    return len(BATCH_BUCKETS_S)


class StatusBoard:
    """One fixed-size slot per shard index in an anonymous shared mapping."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._slots = [_Record(_SLOT, slot * _Record.size(_SLOT)) for slot in range(slots)]
        supervisor = struct.Struct(_SUPERVISOR + _SUPERVISED * slots)
        self._supervisor = _Record(supervisor, _Record.size(_SLOT) * slots)
        self._maintenance = _Record(_MAINTENANCE, self._supervisor.at + _Record.size(supervisor))
        self._last_words_at = self._maintenance.at + _Record.size(_MAINTENANCE)
        self._map = mmap.mmap(-1, self._last_words_at + LAST_WORDS_BYTES * (slots + 1))

    def read(self, slot: int) -> ShardStatus:
        values = self._slots[slot].read(self._map)
        heartbeat, pid, redis_ok, pg_ok, processed, dead, claimed, batches, in_flight, lost, expired, missed, seconds = (
            values[:_SLOT_FIELDS]
        )
        return ShardStatus(
            heartbeat, pid, bool(redis_ok), bool(pg_ok), processed, dead, claimed, batches, in_flight, lost, expired,  # type: ignore[arg-type]
            missed, seconds, tuple(values[_SLOT_FIELDS:]),  # type: ignore[arg-type]
        )

    def write(self, slot: int, status: ShardStatus) -> None:
        self._slots[slot].write(
            self._map,
            status.heartbeat,
            status.pid,
            status.redis_ok,
            status.postgres_ok,
            status.processed,
            status.dead_lettered,
            status.claimed,
            status.batches,
            status.in_flight,
            status.lost,
            status.expired,
            status.partitions_missed,
            status.batch_seconds_sum,
            *status.batch_buckets,
        )

    def reset_liveness(self, slot: int, pid: int) -> None:
        """Mark a slot as just started by `pid`, keeping its counters."""
        old = self.read(slot)
        self.write(slot, replace(old, heartbeat=time.monotonic(), pid=pid, redis_ok=False, postgres_ok=False, in_flight=0))

    def write_supervisor(self, state: SupervisorState) -> None:
        """The supervisor's part, written by the supervisor alone."""
        slots = (*state.slots[: self.slots], *(SlotState(),) * (self.slots - len(state.slots)))
        per_slot = (value for slot in slots for value in (slot.running, slot.pid, slot.started_at, slot.restarts))
        self._supervisor.write(self._map, state.pid, state.stopping, state.beat, *per_slot)

    def read_supervisor(self) -> SupervisorState:
        """The supervisor's part as one consistent snapshot (never half of one write)."""
        pid, stopping, beat, *per_slot = self._supervisor.read(self._map)
        slots = tuple(
            SlotState(bool(running), slot_pid, started_at, restarts)  # type: ignore[arg-type]
            for running, slot_pid, started_at, restarts in zip(*[iter(per_slot)] * _SUPERVISED_FIELDS)
        )
        return SupervisorState(pid, bool(stopping), beat, slots)  # type: ignore[arg-type]

    def write_maintenance(self, state: MaintenanceState) -> None:
        """The maintenance process's part, written by that process alone."""
        self._maintenance.write(self._map, state.lost, state.pass_at)

    def read_maintenance(self) -> MaintenanceState:
        return MaintenanceState(*self._maintenance.read(self._map))  # type: ignore[arg-type]

    def write_last_words(self, area: int | None, text: str) -> None:
        """Leave `text` (one line, cut to fit) for the supervisor: `area` is a shard slot, None the maintenance process."""
        data = text.encode("utf-8", "replace")[: LAST_WORDS_BYTES - 2]
        at = self._words_at(area)
        self._map[at : at + 2] = len(data).to_bytes(2, "little")
        self._map[at + 2 : at + 2 + len(data)] = data

    def take_last_words(self, area: int | None) -> str:
        """What the process of `area` left, cleared so that a later exit of that area cannot repeat it."""
        at = self._words_at(area)
        size = int.from_bytes(self._map[at : at + 2], "little")
        text = self._map[at + 2 : at + 2 + size].decode("utf-8", "replace")
        self._map[at : at + 2] = b"\x00\x00"
        return text

    def _words_at(self, area: int | None) -> int:
        return self._last_words_at + LAST_WORDS_BYTES * (self.slots if area is None else area)
