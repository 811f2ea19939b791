"""The shard process: read → decode → write → ACK, on one uvloop event loop."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import uvloop
from setproctitle import setproctitle

from common import logs
from common.backoff import Backoff
from common.config import Settings
from common.errors import ConnectionRefusedForGood, ExitCode
from common.keys import consumer_name, rehydrate_channel
from common.panic import Panic, maybe_crash
from common.status import BATCH_BUCKETS_S, ShardStatus, StatusBoard, bucket_of
from shard.batch import Batch, decode_batch
from shard.claim import LIVENESS_CHECK_S, Claimer
from shard.faults import POSTGRES_TRANSIENT, is_configuration_error, is_transient
from shard.geofences import GeofenceSource
from shard.stream import ConsumerStream, Entry
from shard.writer import PositionWriter

log = logging.getLogger("processor.shard")
T = TypeVar("T")

HEARTBEAT_INTERVAL_S = 1.0
SUMMARY_INTERVAL_S = 15.0
SETTLE_GRACE_S = 2.0
CLOSE_BUDGET_S = 3.0  # close() as a whole; the supervisor allows DRAIN_TIMEOUT_S + STOP_MARGIN_S
GEOFENCE_POLL_S = 2.0  # how long close() waits for an ACK already on its way
OWN_PENDING = "0"
NEW_ENTRIES = ">"  # str: the stream module compares against it


class Shard:
    """One consumer of the group. Created before fork; `run()` is the child's whole life."""

    def __init__(self, settings: Settings, index: int, board: StatusBoard) -> None:
        self.settings = settings
        self.index = index
        self.board = board
        self.consumer = consumer_name(settings.instance_id, index)
        self.processed = self.dead_lettered = self.batches = self.claimed = 0
        self.batch_seconds_sum = 0.0
        self.redis_outages = 0  # failed Redis calls so far; a read that saw one re-reads its pending list
        self.outage_logged = {"redis": False, "postgres": False}
        self.batch_buckets = [0] * (len(BATCH_BUCKETS_S) + 1)
        self.redis_ok = self.postgres_ok = False
        self.in_flight: set[bytes] = set()  # read, not yet settled
        self.base = ShardStatus()

    def run(self) -> int:
        """Post-fork set-up, then the event loop until the shard stops; returns the exit status."""
        for signum in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        # Ctrl-C reaches the whole process group; the supervisor turns it into one SIGTERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        faulthandler.enable()  # SIGABRT from the supervisor prints where a hung loop is stuck
        self.parent_pid = os.getppid()
        setproctitle(f"processor: shard {self.index} [{self.settings.instance_id}]")
        logs.configure(self.settings.log_level, f"shard-{self.index}")
        self.base = self.board.read(self.index)
        self.panic = Panic(self.settings, f"shard-{self.index}", self.panic_state)
        self.panic.install()
        try:
            uvloop.run(self.main())
        except ConnectionRefusedForGood as exc:
            log.critical("shard cannot work with this configuration", extra={"error": str(exc)})
            return ExitCode.CONFIG
        except Exception as exc:
            self.panic.crash(type(exc), exc, exc.__traceback__, where="shard main task")
        return ExitCode.OK

    def panic_state(self) -> dict[str, object]:
        """What a panic dump shows of this shard."""
        writer = getattr(self, "writer", None)
        return {
            "consumer": self.consumer,
            "in_flight": sorted(entry_id.decode() for entry_id in self.in_flight),
            "processed": self.processed,
            "dead_lettered": self.dead_lettered,
            "device_cache": writer.cache.snapshot() if writer is not None else {},
            "geofences": len(writer.geofences.index) if writer is not None else 0,
        }

    def open(self) -> None:
        """Create the clients (they connect lazily); inside the running event loop."""
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()
        self.read_task: asyncio.Task[list[Entry]] | None = None
        self.settle_task: asyncio.Task[None] | None = None
        self.stream = ConsumerStream(self.settings, self.consumer)
        self.claimer = Claimer(self.settings, self.stream)
        self.own_pending_done = asyncio.Event()
        self.geofences = GeofenceSource(self.settings.database_url, f"processor {self.consumer} geofences")
        self.writer = PositionWriter(self.settings, f"processor {self.consumer}", self.geofences)

    async def main(self) -> None:
        self.open()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self.panic.loop_exception_handler)
        loop.add_signal_handler(signal.SIGTERM, self.handle_stop)
        log.info("shard starting", extra={"consumer": self.consumer, "pid": os.getpid()})
        beat = asyncio.create_task(self.beat())
        helpers = [
            self.watched(self.watch_geofences()),
            self.watched(self.listen_rehydrate()),
            self.watched(self.keep_alive()),
        ]
        consumer = asyncio.create_task(self.consume())
        stop = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait({consumer, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not consumer.done():
                await self.drain(consumer)
            if not consumer.cancelled():
                consumer.result()  # a bug inside consume() surfaces here
        finally:
            for task in (stop, beat, *helpers):
                task.cancel()
            await self.close()

    def watched(self, coroutine: Awaitable[None]) -> asyncio.Task[None]:
        """A background task whose failure is a panic, not a silent death (a zombie shard)."""
        task = asyncio.ensure_future(coroutine)
        task.add_done_callback(self._check_background)
        return task

    def _check_background(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        if isinstance(exc, ConnectionRefusedForGood):
            log.critical("shard cannot work with this configuration", extra={"error": str(exc)})
            logging.shutdown()
            os._exit(ExitCode.CONFIG)
        self.panic.crash(type(exc), exc, exc.__traceback__, where=f"background task {task.get_coro().__qualname__}")

    def handle_stop(self) -> None:
        """First SIGTERM: stop reading and drain. Second: cut the drain short."""
        (self.hurry if self.stopping.is_set() else self.stopping).set()
        if self.read_task is not None:
            self.read_task.cancel()

    async def drain(self, consumer: asyncio.Task[None]) -> None:
        """Let the in-flight batch commit and ACK within DRAIN_TIMEOUT_S (less after a second signal)."""
        started = time.monotonic()
        in_flight = len(self.in_flight)
        processed_before = self.processed
        hurry = asyncio.create_task(self.hurry.wait())
        await asyncio.wait({consumer, hurry}, timeout=self.settings.drain_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        hurry.cancel()
        if not consumer.done():
            consumer.cancel()
            await asyncio.wait({consumer})
        log.info(
            "shard drained",
            extra={
                "consumer": self.consumer,
                "in_flight": in_flight,
                "committed_and_acked": self.processed - processed_before,
                "left_pending": len(self.in_flight),
                "seconds": round(time.monotonic() - started, 3),
            },
        )

    async def consume(self) -> None:
        """Read and decode the next batch while the previous one is being written."""
        await self.retry("redis", self.stream.ensure_group)
        await self.retry("redis", self.claimer.keep_alive)  # before the first read: we are not dead
        await self.retry("postgres", self.geofences.refresh)
        batches: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=1)
        reader = self.watched(self.read_batches(batches))
        # One claimer per instance: shard 0's.
        claimer = self.watched(self.claim_loop(batches)) if self.index == 0 else None
        try:
            while (batch := await batches.get()) is not None:
                await self.process(batch)
            await self.flush()
        finally:
            reader.cancel()
            if claimer is not None:
                claimer.cancel()
        reader.result()

    async def read_batches(self, batches: asyncio.Queue[Batch | None]) -> None:
        """Finish our own pending entries first, then read new ones, until asked to stop."""
        after = OWN_PENDING
        while not self.stopping.is_set():
            outages = self.redis_outages
            self.read_task = asyncio.create_task(self.retry("redis", self.stream.read, after, self.settings.batch_size))
            try:
                entries = await self.read_task
            except asyncio.CancelledError:
                if self.stopping.is_set():
                    break  # the stop signal interrupted a blocking read: nothing was in flight
                raise
            finally:
                self.read_task = None
            if self.redis_outages != outages and after == NEW_ENTRIES:
                # A read whose reply was lost still delivered its entries to us: they sit in our
                # pending list, and nobody else would look at them before CLAIM_THRESHOLD_MS.
                log.info("re-reading own pending entries after a Redis outage", extra={"consumer": self.consumer})
                after = OWN_PENDING
                if entries:
                    await self.enqueue(entries, batches)
                continue
            if after != NEW_ENTRIES:
                if not entries:
                    if not self.own_pending_done.is_set():
                        log.info("own pending entries finished", extra={"consumer": self.consumer})
                    self.own_pending_done.set()
                    after = NEW_ENTRIES
                    continue
                after = entries[-1][0]  # past the whole page, including entries already in flight
                entries = [entry for entry in entries if entry[0] not in self.in_flight]
            if entries:
                await self.enqueue(entries, batches)
        await batches.put(None)

    async def enqueue(self, entries: list[Entry], batches: asyncio.Queue[Batch | None]) -> None:
        self.in_flight.update(entry_id for entry_id, _ in entries)
        self.publish_status()
        await batches.put(decode_batch(entries, self.settings.max_failures))

    async def claim_loop(self, batches: asyncio.Queue[Batch | None]) -> None:
        """Dead consumers' entries every LIVENESS_CHECK_S; idle ones every CLAIM_INTERVAL_MS."""
        await self.own_pending_done.wait()  # a restarted shard first finishes its own
        next_threshold_pass = 0.0
        while not self.stopping.is_set():
            try:
                async for entries in self.claimer.from_dead():
                    await self.enqueue_claimed(entries, batches)
                if time.monotonic() >= next_threshold_pass:
                    next_threshold_pass = time.monotonic() + self.settings.claim_interval_ms / 1000
                    async for entries in self.claimer.idle_entries():
                        await self.enqueue_claimed(entries, batches)
                    await self.claimer.forget_idle_consumers()
            except Exception as exc:
                if not is_transient("redis", exc):
                    raise
                log.debug("claim pass interrupted", extra={"error": str(exc)})  # the reader reports outages
            await asyncio.sleep(LIVENESS_CHECK_S)

    async def enqueue_claimed(self, entries: list[Entry], batches: asyncio.Queue[Batch | None]) -> None:
        entries = [entry for entry in entries if entry[0] not in self.in_flight]  # ours already, being written
        if not entries:
            return
        self.claimed += len(entries)
        log.info("entries claimed", extra={"consumer": self.consumer, "entries": len(entries)})
        await self.enqueue(entries, batches)

    async def keep_alive(self) -> None:
        """Refresh the liveness key every second from the event loop; a hung loop lets it expire."""
        while True:
            try:
                await self.claimer.keep_alive()
                self.set_health("redis", True)
            except Exception as exc:
                if not is_transient("redis", exc):
                    raise
                self.set_health("redis", False)  # the reader logs the outage; the key is set again later
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def process(self, batch: Batch) -> None:
        """Write in one transaction; then ACK and dead-letter in one round trip, while the next batch writes."""
        started = time.monotonic()
        for place in ("shard-uncaught", "shard-task", "shard-thread", "shard-hang"):
            maybe_crash(place, self.settings.panic_dir)
        if batch.fixes:
            rejected = await self.retry("postgres", self.writer.write_isolating, batch.fixes)
            if rejected:
                await self.retry_rejected(batch, rejected)
        if batch.gone:
            log.warning("pending entries no longer in the stream were acknowledged", extra={"ids": _ids(batch.gone)})
        # Once committed, the ACK must go out even if a shutdown cancels us now: a task of its
        # own, created before anything else is awaited.
        previous, self.settle_task = self.settle_task, asyncio.create_task(self.settle(batch, started, self.settle_task))
        if previous is not None:
            await asyncio.shield(previous)  # at most two ACKs in flight

    async def flush(self) -> None:
        """Wait for the ACKs of the batches written so far."""
        if self.settle_task is not None:
            await asyncio.shield(self.settle_task)

    async def settle(self, batch: Batch, started: float, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await previous  # ACKs (and counters) in batch order
        written = await self.retry("redis", self.stream.settle, batch.acked, batch.dead, batch.recovered)
        self.in_flight.difference_update(batch.ids)
        self.processed += len(batch.fix_ids)
        self.dead_lettered += written
        self.batches += 1
        elapsed = time.monotonic() - started
        self.batch_seconds_sum += elapsed
        self.batch_buckets[bucket_of(elapsed)] += 1
        self.publish_status()
        for letter in batch.dead:
            log.warning(
                "entry dead-lettered",
                extra={"source_id": letter.entry_id.decode(), "error_kind": letter.error_kind, "error": letter.error},
            )
        log.debug(
            "batch committed",
            extra={"entries": len(batch.ids), "stored": len(batch.fix_ids), "dead_lettered": written, "seconds": round(elapsed, 4)},
        )

    async def retry_rejected(self, batch: Batch, rejected: dict[int, str]) -> None:
        """Rows Postgres refused: count each failure (in Redis, so counts survive restarts) and
        retry at once, since a rejection is deterministic; dead-letter at MAX_FAILURES."""
        dead: dict[int, tuple[str, int]] = {}
        while rejected:
            positions = list(rejected)
            counts = await self.retry("redis", self.stream.count_failures, [batch.fix_ids[p] for p in positions])
            again = []
            for position, count in zip(positions, counts):
                if count >= self.settings.max_failures:
                    dead[position] = (rejected[position], count)
                else:
                    again.append(position)
            if not again:
                break
            retried = await self.retry("postgres", self.writer.write_isolating, [batch.fixes[p] for p in again])
            rejected = {again[i]: error for i, error in retried.items()}
            batch.recovered.extend(batch.fix_ids[p] for p in again if p not in rejected)
        batch.reject(dead)

    async def retry(self, server: str, operation: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run `operation` until it succeeds; an outage pauses with backoff and is logged once."""
        backoff = Backoff(base_s=0.1, cap_s=5.0)
        while True:
            try:
                result = await operation(*args)
            except Exception as exc:
                if not is_transient(server, exc):
                    raise
                if is_configuration_error(exc):
                    raise ConnectionRefusedForGood(f"{server} refused the connection: {exc}") from exc
                if server == "redis":
                    self.redis_outages += 1
                if getattr(self, f"{server}_ok") or not self.outage_logged[server]:
                    # Once per outage, not per caller: the read and the ACK fail at the same moment.
                    log.warning(f"{server} unavailable, pausing", extra={"consumer": self.consumer, "error": str(exc)})
                    self.outage_logged[server] = True
                self.set_health(server, False)
                await asyncio.sleep(backoff.next_delay())
                continue
            if backoff.failures and self.outage_logged[server]:
                log.warning(f"{server} reachable again", extra={"consumer": self.consumer, "attempts": backoff.failures})
                self.outage_logged[server] = False
            self.set_health(server, True)
            return result

    def set_health(self, server: str, ok: bool) -> None:
        changed = getattr(self, f"{server}_ok") != ok
        setattr(self, f"{server}_ok", ok)
        if changed:
            self.publish_status()

    def publish_status(self) -> None:
        """Heartbeat, health and counters into our slot; counters continue those of earlier lives."""
        base = self.base
        self.board.write(
            self.index,
            ShardStatus(
                time.monotonic(),
                os.getpid(),
                self.redis_ok,
                self.postgres_ok,
                base.processed + self.processed,
                base.dead_lettered + self.dead_lettered,
                base.claimed + self.claimed,
                base.batches + self.batches,
                len(self.in_flight),
                base.batch_seconds_sum + self.batch_seconds_sum,
                tuple(a + b for a, b in zip(base.batch_buckets, self.batch_buckets)),
            ),
        )

    async def beat(self) -> None:
        """Heartbeat from inside the loop, so a blocked loop stops beating; a summary now and then."""
        last_summary = time.monotonic()
        last_processed = self.processed
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            self.publish_status()
            if os.getppid() != self.parent_pid and not self.stopping.is_set():
                log.error("supervisor is gone; stopping", extra={"consumer": self.consumer})
                self.handle_stop()
            now = time.monotonic()
            if now - last_summary >= SUMMARY_INTERVAL_S:
                rate = (self.processed - last_processed) / (now - last_summary)
                log.info(
                    "shard summary",
                    extra={
                        "consumer": self.consumer,
                        "processed": self.processed,
                        "dead_lettered": self.dead_lettered,
                        "batches": self.batches,
                        "rate_per_s": round(rate, 1),
                    },
                )
                last_summary, last_processed = now, self.processed

    async def watch_geofences(self) -> None:
        """Pick up inserted, changed and deactivated geofences without a restart."""
        while True:
            await asyncio.sleep(GEOFENCE_POLL_S)
            try:
                await self.geofences.refresh()
                self.set_health("postgres", True)
            except POSTGRES_TRANSIENT as exc:
                # An idle shard learns of a Postgres outage here first; the write path logs it.
                log.debug("geofence refresh failed", extra={"error": str(exc)})
                self.set_health("postgres", False)

    async def listen_rehydrate(self) -> None:
        """Drop a device's cached state when `processor rehydrate` asks (the row version is bumped too)."""
        backoff = Backoff(base_s=0.5, cap_s=10.0)
        while True:
            pubsub = self.stream.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(rehydrate_channel(self.settings.stream_key))
                backoff.reset()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        device_id = message["data"].decode(errors="replace")
                        self.writer.cache.drop([device_id])
                        log.info("device state dropped on request", extra={"device_id": device_id})
            except Exception as exc:
                if not is_transient("redis", exc):
                    raise
                await asyncio.sleep(backoff.next_delay())
            finally:
                await pubsub.aclose()

    async def close(self) -> None:
        """Bounded by CLOSE_BUDGET_S altogether, so the supervisor's stop deadline holds."""
        deadline = time.monotonic() + CLOSE_BUDGET_S
        if self.settle_task is not None and not self.settle_task.done():
            await asyncio.wait({self.settle_task}, timeout=SETTLE_GRACE_S)
        try:
            await asyncio.wait_for(self.claimer.retire(), max(0.1, deadline - time.monotonic()))
        except Exception as exc:  # the key expires by itself within LIVENESS_TTL_S
            if not (is_transient("redis", exc) or isinstance(exc, asyncio.TimeoutError)):
                raise
        for closing in (self.writer.close, self.geofences.close, self.stream.close):
            try:
                await asyncio.wait_for(closing(), max(0.1, deadline - time.monotonic()))
            except (asyncio.TimeoutError, OSError):
                pass  # a connection that does not close politely is dropped with the process
        self.publish_status()  # the supervisor's drain report reads in_flight (left pending) from here
        log.info(
            "shard stopped",
            extra={"consumer": self.consumer, "processed": self.processed, "dead_lettered": self.dead_lettered},
        )


def _ids(ids: list[bytes]) -> list[str]:
    return [i.decode() for i in ids[:20]]
