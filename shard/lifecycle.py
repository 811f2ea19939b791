"""The shard process: its life from fork to exit, and the one place its parts are wired.

`run()` owns the uvloop event loop; `main()` starts the background duties and the work
(stream reader and claimer feeding the pipeline), waits for a stop signal, drains within
DRAIN_TIMEOUT_S, and always closes. The pipeline itself is in pipeline.py.
"""

from __future__ import annotations

import asyncio
import gc
import faulthandler
import logging
import os
import signal
import time
from collections.abc import Coroutine
from typing import Any, NoReturn

import uvloop
from setproctitle import setproctitle

from common import logs, refusals
from common.config import Settings
from common.errors import ExitCode
from common.faults import Outcome, classify, one_line
from common.keys import consumer_name
from common.panic import Panic, crash_point
from common.retry import retry
from common.signals import HURRY_SIGNAL, ignore_group_signals
from common.status import StatusBoard
from common.tasks import cancel_and_wait, end_other_tasks
from common.timing import SHARD_CLOSE_BUDGET_S
from shard.claim import Claimer
from shard.duties import Duties
from shard.geofences import GeofenceSource
from shard.pipeline import Pipeline
from shard.profiling import profiled
from shard.reporting import Report
from shard.sources import StreamReader, claim_until_stopped
from shard.stream import ConsumerStream
from shard.writer import PositionWriter

log = logging.getLogger("processor.shard")

SETTLE_GRACE_S = 2.0  # how long close() waits for an ACK already on its way
CRASH_PLACES = ("shard-uncaught", "shard-task", "shard-thread", "shard-hang")


class Shard:
    """One consumer of the group. Constructed in the child after fork; `run()` is its whole life."""

    def __init__(self, settings: Settings, index: int, board: StatusBoard, consumer: str | None = None) -> None:
        self.settings = settings
        self.index = index
        self.board = board
        self.consumer = consumer or consumer_name(settings.instance_id, index)
        self.panic = Panic(settings, f"shard-{index}", self.panic_state)
        self.report = Report(board, index, self.consumer)
        self.stream = ConsumerStream(settings, self.consumer)
        self.claimer = Claimer(settings, self.stream, self.report.entries_lost)
        self.geofences = GeofenceSource(settings.database_url, f"processor {self.consumer} geofences")
        self.writer = PositionWriter(settings, f"processor {self.consumer}", self.geofences)
        self.report.derived = self.writer.devices.counts  # the same dict: the writer counts, the report tells
        self.pipeline = Pipeline(settings, self.stream, self.writer, self.report, crash_point(CRASH_PLACES, settings.panic_dir))
        self.reader = StreamReader(settings, self.stream, self.pipeline)
        self.duties = Duties(
            settings.stream_key, self.report, self.stream, self.claimer, self.geofences, self.writer, self.handle_orphaned
        )
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()

    def run(self) -> int:
        """Post-fork process set-up, then the event loop until the shard stops; returns the exit status."""
        for signum in (signal.SIGTERM, signal.SIGCHLD, HURRY_SIGNAL):
            signal.signal(signum, signal.SIG_DFL)
        ignore_group_signals()  # Ctrl-C, Ctrl-\, a hang-up: the supervisor turns them into SIGTERM
        signal.set_wakeup_fd(-1)
        faulthandler.enable()  # SIGABRT from the supervisor prints where a hung loop is stuck
        setproctitle(f"processor: shard {self.index} [{self.settings.instance_id}]")
        logs.configure(self.settings.log_level, f"shard-{self.index}")
        self.panic.install()
        try:
            with profiled(self.index):  # benchmark-only (shard/profiling.py); nothing in production
                uvloop.run(self.main())
        except Exception as exc:
            self.fail(exc, "shard main task")
        return ExitCode.OK

    def fail(self, exc: BaseException, where: str) -> NoReturn:
        """The end of a shard that cannot go on: exit 78 when refused (restarting will not help), else panic."""
        if classify(exc) is Outcome.REFUSED:
            said = refusals.describe(exc, redis_url=self.settings.redis_url, database_url=self.settings.database_url)
            error = said or one_line(exc)
            log.critical("shard cannot work with this configuration", extra={"error": error})
            self.board.write_last_words(self.index, error)
            logging.shutdown()
            os._exit(ExitCode.CONFIG)
        self.panic.crash(type(exc), exc, exc.__traceback__, where=where)

    def panic_state(self) -> dict[str, object]:
        """What a panic dump shows of this shard."""
        return {
            **self.report.totals(),
            "in_flight": sorted(entry_id.decode() for entry_id in self.report.in_flight),
            "device_cache": self.writer.cache.snapshot(),
            "geofences": len(self.geofences.index),
        }

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self.panic.loop_exception_handler)
        loop.add_signal_handler(signal.SIGTERM, self.handle_sigterm)
        loop.add_signal_handler(HURRY_SIGNAL, self.handle_hurry)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, HURRY_SIGNAL})  # blocked by the supervisor across fork
        log.info("shard starting", extra={"consumer": self.consumer, "pid": os.getpid()})
        duties = [self.watched(loop_) for loop_ in self.duties.loops()]
        work = asyncio.create_task(self.work())
        stop = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                await self.drain(work)
            if not work.cancelled():
                work.result()  # a failure inside the work surfaces here
        finally:
            await cancel_and_wait([stop, *duties])
            await self.close()
            await end_other_tasks()

    async def join(self) -> None:
        """Before the first entry: the group exists, our liveness key says we are not dead, and
        the geofences are loaded. Waits through outages."""
        reach = self.report.reach
        await retry("redis", reach, self.stream.ensure_group)
        await retry("redis", reach, self.claimer.keep_alive)
        await retry("postgres", reach, self.geofences.refresh)

    async def work(self) -> None:
        """Join, then feed the pipeline from our reads (and, on shard 0, claims) until stopped."""
        await self.join()
        _tune_garbage_collection()
        reader = self.watched(self.reader.run())
        claims = self.watched(claim_until_stopped(self.settings, self.claimer, self.pipeline, self.reader)) if self.index == 0 else None
        try:
            await self.pipeline.run()
        finally:
            await cancel_and_wait([reader, claims])
        reader.result()

    def watched(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task whose failure ends the shard (exit 78 or a panic), never a silent death."""
        task = asyncio.ensure_future(coroutine)
        task.add_done_callback(self._check_task)
        return task

    def _check_task(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        self.fail(exc, f"background task {task.get_coro().__qualname__}")

    def handle_sigterm(self) -> None:
        """Stop reading and drain (a SIGTERM more changes nothing: common/signals.py says why)."""
        self.stopping.set()
        self.reader.stop()

    def handle_hurry(self) -> None:
        """The supervisor's second stop: cut the drain short."""
        self.handle_sigterm()
        self.hurry.set()

    def handle_orphaned(self) -> None:
        """The supervisor is gone (its panic or SIGKILL): stop as if told to."""
        if not self.stopping.is_set():
            log.error("supervisor is gone; stopping", extra={"consumer": self.consumer})
            self.handle_sigterm()

    async def drain(self, work: asyncio.Task[None]) -> None:
        """Let the in-flight batches commit and ACK within DRAIN_TIMEOUT_S (less after a second signal)."""
        started = time.monotonic()
        in_flight = len(self.report.in_flight)
        processed_before = self.report.processed
        hurry = asyncio.create_task(self.hurry.wait())
        await asyncio.wait({work, hurry}, timeout=self.settings.drain_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        await cancel_and_wait([hurry, work])
        log.info(
            "shard drained",
            extra={
                "consumer": self.consumer,
                "in_flight": in_flight,
                "committed_and_acked": self.report.processed - processed_before,
                "left_pending": len(self.report.in_flight),
                "seconds": round(time.monotonic() - started, 3),
            },
        )

    async def close(self) -> None:
        """Bounded by SHARD_CLOSE_BUDGET_S altogether, so the supervisor's stop deadline holds."""
        deadline = time.monotonic() + SHARD_CLOSE_BUDGET_S
        settling = self.pipeline.settle_task
        if settling is not None and not settling.done():
            await asyncio.wait({settling}, timeout=SETTLE_GRACE_S)
        # What we leave pending may be claimed at once; else the key expires within its TTL.
        for closing in (self.claimer.retire, self.writer.close, self.geofences.close, self.stream.close):
            try:
                await asyncio.wait_for(closing(), max(0.1, deadline - time.monotonic()))
            except Exception as exc:
                # A connection that does not close politely is dropped with the process.
                if classify(exc) is Outcome.BUG and not isinstance(exc, OSError):
                    raise
                log.debug("connection dropped without a polite close", extra={"error": one_line(exc)})
        self.report.publish()  # the supervisor's drain report reads in_flight (left pending) from here
        log.info("shard stopped", extra=self.report.totals())


# A batch makes tens of thousands of short-lived container objects (entries, fixes, rows),
# which reference counting frees; with the default young-generation threshold of 700 the
# cyclic collector ran after every few hundred of them and cost a shard ~10 % of its CPU at
# full load, re-scanning long-lived caches whenever a collection reached the old generation.
# Cycles (asyncio's exceptions and tracebacks) now wait for 20,000 allocations: a few
# megabytes at most.
GC_THRESHOLDS = (20_000, 20, 20)


def _tune_garbage_collection() -> None:
    """After start-up: what exists now lives as long as the shard (moved out of the collector's
    sight), and young collections run less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
