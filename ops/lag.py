"""`processor lag`: the stream's length, the group's lag and pending entries, each consumer, the DLQ's length,
and the stream's trimming: where it may be trimmed, which consumer group holds it back and how far, and the
entries lost before the Processor processed them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import redis

from common.config import Settings
from common.errors import ExitCode
from common.keys import lost_key
from common.lag import Lag, group_lag
from common.redis_client import text
from ops.errors import redis_client
from ops.terminal import cell, count, emit, format_ms, table_lines
from supervisor.trimming import StreamState, read_stream_state


@dataclass(frozen=True)
class OldestPending:
    id: str
    consumer: str
    age_ms: int  # since the entry was added (from its id's time part)
    idle_ms: int  # since it was last delivered
    deliveries: int

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "consumer": self.consumer,
            "age_ms": self.age_ms,
            "idle_ms": self.idle_ms,
            "deliveries": self.deliveries,
        }


@dataclass(frozen=True)
class ConsumerInfo:
    name: str
    pending: int
    idle_ms: int  # since the consumer last read or claimed

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "pending": self.pending, "idle_ms": self.idle_ms}


@dataclass(frozen=True)
class LagReport:
    stream: str
    group: str
    dlq: str
    stream_exists: bool
    group_exists: bool
    length: int
    last_delivered_id: str | None
    lag: Lag
    pending: int
    oldest_pending: OldestPending | None
    consumers: list[ConsumerInfo]
    dlq_length: int
    trimming: StreamState | None = None  # None when the stream does not exist
    lost_total: int = 0  # the group's lost counter: entries removed before the Processor processed them, all instances

    def as_json(self) -> dict[str, object]:
        return {
            "stream": self.stream,
            "group": self.group,
            "stream_exists": self.stream_exists,
            "group_exists": self.group_exists,
            "length": self.length,
            "last_delivered_id": self.last_delivered_id,
            "lag": self.lag.count,
            "lag_exact": self.lag.exact,
            "lag_source": self.lag.source,
            "pending": self.pending,
            "oldest_pending": self.oldest_pending.as_json() if self.oldest_pending else None,
            "consumers": [c.as_json() for c in self.consumers],
            "dlq": self.dlq,
            "dlq_length": self.dlq_length,
            "lost": self.lost_total,
            "trimming": self.trimming.as_json() if self.trimming else None,
        }


def lag_report(settings: Settings) -> LagReport:
    """Length, lag, pending entries and consumers of the group, and the DLQ's length.

    A missing stream or group is not an error: the Processor creates both at start-up.
    Without a group, every entry in the stream counts as lag (the group starts at id 0).
    """
    stream, group_name = settings.stream_key, settings.consumer_group
    with redis_client(settings.redis_url) as client:
        dlq_length = int(client.xlen(settings.dlq_key))
        length = int(client.xlen(stream))
        stream_exists = bool(client.exists(stream))
        group = _find_group(client, stream, group_name) if stream_exists else None
        trimming = read_stream_state(client, settings)
        lost = int(client.get(lost_key(stream, group_name)) or 0)
        if group is None:
            return LagReport(
                stream, group_name, settings.dlq_key, stream_exists, False, length, None,
                Lag(length, True, "no-group"), 0, None, [], dlq_length, trimming, lost,
            )
        lag = group_lag(client, stream, group)
        consumers = [
            ConsumerInfo(text(c["name"]), int(c["pending"]), int(c["idle"]))
            for c in client.xinfo_consumers(stream, group_name)
        ]
        oldest = _oldest_pending(client, stream, group_name)
    return LagReport(
        stream, group_name, settings.dlq_key, True, True, length, text(group["last-delivered-id"]), lag,
        int(group["pending"]), oldest, consumers, dlq_length, trimming, lost,
    )


def _find_group(client: redis.Redis, stream: str, name: str) -> dict[str, Any] | None:
    wanted = name.encode()
    return next((g for g in client.xinfo_groups(stream) if g["name"] == wanted), None)


def _oldest_pending(client: redis.Redis, stream: str, group: str) -> OldestPending | None:
    """The smallest pending id (XPENDING's summary) with its idle time and delivery count."""
    summary = client.xpending(stream, group)
    if not summary["pending"]:
        return None
    oldest_id = summary["min"]
    details = client.xpending_range(stream, group, oldest_id, oldest_id, 1)
    seconds, micros = client.time()  # Redis' clock, not ours: ids are stamped by Redis
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    added_ms = int(text(oldest_id).split("-")[0])
    if not details:  # acknowledged in between
        return OldestPending(text(oldest_id), "-", max(now_ms - added_ms, 0), 0, 0)
    entry = details[0]
    return OldestPending(
        text(oldest_id),
        text(entry["consumer"]),
        max(now_ms - added_ms, 0),
        int(entry["time_since_delivered"]),
        int(entry["times_delivered"]),
    )


def format_lag(report: LagReport) -> list[str]:
    """The report as aligned lines for a terminal."""
    lines = [f"stream        {report.stream}: {count(report.length, 'entry', 'entries')}"]
    if not report.stream_exists:
        lines[0] = f"stream        {report.stream}: does not exist yet (nothing was added)"
    if not report.group_exists:
        lines.append(f"group         {report.group}: not created yet (the Processor creates it at start-up; "
                     f"{count(report.lag.count, 'entry', 'entries')} waiting)")
    else:
        lag = f"{report.lag.count}" if report.lag.exact else f"at least {report.lag.count}"
        how = "" if report.lag.source == "redis" else " (counted: Redis reports no lag after deletions)"
        lines.append(f"group         {report.group}: lag {lag}{how}, last delivered {report.last_delivered_id}")
        pending = f"pending       {report.pending}"
        oldest = report.oldest_pending
        if oldest is not None:
            pending += (f", oldest {oldest.id} added {format_ms(oldest.age_ms)} ago, idle {format_ms(oldest.idle_ms)}, "
                        f"consumer {cell(oldest.consumer)}, delivered {count(oldest.deliveries, 'time', 'times')}")
        lines.append(pending)
    lines.append(f"dead letters  {report.dlq}: {report.dlq_length}")
    lines.append(f"lost          {count(report.lost_total, 'entry', 'entries')} deleted or trimmed before the Processor "
                 "processed them (all instances)")
    lines += format_trimming(report.trimming)
    if report.consumers:
        table = [("CONSUMER", "PENDING", "IDLE")]
        table += [(cell(c.name), str(c.pending), format_ms(c.idle_ms)) for c in report.consumers]
        lines += ["", *table_lines(table)]
    elif report.group_exists:
        lines.append("(no consumers have joined the group)")
    return lines


def format_trimming(state: StreamState | None) -> list[str]:
    """Retention, the trim point and who holds it, the last pass, and a line per consumer group."""
    if state is None:
        return []
    retention = "off (the Processor never trims)" if state.retention_ms is None else format_ms(state.retention_ms)
    point = state.point
    if point.safe_id is None:
        where = "nothing may be trimmed: the group does not exist yet"
    elif point.holder is None:
        where = f"every group is done up to {point.safe_id}"
    else:
        where = f"every group is done below {point.safe_id} (held by group {cell(point.holder)})"
    lines = [f"trimming      retention {retention}; {where}"]
    if state.retention_ms is not None:
        nxt = f"next pass trims below {state.next_target}" if state.next_target else "next pass trims nothing"
        last = state.last_trim
        if last:
            nxt += f"; last pass removed {last.get('removed', '0')} (instance {cell(last.get('instance', '?'))})"
        lines.append(f"              {nxt}")
    if state.first_id:
        lines.append(f"              oldest entry {state.first_id}, {format_ms(state.oldest_entry_age_ms)} old")
    table = [("GROUP", "NEEDS FROM", "OLDEST NEEDED", "BEYOND RETENTION", "UNREAD", "PENDING")]
    for hold in point.groups:
        table.append((
            cell(hold.group), hold.needs_from or "-", format_ms(hold.oldest_needed_age_ms) if hold.needs_from else "-",
            format_ms(hold.blocked_ms) if hold.blocked_ms else "-", "?" if hold.unread is None else str(hold.unread),
            str(hold.pending),
        ))
    return [*lines, "", *table_lines(table)] if point.groups else lines


# --- the command ----------------------------------------------------------------------


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "lag",
        help="stream length, group lag, pending count, per-consumer pending and idle",
        description="Show STREAM_KEY's length; the lag of CONSUMER_GROUP (entries not yet delivered; counted "
        "when Redis cannot report it after deletions); the pending (delivered, unacknowledged) entries and "
        "the oldest of them (age since added, idle since last delivered); per consumer its pending entries "
        "and idle time; the length of DLQ_KEY; the entries lost (deleted or trimmed before the Processor "
        "processed them, all instances); and the stream's trimming: STREAM_RETENTION_MS, the id below which "
        "every consumer group is done, the group that holds it back, and per group the oldest entry it has "
        "not read or acknowledged and how far beyond the retention that lies. A missing stream or group is "
        "reported, not an error.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    parser.set_defaults(func=cmd_lag)


def cmd_lag(settings: Settings, args: argparse.Namespace) -> int:
    report = lag_report(settings)
    emit(report.as_json() if args.json else format_lag(report), args.json)
    return ExitCode.OK
