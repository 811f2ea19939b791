"""What a shard tells the world: counters, health and heartbeat in its status-board slot, and logs."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from datetime import datetime

from common.faults import missing_partition
from common.retry import Reachability
from common.status import BATCH_BUCKETS_S, ShardStatus, StatusBoard, bucket_of
from shard.batch import Batch

log = logging.getLogger("processor.shard")

LOST_IDS_PER_LINE = 100  # every lost id is logged, this many per line
# A batch's transaction takes milliseconds, a wait for another client's device locks at
# most the 10 s after which Postgres ends a client that went quiet inside a batch. One that
# has run this long is waiting on a server that does not answer: stopped, frozen or cut off
# without a reset, which neither the socket nor the server's own timeouts ever report.
POSTGRES_STALLED_S = 20.0


class Report:
    """One shard's counters; its slot continues the counters of the slot's earlier lives."""

    def __init__(self, board: StatusBoard, index: int, consumer: str) -> None:
        self.board = board
        self.index = index
        self.consumer = consumer
        self.reach = Reachability(consumer, on_change=self.publish, on_failure=self._failed)
        self.in_flight: set[bytes] = set()  # read, not yet settled
        self.processed = 0
        self.dead_lettered = 0
        self.claimed = 0
        self.lost = 0
        self.expired = 0
        self.partitions_missed = 0
        self.batches = 0
        self.batch_seconds_sum = 0.0
        self.batch_buckets = [0] * (len(BATCH_BUCKETS_S) + 1)
        self.derived: dict[str, int] = {}  # the writer's derived-state counts (shard/devices/states.py)
        self.writes_since: dict[object, float] = {}  # batch writes under way: when each began
        self.base = board.read(index)
        self._summary_at = time.monotonic()
        self._summary_processed = 0

    def taken(self, entry_ids: list[bytes], claimed: bool) -> None:
        """Entries read or claimed: in flight until settled."""
        self.in_flight.update(entry_ids)
        if claimed:
            self.claimed += len(entry_ids)
        self.publish()

    def committed(self, batch: Batch) -> None:
        """A batch committed and about to be ACKed: its fixes (and expired ones) are counted now.

        Counted after the ACK, they would be lost with a shard killed in between (the event
        loop may run other work for milliseconds before the ACK's reply is handled), and the
        counter would fall behind what was stored; counted here, such entries are delivered
        again and count again, as any redelivered duplicate does.
        """
        self.processed += len(batch.fixes)
        self.expired += len(batch.expired)
        self.publish()

    def lettered(self, count: int) -> None:
        """Dead letters just written (and their entries acknowledged): counted at once, since
        those entries are never delivered again (`ConsumerStream.settle`)."""
        self.dead_lettered += count
        self.publish()

    def settled(self, batch: Batch, letters_written: set[bytes]) -> None:
        """A batch committed, ACKed and dead-lettered: one log line, counters, the slot.

        `letters_written`: the entries whose letters this shard wrote; another consumer wrote
        (or made needless) the letters of the rest of `batch.dead`."""
        elapsed = time.monotonic() - batch.started
        self.in_flight.difference_update(batch.ids)
        self.batches += 1
        self.batch_seconds_sum += elapsed
        self.batch_buckets[bucket_of(elapsed)] += 1
        self.publish()
        if batch.expired:
            _log_expired(batch)
        for letter in batch.dead:
            if letter.entry_id in letters_written:
                log.warning(
                    "entry dead-lettered",
                    extra={"source_id": letter.entry_id.decode(), "error_kind": letter.error_kind, "error": letter.error},
                )
            else:
                log.info("poison entry's letter not written here: another consumer wrote it, or an earlier reading did",
                         extra={"source_id": letter.entry_id.decode(), "error_kind": letter.error_kind})
        log.debug(
            "batch settled",
            extra={
                "entries": len(batch.ids),
                "stored": len(batch.fixes),
                "dead_lettered": len(letters_written),
                "seconds": round(elapsed, 4),
            },
        )

    def entries_lost(self, ids: list[bytes], how: str, counted: int | None = None) -> None:
        """Pending entries deleted or trimmed from the stream before we processed them: counted, every id logged.

        `counted`: how many of them this shard counts (fewer than `ids` when another consumer
        had already acknowledged or claimed some and counted those); all of `ids` by default.
        """
        counted = len(ids) if counted is None else counted
        if not ids:
            return
        self.lost += counted
        self.publish()
        for start in range(0, len(ids), LOST_IDS_PER_LINE):
            chunk = [i.decode() for i in ids[start : start + LOST_IDS_PER_LINE]]
            log.warning(
                "entries lost: deleted from the stream before they were processed",
                extra={"how": how, "consumer": self.consumer, "ids": chunk, "counted": counted if start == 0 else 0},
            )

    def _failed(self, server: str, exc: BaseException) -> None:
        """A failed call: a write that found a partition of `positions` missing is published, so
        that the maintenance process creates it now rather than at its next pass (up to ten
        minutes during which every batch with a fix of that day would wait)."""
        if server == "postgres" and missing_partition(exc):
            self.partitions_missed += 1
            self.publish()

    def publish(self) -> None:
        """Heartbeat, health and counters into our slot."""
        base = self.base
        self.board.write(
            self.index,
            ShardStatus(
                heartbeat=time.monotonic(),
                pid=os.getpid(),
                redis_ok=self.reach.ok["redis"],
                postgres_ok=self.reach.ok["postgres"] and not self.postgres_stalled(),
                processed=base.processed + self.processed,
                dead_lettered=base.dead_lettered + self.dead_lettered,
                claimed=base.claimed + self.claimed,
                batches=base.batches + self.batches,
                in_flight=len(self.in_flight),
                lost=base.lost + self.lost,
                expired=base.expired + self.expired,
                partitions_missed=base.partitions_missed + self.partitions_missed,
                batch_seconds_sum=base.batch_seconds_sum + self.batch_seconds_sum,
                batch_buckets=tuple(a + b for a, b in zip(base.batch_buckets, self.batch_buckets)),
            ),
        )

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Around one batch write: one that never returns makes the shard unhealthy (`publish`)."""
        token = object()
        self.writes_since[token] = time.monotonic()
        try:
            yield
        finally:
            del self.writes_since[token]

    def postgres_stalled(self) -> bool:
        return any(time.monotonic() - since > POSTGRES_STALLED_S for since in self.writes_since.values())

    def log_summary(self) -> None:
        """Every SUMMARY_INTERVAL_S: what this life of the shard has done, and its recent rate."""
        now = time.monotonic()
        rate = (self.processed - self._summary_processed) / max(now - self._summary_at, 1e-9)
        log.info(
            "shard summary",
            extra={
                "consumer": self.consumer,
                "processed": self.processed,
                "dead_lettered": self.dead_lettered,
                "batches": self.batches,
                "rate_per_s": round(rate, 1),
                **self.derived,
            },
        )
        self._summary_at, self._summary_processed = now, self.processed

    def totals(self) -> dict[str, object]:
        return {"consumer": self.consumer, "processed": self.processed, "dead_lettered": self.dead_lettered, **self.derived}


def _log_expired(batch: Batch) -> None:
    """One line per device: its fixes older than the retention horizon, which were not stored."""
    devices: dict[str, list[datetime]] = {}
    for fix in batch.expired.values():
        devices.setdefault(fix.device_id, []).append(fix.ts)
    horizon = batch.horizon.isoformat() if batch.horizon else None
    for device_id, times in sorted(devices.items()):
        log.warning(
            "fixes older than the retention horizon were not stored",
            extra={"device_id": device_id, "fixes": len(times), "oldest": min(times).isoformat(),
                   "newest": max(times).isoformat(), "horizon": horizon},
        )
