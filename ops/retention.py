"""`processor retention`: the partitions of positions, the horizon, what the next pass drops; the stream's trim point.

Row counts are exact (`count(*)`) for partitions whose table is at most EXACT_BELOW_BYTES,
and the planner's estimate (`pg_class.reltuples`, kept by ANALYZE and autovacuum) for bigger
ones, marked `~` (JSON: `rows_exact` false); a big partition never analysed yet shows no count.
What the next pass does is `supervisor.partitions.plan` run on the same partitions and clock
with this command's POSITIONS_RETENTION_DAYS and MAX_FUTURE_S.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import datetime, timezone

import psycopg

from common.config import Settings
from common.errors import ExitCode
from ops.errors import SchemaMissing, postgres, redis_client
from ops.lag import format_trimming
from ops.terminal import count, emit, table_lines
from supervisor.partitions import READY_ALERT_DAYS, Partition, Plan, plan, read_partitions, ready_until
from supervisor.trimming import StreamState, read_stream_state

EXACT_BELOW_BYTES = 16 << 20  # partitions up to this size are counted row by row


@dataclass(frozen=True)
class PartitionRow:
    partition: Partition
    rows: int | None  # None: a big partition not analysed yet
    exact: bool

    def as_json(self) -> dict[str, object]:
        part = self.partition
        return {
            "name": part.name, "from": _iso(part.lower), "to": _iso(part.upper), "rows": self.rows,
            "rows_exact": self.exact, "bytes": part.bytes, "detach_pending": part.detach_pending,
        }


@dataclass(frozen=True)
class RetentionReport:
    now: datetime
    retention_days: int
    partitions: list[PartitionRow]
    next_pass: Plan
    ready_until: datetime | None
    stream_key: str
    stream: StreamState | None

    def as_json(self) -> dict[str, object]:
        nxt = self.next_pass
        return {
            "now": _iso(self.now),
            "retention_days": self.retention_days,
            "horizon": _iso(nxt.horizon),
            "drop_bound": _iso(nxt.keep_from),
            "partitioned": True,  # a database that is not is refused (exit 78)
            "partitions": [row.as_json() for row in self.partitions],
            "bytes": sum(row.partition.bytes for row in self.partitions),
            "ready_until": _iso(self.ready_until),
            "next_pass": {
                "drop": [{"name": p.name, "rows": self._rows(p)} for p in nxt.drop],
                "create": [{"name": p.name, "from": _iso(p.lower), "to": _iso(p.upper)} for p in nxt.create],
            },
            "stream": {"key": self.stream_key, **self.stream.as_json()} if self.stream else None,
        }

    def _rows(self, part: Partition) -> int | None:
        return next((row.rows for row in self.partitions if row.partition.name == part.name), None)


def retention_report(settings: Settings) -> RetentionReport:
    now = datetime.now(timezone.utc)
    with postgres(settings.database_url) as conn:
        conn.execute("SET LOCAL TimeZone = 'UTC'")  # this transaction only: a pooled server connection keeps no trace
        partitions = read_partitions(conn)
        if not partitions:  # no positions table, or one from before migration 0003
            raise SchemaMissing(
                "the database schema is missing or out of date (positions is not partitioned); run `processor migrate` first"
            )
        rows = [_counted(conn, part) for part in partitions]
    next_pass = plan(partitions, now, settings.positions_retention_days, settings.max_future_s)
    with redis_client(settings.redis_url) as client:
        stream = read_stream_state(client, settings)
    return RetentionReport(
        now, settings.positions_retention_days, rows, next_pass, ready_until(partitions, now), settings.stream_key, stream
    )


def _counted(conn: psycopg.Connection, part: Partition) -> PartitionRow:
    """Counted through positions within the partition's bounds (the planner reads that partition
    alone), so that SELECT on positions is all the command needs."""
    if part.heap_bytes <= EXACT_BELOW_BYTES and not part.detach_pending:
        (rows,) = conn.execute(
            "SELECT count(*) FROM positions WHERE (%(lower)s::timestamptz IS NULL OR ts >= %(lower)s) "
            "AND (%(upper)s::timestamptz IS NULL OR ts < %(upper)s)",
            {"lower": part.lower, "upper": part.upper},
        ).fetchone()  # type: ignore[misc]
        return PartitionRow(part, rows, True)
    return PartitionRow(part, part.reltuples if part.reltuples >= 0 else None, False)


def format_retention(report: RetentionReport) -> list[str]:
    nxt = report.next_pass
    total = sum(row.partition.bytes for row in report.partitions)
    lines = [f"positions     {count(len(report.partitions), 'partition', 'partitions')}, {_size(total)}, "
             f"ready until {_day(report.ready_until)}{_ready_warning(report)}"]
    if report.retention_days:
        lines.append(f"retention     {count(report.retention_days, 'day', 'days')}: fixes dated before {_iso(nxt.horizon)} are not "
                     f"stored; partitions ending by {_day(nxt.keep_from)} are dropped")
    else:
        lines.append("retention     0: every fix is kept for ever (POSITIONS_RETENTION_DAYS)")
    drops = ", ".join(f"{p.name} ({_rows_text(report, p)} rows)" for p in nxt.drop) or "nothing"
    lines.append(f"next pass     drops {drops}; creates {len(nxt.create)}"
                 + (f" ({nxt.create[0].name} … {nxt.create[-1].name})" if nxt.create else ""))
    table = [("PARTITION", "FROM", "TO", "ROWS", "SIZE")]
    table += [(row.partition.name + (" (detaching)" if row.partition.detach_pending else ""),
               _day(row.partition.lower, "MINVALUE"), _day(row.partition.upper, "MAXVALUE"),
               _rows_cell(row), _size(row.partition.bytes)) for row in report.partitions]
    lines += ["", *table_lines(table), "(~: the planner's estimate, for partitions over "
              f"{EXACT_BELOW_BYTES >> 20} MiB; the others are counted)", ""]
    if report.stream is None:
        lines.append(f"stream        {report.stream_key}: does not exist yet")
    else:
        lines.append(f"stream        {report.stream_key}: {count(report.stream.length, 'entry', 'entries')}")
        lines += format_trimming(report.stream)
    return lines


def _ready_warning(report: RetentionReport) -> str:
    if report.ready_until is None:
        return " (WARNING: no partition holds the present)"
    days = (report.ready_until - report.now).total_seconds() / 86_400
    return f" ({days:.1f} days ahead)" + (" WARNING: partition maintenance is behind" if days < READY_ALERT_DAYS else "")


def _rows_text(report: RetentionReport, part: Partition) -> str:
    return next((_rows_cell(row) for row in report.partitions if row.partition.name == part.name), "?")


def _rows_cell(row: PartitionRow) -> str:
    if row.rows is None:
        return "? (not analysed)"
    return f"{row.rows:,}" if row.exact else f"~{row.rows:,}"


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return ""


def _day(moment: datetime | None, infinite: str = "-") -> str:
    if moment is None:
        return infinite
    return f"{moment:%Y-%m-%d}" if moment == moment.replace(hour=0, minute=0, second=0, microsecond=0) else _iso(moment) or ""


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if moment else None


# --- the command ----------------------------------------------------------------------


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "retention",
        help="partitions of positions with rows and sizes, the horizon, what the next pass drops; the stream's trim point",
        description="Show the partitions of positions (bounds, rows: counted up to 16 MiB, the planner's estimate "
        "above, marked ~; size with indexes), how far ahead they are ready, POSITIONS_RETENTION_DAYS and its "
        "horizon (older fixes are not stored), what the next partition-maintenance pass would drop and create "
        "with this environment's settings; and the stream's trimming: STREAM_RETENTION_MS, the id below which "
        "every consumer group is done, the group that holds it back, and per group how far beyond the "
        "retention its oldest needed entry lies. Changes nothing.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    parser.set_defaults(func=cmd_retention)


def cmd_retention(settings: Settings, args: argparse.Namespace) -> int:
    report = retention_report(settings)
    emit(report.as_json() if args.json else format_retention(report), args.json)
    return ExitCode.OK
