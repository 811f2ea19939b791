"""The supervisor's /healthz and /metrics, served from its own loop (no thread, so forks stay safe)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import orjson
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from common.config import Settings
from common.faults import Outcome, classify, one_line
from common.redis_client import sync_client
from common.lag import group_lag
from common.status import BATCH_BUCKETS_S, ShardStatus

log = logging.getLogger("processor.http")

REQUEST_TIMEOUT_S = 1.0  # a slow client must not stall the supervisor's loop
REDIS_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class ShardView:
    """What the supervisor knows of one slot when a request comes in."""

    slot: int
    running: bool
    beating: bool
    status: ShardStatus
    restarts: int


class Observer:
    """Health and metrics from the status board plus a look at the stream."""

    def __init__(self, settings: Settings, shards: Callable[[], list[ShardView]]) -> None:
        self.settings = settings
        self.shards = shards
        self.redis = sync_client(settings.redis_url, REDIS_TIMEOUT_S, "processor-metrics")

    def health(self) -> tuple[int, dict[str, Any]]:
        reasons = []
        shards = {}
        for view in self.shards():
            problems = [
                text
                for ok, text in (
                    (view.running, "not running"),
                    (view.beating, "event loop not beating"),
                    (view.status.redis_ok, "Redis unreachable"),
                    (view.status.postgres_ok, "Postgres unreachable"),
                )
                if not ok
            ]
            shards[str(view.slot)] = {"pid": view.status.pid, "ok": not problems, "problems": problems}
            reasons.extend(f"shard {view.slot}: {p}" for p in problems)
        body = {"status": "ok" if not reasons else "unhealthy", "instance": self.settings.instance_id, "shards": shards}
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
        ):
            family = CounterMetricFamily(name, help_text, labels=["shard"])
            for view in views:
                family.add_metric([str(view.slot)], value(view.status))
            families.append(family)
        restarts = CounterMetricFamily("processor_shard_restarts", "Shard restarts by the supervisor.", labels=["shard"])
        up = GaugeMetricFamily("processor_shard_up", "1 while the shard runs, beats and reaches both servers.", labels=["shard"])
        in_flight = GaugeMetricFamily("processor_entries_in_flight", "Entries read and not yet settled.", labels=["shard"])
        for view in views:
            restarts.add_metric([str(view.slot)], view.restarts)
            healthy = view.running and view.beating and view.status.redis_ok and view.status.postgres_ok
            up.add_metric([str(view.slot)], 1.0 if healthy else 0.0)
            in_flight.add_metric([str(view.slot)], view.status.in_flight)
        families += [restarts, up, in_flight, self._batch_histogram(views), *self._stream_gauges()]
        return families

    def _batch_histogram(self, views: list[ShardView]) -> HistogramMetricFamily:
        counts = [sum(v.status.batch_buckets[i] for v in views) for i in range(len(BATCH_BUCKETS_S) + 1)]
        cumulative, running = [], 0
        for bound, count in zip([*map(str, BATCH_BUCKETS_S), "+Inf"], counts):
            running += count
            cumulative.append((bound, running))
        total = sum(v.status.batch_seconds_sum for v in views)
        return HistogramMetricFamily("processor_batch_seconds", "Time to write and settle one batch.", buckets=cumulative, sum_value=total)

    def _stream_gauges(self) -> list[GaugeMetricFamily]:
        lag = GaugeMetricFamily("processor_consumer_lag", "Entries in the stream not yet delivered to the group.")
        pending = GaugeMetricFamily("processor_pending_entries", "Entries delivered and not yet acknowledged.")
        oldest = GaugeMetricFamily("processor_oldest_pending_age_seconds", "Age of the oldest unacknowledged entry.")
        dlq = GaugeMetricFamily("processor_dead_letters", "Entries in the dead-letter stream.")
        try:
            group = self._group()
            summary = self.redis.xpending(self.settings.stream_key, self.settings.consumer_group) if group else None
            dlq.add_metric([], self.redis.xlen(self.settings.dlq_key))
            group_lagging = group_lag(self.redis, self.settings.stream_key, group).count if group else 0
        except Exception as exc:
            # Metrics are best effort: not even a bug of ours in a scrape may stop the supervisor.
            level = logging.DEBUG if classify(exc) in (Outcome.OUTAGE, Outcome.REFUSED) else logging.ERROR
            log.log(level, "stream metrics unavailable", extra={"error": one_line(exc)}, exc_info=level == logging.ERROR)
            return []
        if group is None:
            return [dlq]
        lag.add_metric([], group_lagging)
        pending.add_metric([], group["pending"])
        oldest_id = summary["min"] if summary else None
        age = time.time() - int(oldest_id.split(b"-")[0]) / 1000 if oldest_id else 0.0
        oldest.add_metric([], max(age, 0.0))
        return [lag, pending, oldest, dlq]

    def _group(self) -> dict[str, Any] | None:
        try:
            groups = self.redis.xinfo_groups(self.settings.stream_key)
        except redis.ResponseError:
            return None  # no stream yet
        wanted = self.settings.consumer_group.encode()
        return next((g for g in groups if g["name"] == wanted), None)


class HealthServer:
    """An HTTP server whose socket the supervisor's select loop watches."""

    def __init__(self, port: int, observer: Observer) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(observer))
        handler = _handler_class(observer, registry)
        self.server = HTTPServer(("0.0.0.0", port), handler, bind_and_activate=False)
        self.server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.server_bind()
        self.server.server_activate()
        self.server.timeout = 0

    def fileno(self) -> int:
        return self.server.fileno()

    def handle(self) -> None:
        """One pending request (the socket was readable)."""
        self.server.handle_request()

    def close(self) -> None:
        self.server.server_close()


class _Collector:
    def __init__(self, observer: Observer) -> None:
        self.observer = observer

    def collect(self) -> list[Any]:
        return self.observer.collect()


def _handler_class(observer: Observer, registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path.split("?")[0] == "/healthz":
                status, body = observer.health()
                self._send(status, "application/json", orjson.dumps(body))
            elif self.path.split("?")[0] == "/metrics":
                self._send(200, "text/plain; version=0.0.4; charset=utf-8", generate_latest(registry))
            else:
                self._send(404, "application/json", b'{"error": "not found; try /healthz or /metrics"}')

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server API
            pass  # scrapes every few seconds would drown the logs

    return Handler
