"""What /healthz and /metrics say: the status board, and the stream's gauges read by a thread.

Runs in the HTTP process (supervisor/http_process.py). Everything about the shards and the
supervisor comes from the status board it inherited; only the stream gauges need Redis, and
a thread of their own reads them, so a scrape never waits on Redis for long.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from common.config import Settings
from common.faults import Outcome, classify, one_line
from common.lag import group_lag
from common.redis_client import sync_client
from common.status import BATCH_BUCKETS_S, ShardStatus, SlotState, StatusBoard, SupervisorState
from common.timing import HEALTHY_BEAT_S
from supervisor.trimming import StreamState, read_stream_state

log = logging.getLogger("processor.http")

REDIS_TIMEOUT_S = 1.0  # each Redis call of a reading
READ_INTERVAL_S = 5.0  # the stream gauges are read this often, and when a scrape asks
SCRAPE_WAIT_S = 0.5  # a scrape waits this long at most for a fresh reading, then serves the last
FRESH_S = 1.0  # a reading started this recently is fresh enough for a scrape


@dataclass(frozen=True)
class ShardView:
    """One slot: what the supervisor says of it, and what its shard reports."""

    slot: int
    running: bool
    beating: bool
    status: ShardStatus
    restarts: int
    pid: int

    @property
    def problems(self) -> list[str]:
        return [
            text
            for ok, text in (
                (self.running, "not running"),
                (self.beating, "event loop not beating"),
                (self.status.redis_ok, "Redis unreachable"),
                (self.status.postgres_ok, "Postgres unreachable"),
            )
            if not ok
        ]


def shard_view(slot: int, known: SlotState, status: ShardStatus, now: float) -> ShardView:
    beating = known.running and now - max(status.heartbeat, known.started_at) <= HEALTHY_BEAT_S
    return ShardView(slot, known.running, beating, status, known.restarts, known.pid)


@dataclass(frozen=True)
class StreamReading:
    """The stream gauges at one moment; `lag` and the rest are None when the group does not exist."""

    started_at: float  # monotonic
    dead_letters: int
    lag: int | None = None
    pending: int | None = None
    oldest_pending_age_s: float | None = None
    trimming: StreamState | None = None  # None when the stream does not exist


class StreamGauges:
    """Reads lag, pending, oldest pending age and the DLQ length from Redis in a thread.

    It reads every READ_INTERVAL_S and whenever a scrape asks; a scrape waits at most
    SCRAPE_WAIT_S for that and otherwise gets the newest reading it has (or None).
    """

    def __init__(self, settings: Settings, interval_s: float = READ_INTERVAL_S) -> None:
        self.settings = settings
        self.interval_s = interval_s
        self.redis = sync_client(settings.redis_url, REDIS_TIMEOUT_S, "processor-metrics")
        self.changed = threading.Condition()
        self.asked = False
        self.stopped = False
        self.attempted_at = float("-inf")  # start of the last finished attempt, monotonic
        self.reading: StreamReading | None = None

    def start(self) -> None:
        threading.Thread(target=self.run, name="stream-gauges", daemon=True).start()

    def stop(self) -> None:
        """End the thread after its current reading, and close the client."""
        with self.changed:
            self.stopped = True
            self.changed.notify_all()
        self.redis.close()

    def run(self) -> None:
        while True:
            started = time.monotonic()
            reading = self.read(started)
            with self.changed:
                self.attempted_at = started
                self.reading = reading or self.reading
                self.changed.notify_all()
                self.changed.wait_for(lambda: self.asked or self.stopped, timeout=self.interval_s)
                self.asked = False
                if self.stopped:
                    return

    def latest(self, wait_s: float = SCRAPE_WAIT_S) -> StreamReading | None:
        """The newest reading; waits up to `wait_s` for one that started at most FRESH_S ago."""
        wanted = time.monotonic() - FRESH_S
        with self.changed:
            if self.attempted_at < wanted:
                self.asked = True
                self.changed.notify_all()
                self.changed.wait_for(lambda: self.attempted_at >= wanted, timeout=wait_s)
            return self.reading

    def read(self, started: float) -> StreamReading | None:
        """One reading; None when Redis does not answer in time or anything else fails."""
        stream, dlq = self.settings.stream_key, self.settings.dlq_key
        try:
            group = self._group()
            dead_letters = self.redis.xlen(dlq)
            trimming = read_stream_state(self.redis, self.settings)
            if group is None:
                return StreamReading(started, dead_letters, trimming=trimming)
            summary = self.redis.xpending(stream, self.settings.consumer_group)
            lag = _unread(trimming, self.settings.consumer_group)
            if lag is None:  # not in the trimming snapshot: counted here (group_lag reads the stream)
                lag = group_lag(self.redis, stream, group).count
        except Exception as exc:
            # Metrics are best effort: not even a bug of ours may stop this thread.
            level = logging.DEBUG if classify(exc) in (Outcome.OUTAGE, Outcome.REFUSED) else logging.ERROR
            log.log(level, "stream metrics unavailable", extra={"error": one_line(exc)}, exc_info=level == logging.ERROR)
            return None
        oldest_id = summary["min"] if summary else None
        age = time.time() - int(oldest_id.split(b"-")[0]) / 1000 if oldest_id else 0.0
        return StreamReading(started, dead_letters, lag, group["pending"], max(age, 0.0), trimming)

    def _group(self) -> dict[str, Any] | None:
        try:
            groups = self.redis.xinfo_groups(self.settings.stream_key)
        except redis.ResponseError:
            return None  # no stream yet
        wanted = self.settings.consumer_group.encode()
        return next((g for g in groups if g["name"] == wanted), None)


def _unread(trimming: StreamState | None, group: str) -> int | None:
    """The group's lag as the trimming snapshot already counted it (group_lag), if it holds the group."""
    if trimming is None:
        return None
    return next((hold.unread for hold in trimming.point.groups if hold.group == group), None)


class Observer:
    """Health and metrics from the status board plus the stream gauges' newest reading."""

    def __init__(
        self, settings: Settings, board: StatusBoard, gauges: StreamGauges, parent_pid: Callable[[], int] = os.getppid
    ) -> None:
        self.settings = settings
        self.board = board
        self.gauges = gauges
        self.parent_pid = parent_pid

    def shards(self) -> list[ShardView]:
        now = time.monotonic()
        known = self.board.read_supervisor().slots
        return [shard_view(slot, known[slot], self.board.read(slot), now) for slot in range(self.board.slots)]

    def supervisor_problems(self, supervisor: SupervisorState) -> list[str]:
        if self.parent_pid() != supervisor.pid:
            return ["gone"]
        return [
            text
            for bad, text in (
                (supervisor.stopping, "stopping"),
                (not supervisor.stopping and not any(slot.pid or slot.restarts for slot in supervisor.slots), "starting"),
                (time.monotonic() - supervisor.beat > HEALTHY_BEAT_S, "loop not beating"),
            )
            if bad
        ]

    def health(self) -> tuple[int, dict[str, Any]]:
        supervisor = self.board.read_supervisor()
        problems = self.supervisor_problems(supervisor)
        reasons = [f"supervisor: {p}" for p in problems]
        shards = {}
        for view in self.shards():
            shards[str(view.slot)] = {"pid": view.pid, "ok": not view.problems, "problems": view.problems}
            reasons.extend(f"shard {view.slot}: {p}" for p in view.problems)
        body: dict[str, Any] = {
            "status": "ok" if not reasons else "unhealthy",
            "instance": self.settings.instance_id,
            "supervisor": {"pid": supervisor.pid, "ok": not problems, "problems": problems},
            "shards": shards,
        }
        if reasons:
            body["reasons"] = reasons
        return (200 if not reasons else 503), body

    def collect(self) -> list[Any]:
        views = self.shards()
        families = []
        for name, help_text, value in (
            ("processor_entries_processed", "Entries stored in positions and acknowledged.", lambda s: s.processed),
            ("processor_entries_dead_lettered", "Entries moved to the dead-letter stream.", lambda s: s.dead_lettered),
            ("processor_entries_claimed", "Entries claimed from other consumers.", lambda s: s.claimed),
            ("processor_batches", "Batches written.", lambda s: s.batches),
            ("processor_fixes_expired", "Fixes older than the retention horizon: acknowledged, not stored.", lambda s: s.expired),
        ):
            family = CounterMetricFamily(name, help_text, labels=["shard"])
            for view in views:
                family.add_metric([str(view.slot)], value(view.status))
            families.append(family)
        lost = CounterMetricFamily(
            "processor_entries_lost", "Entries deleted or trimmed from the stream before they were processed.", labels=["shard"]
        )
        for view in views:
            lost.add_metric([str(view.slot)], view.status.lost)
        lost.add_metric(["maintenance"], self.board.read_maintenance().lost)
        families.append(lost)
        restarts = CounterMetricFamily("processor_shard_restarts", "Shard restarts by the supervisor.", labels=["shard"])
        up = GaugeMetricFamily("processor_shard_up", "1 while the shard runs, beats and reaches both servers.", labels=["shard"])
        in_flight = GaugeMetricFamily("processor_entries_in_flight", "Entries read and not yet settled.", labels=["shard"])
        for view in views:
            restarts.add_metric([str(view.slot)], view.restarts)
            up.add_metric([str(view.slot)], 0.0 if view.problems else 1.0)
            in_flight.add_metric([str(view.slot)], view.status.in_flight)
        families += [restarts, up, in_flight, _batch_histogram(views), *_stream_families(self.gauges.latest())]
        return families


def _batch_histogram(views: list[ShardView]) -> HistogramMetricFamily:
    counts = [sum(v.status.batch_buckets[i] for v in views) for i in range(len(BATCH_BUCKETS_S) + 1)]
    cumulative, running = [], 0
    for bound, count in zip([*map(str, BATCH_BUCKETS_S), "+Inf"], counts):
        running += count
        cumulative.append((bound, running))
    total = sum(v.status.batch_seconds_sum for v in views)
    return HistogramMetricFamily("processor_batch_seconds", "Time to write and settle one batch.", buckets=cumulative, sum_value=total)


def _stream_families(reading: StreamReading | None) -> list[GaugeMetricFamily]:
    """The stream gauges of a reading, and how old it is; none before the first reading."""
    if reading is None:
        return []
    age = GaugeMetricFamily(
        "processor_stream_metrics_age_seconds", "Seconds since the stream gauges were read from Redis."
    )
    age.add_metric([], time.monotonic() - reading.started_at)
    dlq = GaugeMetricFamily("processor_dead_letters", "Entries in the dead-letter stream.")
    dlq.add_metric([], reading.dead_letters)
    trimming = _trimming_families(reading.trimming)
    if reading.lag is None:
        return [dlq, *trimming, age]
    lag = GaugeMetricFamily("processor_consumer_lag", "Entries in the stream not yet delivered to the group.")
    pending = GaugeMetricFamily("processor_pending_entries", "Entries delivered and not yet acknowledged.")
    oldest = GaugeMetricFamily("processor_oldest_pending_age_seconds", "Age of the oldest unacknowledged entry.")
    lag.add_metric([], reading.lag)
    pending.add_metric([], reading.pending)
    oldest.add_metric([], reading.oldest_pending_age_s)
    return [lag, pending, oldest, dlq, *trimming, age]


def _trimming_families(state: StreamState | None) -> list[GaugeMetricFamily]:
    """The stream's length and how far each consumer group holds its trimming back."""
    if state is None:
        return []
    length = GaugeMetricFamily("processor_stream_length", "Entries in the input stream.")
    length.add_metric([], state.length)
    oldest = GaugeMetricFamily("processor_stream_oldest_entry_age_seconds", "Age of the oldest entry in the input stream.")
    oldest.add_metric([], state.oldest_entry_age_ms / 1000)
    blocked = GaugeMetricFamily(
        "processor_stream_trim_blocked_seconds",
        "How far the oldest entry a group has not read or acknowledged lies beyond the retention horizon.",
        labels=["group"],
    )
    unfinished = GaugeMetricFamily(
        "processor_stream_group_unfinished_entries", "Entries a group has not read yet or holds pending.", labels=["group"]
    )
    for hold in state.point.groups:
        blocked.add_metric([hold.group], hold.blocked_ms / 1000)
        unfinished.add_metric([hold.group], (hold.unread or 0) + hold.pending)
    return [length, oldest, blocked, unfinished]
