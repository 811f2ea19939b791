"""Shared memory through which shards report heartbeat, health and counters to the supervisor.

The supervisor maps it before the first fork, so every shard inherits the same pages; a
restarted shard continues its slot's counters, which therefore only ever grow.
"""

from __future__ import annotations

import mmap
import struct
import time
from dataclasses import dataclass

# heartbeat (CLOCK_MONOTONIC is system-wide on Linux, so parent and child compare it),
# pid, redis_ok, postgres_ok, processed, dead_lettered, claimed, batches, in_flight.
_SLOT = struct.Struct("<d i B B 2x Q Q Q Q Q")


@dataclass(frozen=True)
class ShardStatus:
    heartbeat: float
    pid: int
    redis_ok: bool
    postgres_ok: bool
    processed: int
    dead_lettered: int
    claimed: int
    batches: int
    in_flight: int = 0  # entries read and not yet settled


class StatusBoard:
    """One fixed-size slot per shard index in an anonymous shared mapping."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, _SLOT.size * slots)

    def read(self, slot: int) -> ShardStatus:
        heartbeat, pid, redis_ok, pg_ok, *counts = _SLOT.unpack_from(self._map, slot * _SLOT.size)
        return ShardStatus(heartbeat, pid, bool(redis_ok), bool(pg_ok), *counts)

    def write(self, slot: int, status: ShardStatus) -> None:
        _SLOT.pack_into(
            self._map,
            slot * _SLOT.size,
            status.heartbeat,
            status.pid,
            status.redis_ok,
            status.postgres_ok,
            status.processed,
            status.dead_lettered,
            status.claimed,
            status.batches,
            status.in_flight,
        )

    def reset_liveness(self, slot: int, pid: int) -> None:
        """Mark a slot as just started by `pid`, keeping its counters."""
        old = self.read(slot)
        self.write(
            slot,
            ShardStatus(
                time.monotonic(), pid, False, False, old.processed, old.dead_lettered, old.claimed, old.batches, 0
            ),
        )
