"""Where a shard's entries come from: its own reads of the group, and claims from other consumers."""

from __future__ import annotations

import asyncio
import logging
import time

from common.config import Settings
from common.faults import Outcome, classify
from common.retry import retry
from common.stream_pages import ReadSize
from common.timing import LIVENESS_CHECK_S
from shard.claim import Claimer
from shard.pipeline import Pipeline
from shard.stream import ConsumerStream, Entry

log = logging.getLogger("processor.shard")

OWN_PENDING = "0"
NEW_ENTRIES = ">"


class StreamReader:
    """Reads for one consumer: its own pending entries first (left by a previous life), then new ones."""

    def __init__(self, settings: Settings, stream: ConsumerStream, pipeline: Pipeline) -> None:
        self.size = ReadSize(settings.batch_size)
        self.stream = stream
        self.pipeline = pipeline
        self.reach = pipeline.report.reach
        self.own_pending_done = asyncio.Event()
        self.stopping = False
        self.read_task: asyncio.Task[list[Entry]] | None = None
        self.read_cut = False  # the stop cancelled a read under way

    def stop(self) -> None:
        """Stop reading; a read under way is cut short (what it would return is not in flight yet,
        and is looked for again before the reader ends: `run`)."""
        self.stopping = True
        self.pipeline.intake.close_reader()
        if self.read_task is not None:
            self.read_cut = True
            self.read_task.cancel()

    async def run(self) -> None:
        after = OWN_PENDING
        intake = self.pipeline.intake
        while not self.stopping:
            room, may_block = await intake.room()
            if self.stopping:
                break
            try:
                read = await self._read(after, min(self.size.count, room), may_block)
            except asyncio.CancelledError:
                intake.read_ended()
                if self.stopping:
                    break
                raise
            try:
                after = await self._submit(after, *read)
            finally:
                intake.read_ended()
        if self.read_cut:
            # The read the stop cut short may have been answered already: its entries are then
            # pending on this consumer, and nobody would look at them before CLAIM_THRESHOLD_MS
            # (or this consumer's next life). So our own pending entries are read once more, as
            # at start-up, and those not in flight are written with the rest.
            after = OWN_PENDING
            while after != NEW_ENTRIES:
                after = await self._submit(after, *await self._read(after, self.size.count, may_block=False))
        await self.pipeline.end_input()

    async def _read(self, after: str | bytes, count: int, may_block: bool) -> tuple[list[Entry], int, bool]:
        """One read, with its bytes, and whether an outage came between (its lost reply may have
        delivered entries)."""
        outages = self.reach.outages["redis"]
        self.read_task = asyncio.create_task(retry("redis", self.reach, self.stream.read, after, count, may_block))
        try:
            entries = await self.read_task
        finally:
            self.read_task = None
        return entries, self.size.saw(entries), self.reach.outages["redis"] != outages

    async def _submit(self, after: str | bytes, entries: list[Entry], size_bytes: int, outage: bool) -> str | bytes:
        """Submit what a read returned; returns where the next read starts."""
        if outage and after == NEW_ENTRIES:
            # A read whose reply was lost still delivered its entries to us: they sit in our
            # pending list, and nobody else would look at them before CLAIM_THRESHOLD_MS.
            log.info("re-reading own pending entries after a Redis outage", extra={"consumer": self.stream.consumer})
            await self.pipeline.submit(entries, size_bytes=size_bytes)
            return OWN_PENDING
        if after != NEW_ENTRIES:
            if not entries:
                if not self.own_pending_done.is_set():
                    log.info("own pending entries finished", extra={"consumer": self.stream.consumer})
                self.own_pending_done.set()
                return NEW_ENTRIES
            after = entries[-1][0]  # past the whole page, including entries already in flight
            entries = [entry for entry in entries if entry[0] not in self.pipeline.in_flight]
            await self.pipeline.submit(entries)  # fewer than were read: measured again
            return after
        await self.pipeline.submit(entries, size_bytes=size_bytes)
        return after


async def claim_until_stopped(settings: Settings, claimer: Claimer, pipeline: Pipeline, reader: StreamReader) -> None:
    """Dead consumers' entries every LIVENESS_CHECK_S; idle ones every CLAIM_INTERVAL_MS.

    One claimer per instance (shard 0's). A restarted shard first finishes its own entries.
    """
    await reader.own_pending_done.wait()
    next_threshold_pass = 0.0
    while not reader.stopping:
        try:
            async for entries in claimer.from_dead():
                await submit_claimed(pipeline, entries)
            if time.monotonic() >= next_threshold_pass:
                next_threshold_pass = time.monotonic() + settings.claim_interval_ms / 1000
                async for entries in claimer.idle_entries():
                    await submit_claimed(pipeline, entries)
                await claimer.forget_idle_consumers()
        except Exception as exc:
            if classify(exc) is not Outcome.OUTAGE:
                raise
            log.debug("claim pass interrupted", extra={"error": str(exc)})  # the reader reports outages
        await asyncio.sleep(LIVENESS_CHECK_S)


async def submit_claimed(pipeline: Pipeline, entries: list[Entry]) -> None:
    if submitted := await pipeline.submit(entries, claimed=True):
        log.info("entries claimed", extra={"consumer": pipeline.stream.consumer, "entries": submitted})
