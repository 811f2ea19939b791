"""Partition maintenance of `positions` (SPEC §3, §5 "Retention"): days made ahead, old ones dropped.

Layout (migrations/0003_partition_positions.sql creates it): `positions` is range-partitioned
on `ts`, one partition per UTC day, `positions_YYYYMMDD`, plus below the days one partition
`positions_before_YYYYMMDD` that holds everything older (FROM MINVALUE; after an upgrade it is
the old, unpartitioned table). There is no DEFAULT partition: rows in one would have to be
moved, under lock, before the day they belong to could get its partition.

One pass (`maintain`), run by the maintenance process of every instance and serialised by
the session advisory lock PARTITION_LOCK_KEY (an instance that finds it taken skips the pass):

1. Ahead: every day from today through DAYS_AHEAD days after the day of the latest fix the
   shards accept (the clock plus MAX_FUTURE_S) gets its partition; a gap between partitions
   is filled the same way. Each is created on its own and then ATTACHed, which takes SHARE
   UPDATE EXCLUSIVE on `positions`: writers never wait for it.
2. Below: with POSITIONS_RETENTION_DAYS = 0 (keep for ever) a `positions_before_…` partition
   from MINVALUE must exist, so a fix from the far past always has a home; it is recreated
   if retention had dropped it. With N days, fixes older than the horizon (now − N days) are
   not stored at all (the shards count them as expired), and nothing below the partitions
   kept is needed, except when N grows: then the range down to the new bound gets one
   partition.
3. Retention (N > 0): a partition whose upper bound is at or before KEEP_FROM, the start of
   the UTC day of (now − N − 1 days), is dropped whole: DETACH … CONCURRENTLY (writers never
   wait), then DROP TABLE. A row is kept at least N days; the one spare day covers clock
   differences and batches in flight at the horizon. No DELETE, no bloat. last_position and
   timing_records are never touched.

Each statement runs in its own transaction with a lock_timeout of LOCK_TIMEOUT; one that
fails is logged and tried again at the next pass. A partition left "detach pending" by an
interrupted pass is finalised first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

import psycopg
from psycopg import sql

from common.config import Settings
from common.contract import retention_horizon
from common.faults import Outcome, classify, one_line
from common.keys import PARTITION_LOCK_KEY
from common.postgres import POOLER_SAFE, AnswerBounded
from common.status import StatusBoard
from supervisor.maintenance import Duty
from supervisor.migrations import ddl_refusal

log = logging.getLogger("processor.partitions")

MAINTAIN_EVERY_S = 600.0  # the maintenance process runs a pass this often (the first at its start)

DAY = timedelta(days=1)
DAYS_AHEAD = 14  # days ready beyond the latest acceptable fix after every pass
READY_ALERT_DAYS = 7  # fewer days ready than this: an error in the log (and in `processor retention`)
LOCK_TIMEOUT = "5s"
CONNECT_TIMEOUT_S = 10
PARENT = "positions"

_PARTITIONED = "SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass('positions')"
# Bounds come back typed: 'MINVALUE'/'MAXVALUE' as NULL, and clamped to Python's datetime range.
_PARTITIONS = """
SELECT c.relname,
       CASE WHEN b[1] <> 'MINVALUE' THEN least(trim(BOTH '''' FROM b[1])::timestamptz, '9999-12-31Z') END,
       CASE WHEN b[2] <> 'MAXVALUE' THEN least(trim(BOTH '''' FROM b[2])::timestamptz, '9999-12-31Z') END,
       i.inhdetachpending, pg_total_relation_size(c.oid), c.reltuples::bigint, pg_relation_size(c.oid)
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid,
     regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\((.+)\\) TO \\((.+)\\)') AS b
WHERE i.inhparent = 'positions'::regclass AND b IS NOT NULL
ORDER BY 2 NULLS FIRST, 1
"""


@dataclass(frozen=True)
class Partition:
    name: str
    lower: datetime | None  # None: MINVALUE
    upper: datetime | None  # None: MAXVALUE
    detach_pending: bool = False
    bytes: int = 0  # table, indexes and TOAST
    reltuples: int = -1  # the planner's estimate; -1 before the first ANALYZE
    heap_bytes: int = 0


@dataclass(frozen=True)
class Plan:
    """What one pass does, decided from the partitions and the clock alone."""

    now: datetime
    horizon: datetime | None  # fixes older than this are not stored (None: kept for ever)
    keep_from: datetime | None  # partitions ending at or before it are dropped
    ready_until: datetime  # partitions reach this after the pass
    create: list[Partition] = field(default_factory=list)
    drop: list[Partition] = field(default_factory=list)


def day_floor(moment: datetime) -> datetime:
    """The start of the UTC day of `moment`."""
    return moment.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)


def plan(partitions: list[Partition], now: datetime, retention_days: int, max_future_s: float) -> Plan:
    """The partitions to create and to drop so that the layout above holds at `now`."""
    now = now.astimezone(timezone.utc)
    ready_until = day_floor(now + timedelta(seconds=max_future_s)) + (DAYS_AHEAD + 1) * DAY
    keep_from = day_floor(now - (retention_days + 1) * DAY) if retention_days else None
    drop = [p for p in partitions if keep_from is not None and p.upper is not None and p.upper <= keep_from]
    kept = sorted((p for p in partitions if p not in drop), key=_lower_key)
    result = Plan(now, retention_horizon(now, retention_days), keep_from, ready_until, drop=drop)
    bottom = kept[0].lower if kept else (keep_from or day_floor(now))
    if bottom is not None and (keep_from is None or keep_from < bottom):
        result.create.append(Partition(f"{PARENT}_before_{bottom:%Y%m%d}", keep_from, bottom))
    floor = datetime.min.replace(tzinfo=timezone.utc)
    cursor: datetime | None = bottom or floor  # partitions reach this far without a gap (None: MAXVALUE)
    for part in kept:
        if cursor is None:
            break
        if (part.lower or floor) > cursor:
            result.create.extend(_days(cursor, min(part.lower or floor, ready_until)))
        if part.upper is None or part.upper > cursor:
            cursor = part.upper
    if cursor is not None:
        result.create.extend(_days(cursor, ready_until))
    return result


def _lower_key(part: Partition) -> datetime:
    return part.lower or datetime.min.replace(tzinfo=timezone.utc)


def _days(start: datetime, end: datetime) -> list[Partition]:
    """Partitions covering [start, end), cut at UTC midnights."""
    parts = []
    while start < end:
        stop = min(day_floor(start) + DAY, end)
        whole = start == day_floor(start) and stop == start + DAY
        parts.append(Partition(f"{PARENT}_{start:%Y%m%d}" if whole else f"{PARENT}_{start:%Y%m%d_%H%M%S}", start, stop))
        start = stop
    return parts


def ready_until(partitions: list[Partition], now: datetime) -> datetime | None:
    """How far partitions reach without a gap from `now` (None: no partition holds now; MAXVALUE: datetime.max)."""
    reach: datetime | None = None
    for part in sorted(partitions, key=_lower_key):
        if part.detach_pending:
            continue
        if reach is None:
            if (part.lower is None or part.lower <= now) and (part.upper is None or part.upper > now):
                reach = part.upper or datetime.max.replace(tzinfo=timezone.utc)
        elif part.lower == reach:
            reach = part.upper or datetime.max.replace(tzinfo=timezone.utc)
    return reach


def read_partitions(conn: psycopg.Connection) -> list[Partition]:
    """The partitions of `positions`, lowest first; [] when it is not partitioned (not migrated)."""
    row = conn.execute(_PARTITIONED).fetchone()
    if not row or not row[0]:
        return []
    return [Partition(*row) for row in conn.execute(_PARTITIONS)]


@dataclass
class PassResult:
    plan: Plan
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # partition → error


def partitions_duty(settings: Settings, board: StatusBoard) -> Duty:
    """The maintenance process's duty: one pass every MAINTAIN_EVERY_S, on MIGRATION_DATABASE_URL,
    and one at once when a shard of this instance found a partition missing (dropped or
    detached by hand: its writes wait for it)."""
    missed = _MissedPartitions(board)
    return Duty(
        "partitions",
        MAINTAIN_EVERY_S,
        lambda: maintain(settings.migration_database_url, settings.positions_retention_days, settings.max_future_s),
        asked=missed.grew,
    )


class _MissedPartitions:
    """The shards' count of writes that found a partition missing (common/status.py), watched for growth."""

    def __init__(self, board: StatusBoard) -> None:
        self.board = board
        self.seen = self.total()

    def total(self) -> int:
        return sum(self.board.read(slot).partitions_missed for slot in range(self.board.slots))

    def grew(self) -> bool:
        total = self.total()
        grew, self.seen = total > self.seen, total
        return grew


def maintain(
    url: str, retention_days: int, max_future_s: float, now: datetime | None = None, *, ahead_only: bool = False
) -> PassResult | None:
    """One pass under the advisory lock; None when another instance holds it, positions is not
    partitioned, or this role may not change the schema (it then only warns of partitions running short).

    `ahead_only`: only the days beyond the newest partition are created (the supervisor's pass
    before it starts the shards); gaps and drops are left to the maintenance process."""
    with AnswerBounded.connect(
        url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, application_name="processor maintenance", **POOLER_SAFE
    ) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
        if ddl_refusal(conn) is not None:
            # A runtime-only instance (MIGRATION_DATABASE_URL unset): creating and dropping is the
            # owner's work, done by an instance or a job that has its URL; this one only watches.
            partitions = read_partitions(conn)
            if partitions:
                _report(PassResult(plan(partitions, now or datetime.now(timezone.utc), retention_days, max_future_s)),
                        partitions, max_future_s)
            return None
        if not conn.execute("SELECT pg_try_advisory_lock(%s)", (PARTITION_LOCK_KEY,)).fetchone()[0]:
            log.debug("partition maintenance skipped: another instance holds its lock")
            return None
        try:
            partitions = read_partitions(conn)
            if not partitions:
                return None
            result = PassResult(plan(partitions, now or datetime.now(timezone.utc), retention_days, max_future_s))
            if ahead_only:
                result = PassResult(_ahead(result.plan, partitions))
            for part in result.plan.create:
                _step(conn, result, part, _create, result.created)
            for part in result.plan.drop:
                _step(conn, result, part, _drop, result.dropped)
            _report(result, read_partitions(conn), max_future_s)
            return result
        finally:
            if not conn.closed:
                conn.execute("SELECT pg_advisory_unlock(%s)", (PARTITION_LOCK_KEY,))


def _ahead(full: Plan, partitions: list[Partition]) -> Plan:
    """Of a pass, only the days above every partition."""
    if any(p.upper is None for p in partitions):
        return replace(full, create=[], drop=[])  # one reaches MAXVALUE: nothing lies above
    top = max(p.upper for p in partitions if p.upper is not None)
    return replace(full, create=[p for p in full.create if p.lower is not None and p.lower >= top], drop=[])


def _step(conn: psycopg.Connection, result: PassResult, part: Partition, action, done: list[str]) -> None:  # type: ignore[no-untyped-def]
    """One partition's DDL; a failure of its own is logged and left to the next pass."""
    try:
        action(conn, part)
    except psycopg.Error as exc:
        if conn.broken or classify(exc) is Outcome.REFUSED:
            raise  # the maintenance process decides: an outage waits for the next turn, a refusal is exit 78
        result.failed[part.name] = one_line(exc)
        return
    done.append(part.name)


def _bound(value: datetime | None, infinite: str) -> sql.Composable:
    return sql.SQL(infinite) if value is None else sql.Literal(value)


def _create(conn: psycopg.Connection, part: Partition) -> None:
    """A table of its own, then ATTACHed: SHARE UPDATE EXCLUSIVE on positions, so writers go on."""
    name = sql.Identifier(part.name)
    with conn.transaction():
        conn.execute(
            sql.SQL("CREATE TABLE {} (LIKE positions INCLUDING DEFAULTS INCLUDING STORAGE INCLUDING COMPRESSION)").format(name)
        )
        conn.execute(
            sql.SQL("ALTER TABLE positions ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
                name, _bound(part.lower, "MINVALUE"), _bound(part.upper, "MAXVALUE")
            )
        )


# Recorded before the partition goes: a pass cut off after it leaves the floor a little high
# (harmless: the fixes below the horizon are not stored anyway), never too low.
_RAISE_FLOOR = """
INSERT INTO retention_floor (dropped_below) VALUES (%s)
ON CONFLICT (only_row) DO UPDATE SET dropped_below = greatest(retention_floor.dropped_below, EXCLUDED.dropped_below)
"""


def _drop(conn: psycopg.Connection, part: Partition) -> None:
    """DETACH … CONCURRENTLY (writers never wait; FINALIZE when an earlier pass was interrupted), then DROP.

    The floor of dropped history is raised first (migrations/0005_retention_floor.sql)."""
    conn.execute(_RAISE_FLOOR, (part.upper,))
    name = sql.Identifier(part.name)
    how = "FINALIZE" if part.detach_pending else "CONCURRENTLY"
    conn.execute(sql.SQL("ALTER TABLE positions DETACH PARTITION {} " + how).format(name))
    conn.execute(sql.SQL("DROP TABLE {}").format(name))


def _report(result: PassResult, partitions: list[Partition], max_future_s: float) -> None:
    plan_ = result.plan
    reach = ready_until(partitions, plan_.now)
    fields = {
        "partitions_created": result.created,
        "partitions_dropped": result.dropped,
        "horizon": plan_.horizon.isoformat() if plan_.horizon else None,
        "ready_until": reach.isoformat() if reach else None,
    }
    if result.failed:
        log.warning("partition maintenance left work for its next pass", extra={**fields, "failed": result.failed})
    elif result.created or result.dropped:
        log.info("partition maintenance", extra=fields)
    wanted = plan_.now + timedelta(seconds=max_future_s) + READY_ALERT_DAYS * DAY
    if reach is None or reach < wanted:
        log.error(
            "positions has partitions for less than a week ahead: fixes beyond them will stop the shards",
            extra={**fields, "see": "OPERATIONS.md, Retention"},
        )
