"""Where decoded batches wait for their turn to be written: one at a time, growing while it waits.

A shard writes two batches at once when a backlog fills them (shard/pipeline.py). Under a
steady trickle, writing at once whatever one read brought would keep two transactions going
for a handful of entries each, and spend most of the shard's and Postgres' CPU on what every
transaction costs whatever its size (round trips, statements, the commit's flush). So the
batch that waits is topped up just before it is taken: the reader stops reading while a
batch waits, until the pipeline asks it for one more read, which does not block and brings
what arrived meanwhile (up to BATCH_SIZE, and up to what one read may hold: a waiting batch
grows by claimed pages too, and must not hold more of the stream than one read would,
common/stream_pages.py). While a small batch is written alone, the reader does not read at
all until asked (`pull`): one read per batch. Entries not yet read stay in the stream, where
any idle consumer may read them.
"""

from __future__ import annotations

import asyncio
import contextlib

from common.stream_pages import PAGE_BUDGET_BYTES
from shard.batch import Batch

TOP_UP_WAIT_S = 0.25  # at most, for the reader's top-up read (it retries through a Redis outage)


class Intake:
    """The read-ahead of one batch, and what the reader and the pipeline tell each other about it."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=1)
        self.waiting: Batch | None = None  # the batch in the queue, until `take` returns it
        # Told of every change: the waiting batch grew or was taken, a top-up is asked for, the
        # reader closes. One future per wait (not an Event that each waiter clears: one waiter's
        # clear could erase a change another had not yet seen).
        self._watchers: list[asyncio.Future[None]] = []
        self.top_up_asked = False
        self.reader_parked = False
        self.reader_closing = False
        self.pulling = False  # the pipeline asks for the next read (a trickle), rather than reading ahead
        self.topped_up = asyncio.Event()

    def _changed(self) -> None:
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            if not watcher.done():
                watcher.set_result(None)

    async def put(self, batch: Batch) -> None:
        """Queue a batch; it joins the waiting one instead where that has room for it."""
        waiting = self.waiting
        if (
            waiting is not None
            and len(waiting.ids) + len(batch.ids) <= self.batch_size
            and waiting.size_bytes + batch.size_bytes <= PAGE_BUDGET_BYTES
        ):
            waiting.absorb(batch)
        else:
            await self.queue.put(batch)
            self.waiting = batch
        self._changed()

    async def end(self) -> None:
        """No more batches: `take` returns None once the waiting one is taken."""
        await self.queue.put(None)

    def end_now(self) -> None:
        """End `take` soon, if there is room to say so (a failure the pipeline must see)."""
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)

    def end_is_next(self) -> bool:
        return self.waiting is None and not self.queue.empty()

    async def take(self) -> Batch | None:
        batch = await self.queue.get()
        if batch is not None and batch is self.waiting:
            self.waiting = None
        self._changed()
        return batch

    def next_change(self) -> asyncio.Future[None]:
        """Resolved by the next change after this call (cancel it when no longer waited for)."""
        watcher: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._watchers.append(watcher)
        return watcher

    async def room(self) -> tuple[int, bool]:
        """For the reader: how many entries its next read may bring, and whether that read may
        block waiting for them. While a batch waits, it waits too, until it is asked for a top-up."""
        while not self.reader_closing:
            waiting = self.waiting
            held = len(waiting.ids) if waiting is not None else 0
            if self.top_up_asked and held < self.batch_size:
                return self.batch_size - held, False
            if waiting is None and not self.pulling:
                return self.batch_size, True
            self.reader_parked = True
            change = self.next_change()
            try:
                await change
            finally:
                change.cancel()
                self.reader_parked = False
        return 0, False

    def read_ended(self) -> None:
        """For the reader: its read's entries (if any) are in; a top-up asked for is done."""
        if self.top_up_asked:
            self.top_up_asked = False
            self.topped_up.set()

    def close_reader(self) -> None:
        """The reader is stopping: it waits for nothing more."""
        self.reader_closing = True
        self._changed()

    def pull(self, on: bool) -> None:
        """Whether the reader waits to be asked (`top_up`) even for the first entries of a batch:
        while a trickle's batch is written, rather than read one entry at once and wait."""
        if self.pulling != on:
            self.pulling = on
            self._changed()

    async def top_up(self) -> None:
        """Before the waiting batch (if any) is taken: one more read, if the reader is idle and
        there is room."""
        waiting = self.waiting
        if (waiting is not None and len(waiting.ids) >= self.batch_size) or not self.reader_parked:
            return
        self.topped_up.clear()
        self.top_up_asked = True
        self._changed()
        try:
            await asyncio.wait_for(self.topped_up.wait(), TOP_UP_WAIT_S)
        except TimeoutError:
            pass  # taken as it is; the reader's entries join the next batch
        finally:
            self.top_up_asked = False
