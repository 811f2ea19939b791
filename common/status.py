"""Shared memory through which shards report heartbeat, health and counters to the supervisor.

The supervisor maps it before the first fork, so every shard inherits the same pages; a
restarted shard continues its slot's counters, which therefore only ever grow. The
supervisor's /metrics and /healthz read it; no shard needs an HTTP server of its own.
"""

from __future__ import annotations

import mmap
import struct
import time
from dataclasses import dataclass, field, replace

# Upper bounds of the batch-duration histogram buckets (the last bucket is +Inf).
BATCH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# heartbeat (CLOCK_MONOTONIC is system-wide on Linux, so parent and child compare it),
# pid, redis_ok, postgres_ok, processed, dead_lettered, claimed, batches, in_flight,
# batch-seconds sum, then one count per bucket (+Inf included), not cumulative.
_SLOT = struct.Struct(f"<d i B B 2x Q Q Q Q Q d {len(BATCH_BUCKETS_S) + 1}Q")


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
    batch_seconds_sum: float = 0.0
    batch_buckets: tuple[int, ...] = field(default=(0,) * (len(BATCH_BUCKETS_S) + 1))


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
        self._map = mmap.mmap(-1, _SLOT.size * slots)

    def read(self, slot: int) -> ShardStatus:
        values = _SLOT.unpack_from(self._map, slot * _SLOT.size)
        heartbeat, pid, redis_ok, pg_ok, processed, dead, claimed, batches, in_flight, seconds = values[:10]
        return ShardStatus(
            heartbeat, pid, bool(redis_ok), bool(pg_ok), processed, dead, claimed, batches, in_flight, seconds,
            tuple(values[10:]),
        )

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
            status.batch_seconds_sum,
            *status.batch_buckets,
        )

    def reset_liveness(self, slot: int, pid: int) -> None:
        """Mark a slot as just started by `pid`, keeping its counters."""
        old = self.read(slot)
        self.write(slot, replace(old, heartbeat=time.monotonic(), pid=pid, redis_ok=False, postgres_ok=False, in_flight=0))
