"""The shard's pipeline: entries in (read or claimed) → decode → write → settle.

Entries enter through `submit`, from the stream reader, the claimer, or `processor claim`,
and wait for their turn in the intake (shard/intake.py).
Each batch is written in one transaction. Two are written at once, each on its own
connection, so that Postgres works on one while this process prepares the other (once the
waiting batch holds a quarter of BATCH_SIZE: a trickle is written one batch at a time); the
later asks for its device locks only once the earlier holds them (`LockTurn`), so a
device's fixes still apply in the order they were read. A batch's ACK (with its dead
letters) goes out once it has committed, in batch order. Once a batch has committed, its
settling is a task of its own, shielded from cancellation, so a shutdown never tears the
commit-then-ACK step in half: what is not ACKed stays pending and is delivered again,
which the idempotent writes make harmless.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timezone

from common.config import Settings
from common.contract import retention_horizon
from common.keys import failures_key
from common.retry import retry
from common.stream_pages import PAGE_BUDGET_BYTES, entries_bytes
from shard.batch import Batch, decode_batch
from shard.devices import LockTurn
from shard.failures import FailureCounts, new_attempt
from shard.intake import Intake
from shard.reporting import Report
from shard.stream import ConsumerStream, Entry
from shard.writer import PositionWriter


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        stream: ConsumerStream,
        writer: PositionWriter,
        report: Report,
        crash_point: Callable[[], None] | None = None,
    ) -> None:
        self.max_failures = settings.max_failures
        self.max_future_s = settings.max_future_s
        self.retention_days = settings.positions_retention_days
        self.stream = stream
        self.failures = FailureCounts(stream.redis, failures_key(settings.stream_key, settings.consumer_group))
        self.writer = writer
        self.report = report
        self.crash_point = crash_point  # test-only fault injection; None in production
        self.intake = Intake(settings.batch_size)
        self.eager = max(1, settings.batch_size // 4)  # a waiting batch this large is written beside another
        self.settle_task: asyncio.Task[None] | None = None
        self.last_write: asyncio.Task[None] | None = None  # the latest batch's; every earlier one has ended
        self.last_granted: asyncio.Event | None = None  # the latest batch's locks are held (or given up)
        self.accepting = True

    @property
    def in_flight(self) -> set[bytes]:
        return self.report.in_flight

    async def submit(self, entries: list[Entry], claimed: bool = False, size_bytes: int | None = None) -> int:
        """Queue entries for writing (they join the waiting batch where it has room, else wait
        for it to be taken); returns how many. `size_bytes`: their fields' bytes, if known.

        After `end_input` nothing more is taken: such entries stay pending on this consumer.
        """
        if claimed:
            entries = [entry for entry in entries if entry[0] not in self.in_flight]  # ours already
        if not entries or not self.accepting:
            return 0
        self.report.taken([entry_id for entry_id, _ in entries], claimed)
        batch = decode_batch(entries, self.max_failures, self.max_future_s)
        # The reader passes the size its ReadSize measured; a filtered page's is measured here.
        batch.size_bytes = entries_bytes(entries) if size_bytes is None else size_bytes
        await self.intake.put(batch)
        return len(entries)

    async def end_input(self) -> None:
        """No more entries: `run` returns once what is queued is settled."""
        self.accepting = False
        await self.intake.end()

    async def run(self) -> None:
        """Write every submitted batch until `end_input`; then wait for the last ACKs."""
        try:
            while True:
                await self.next_turn()
                await self.intake.top_up()
                if self.intake.queue.empty():
                    self.intake.pull(False)  # nothing came: the reader waits for the next entry itself
                if (batch := await self.intake.take()) is None:
                    break
                self.intake.pull(self.trickle(batch))
                await self.process(batch)
            if self.last_write is not None:
                await self.last_write
        except BaseException:
            if self.last_write is not None:
                self.last_write.cancel()  # not committed: its entries stay pending
            raise
        await self.flush()

    def trickle(self, batch: Batch) -> bool:
        """A batch this small is written alone: the next is read once it has committed."""
        return len(batch.ids) < self.eager and batch.size_bytes < PAGE_BUDGET_BYTES // 4

    async def next_turn(self) -> None:
        """Until the waiting batch may be written: at once if it holds a quarter of BATCH_SIZE
        (a backlog keeps two transactions going), else once the write under way has ended."""
        while (writing := self.last_write) is not None and not writing.done():
            waiting = self.intake.waiting
            if (waiting is not None and len(waiting.ids) >= self.eager) or self.intake.end_is_next():
                return
            changed = self.intake.next_change()
            try:
                await asyncio.wait({writing, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()

    async def process(self, batch: Batch) -> None:
        """Start writing the batch (its settling follows on its own once it has committed);
        return once the batch before it has committed and settled, so two are written at once."""
        if self.crash_point is not None:
            self.crash_point()
        batch.started = time.monotonic()  # processor_batch_seconds: from here to its ACK
        turn = LockTurn(self.last_granted)
        self.last_granted = turn.granted
        earlier, writing = self.last_write, None
        if batch.fixes:
            writing = self.last_write = asyncio.create_task(self.write(batch, turn))
            writing.add_done_callback(self._wake_if_failed)
        else:
            turn.granted.set()
        previous, self.settle_task = self.settle_task, asyncio.create_task(self.settle(batch, writing, self.settle_task))
        self.settle_task.add_done_callback(self._wake_if_failed)
        if previous is not None:
            await asyncio.shield(previous)  # every earlier write has ended, and its batch is settled
        if earlier is not None:
            await earlier  # ended: raises what it raised, however many batches without fixes followed

    async def write(self, batch: Batch, turn: LockTurn | None = None) -> None:
        """Store the batch's fixes. Rows Postgres refuses are counted and retried at once (a
        rejection is deterministic) until MAX_FAILURES, then dead-lettered; the counts live
        in Redis, so they survive restarts."""
        try:
            await self._write(batch, turn)
        finally:
            if turn is not None:
                turn.granted.set()  # given up or done: the next batch must not wait for ever

    async def _write(self, batch: Batch, turn: LockTurn | None) -> None:
        rejected = await self.write_entries(batch, list(batch.fixes), turn)
        while rejected:
            counts = await retry("redis", self.report.reach, self.failures.count, list(rejected), new_attempt())
            again = []
            for (entry_id, error), count in zip(rejected.items(), counts):
                if count >= self.max_failures:
                    batch.reject(entry_id, error, count)
                else:
                    again.append(entry_id)
            if not again:
                return
            rejected = await self.write_entries(batch, again)
            batch.recovered.extend(entry_id for entry_id in again if entry_id not in rejected)

    async def write_entries(self, batch: Batch, entry_ids: list[bytes], turn: LockTurn | None = None) -> dict[bytes, str]:
        """Write these entries' fixes; returns {entry id: error} for rows rejected on their own.

        Each attempt first sets aside the fixes older than the retention horizon by its own
        clock, so a batch that waited out an outage never writes into a dropped partition.
        """

        async def attempt() -> dict[bytes, str]:
            horizon = retention_horizon(datetime.now(timezone.utc), self.retention_days)
            if horizon is not None:
                batch.expire(horizon)
            ids = [entry_id for entry_id in entry_ids if entry_id in batch.fixes]
            if not ids:
                return {}
            with self.report.writing():
                rejected = await self.writer.write_isolating([batch.fixes[entry_id] for entry_id in ids], turn)
            return {ids[position]: error for position, error in rejected.items()}

        return await retry("postgres", self.report.reach, attempt)

    async def settle(self, batch: Batch, writing: asyncio.Task[None] | None, previous: asyncio.Task[None] | None) -> None:
        """Once the batch has committed (if it had fixes), ACK it and write its dead letters."""
        if writing is not None:
            await asyncio.wait({writing})
            if writing.cancelled() or writing.exception() is not None:
                return  # not committed: its entries stay pending (`run` raises the error)
        if previous is not None:
            await previous  # ACKs (and counters) in batch order
        self.report.committed(batch)
        written = await retry(
            "redis", self.report.reach, self.stream.settle, batch.acked, batch.dead, batch.recovered, self.report.lettered
        )
        if batch.gone:
            removed = await retry("redis", self.report.reach, self.stream.ack_gone, batch.gone)
            self.report.entries_lost(batch.gone, "deleted while pending", counted=removed)
        self.report.settled(batch, written)

    def _wake_if_failed(self, task: asyncio.Task[None]) -> None:
        """A failed write or settle (a refusal: exit 78, say) ends `run` even when no batch
        follows, which raises its error; otherwise it would surface only with the next entry."""
        if not task.cancelled() and task.exception() is not None:
            self.intake.end_now()

    async def flush(self) -> None:
        """Wait for the ACKs of the batches written so far."""
        if self.settle_task is not None:
            await asyncio.shield(self.settle_task)
