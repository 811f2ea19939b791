"""Partition maintenance of positions: the plan (pure), and passes against a real database."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from common.faults import Outcome, classify
from common.keys import PARTITION_LOCK_KEY
from supervisor.migrations import apply_migrations
from supervisor.partitions import DAY, DAYS_AHEAD, Partition, day_floor, maintain, plan, read_partitions, ready_until

UTC = timezone.utc
NOW = datetime(2026, 11, 30, 22, 15, tzinfo=UTC)


def days(first: datetime, count: int) -> list[Partition]:
    return [Partition(f"positions_{first + i * DAY:%Y%m%d}", first + i * DAY, first + (i + 1) * DAY) for i in range(count)]


def layout(cutover: datetime, count: int = 14) -> list[Partition]:
    """What migration 0003 makes: the far past below the cutover, then days."""
    return [Partition(f"positions_before_{cutover:%Y%m%d}", None, cutover), *days(cutover, count)]


def covered(parts: list[Partition], start: datetime, end: datetime) -> bool:
    """Whether every moment of [start, end) lies in exactly one partition."""
    moment = start
    while moment < end:
        holders = [p for p in parts if (p.lower is None or p.lower <= moment) and (p.upper is None or moment < p.upper)]
        if len(holders) != 1:
            return False
        moment += timedelta(hours=6)
    return True


# --- the plan ----------------------------------------------------------------------------


def test_plan_keeps_days_ready_past_the_latest_acceptable_fix() -> None:
    """Days reach DAYS_AHEAD days past the day of now + MAX_FUTURE_S; nothing is dropped while retention is 0."""
    result = plan(layout(datetime(2026, 12, 2, tzinfo=UTC)), NOW, 0, 300)
    assert result.ready_until == datetime(2026, 12, 1, tzinfo=UTC) + DAYS_AHEAD * DAY
    assert [p.name for p in result.create] == []  # the migration's 14 days from Dec 2 reach Dec 16 already
    later = plan(layout(datetime(2026, 12, 2, tzinfo=UTC)), NOW + 5 * DAY, 0, 86_400 * 3)
    assert [p.name for p in later.create] == [f"positions_{datetime(2026, 12, 16, tzinfo=UTC) + i * DAY:%Y%m%d}" for i in range(7)]
    assert later.drop == [] and later.horizon is None
    assert covered(layout(datetime(2026, 12, 2, tzinfo=UTC)) + later.create, datetime(1970, 1, 1, tzinfo=UTC), later.ready_until)


def test_plan_fills_gaps_and_recreates_a_missing_far_past() -> None:
    """A missing day in the middle is created, and without retention the far past below the lowest day too."""
    parts = days(datetime(2026, 11, 20, tzinfo=UTC), 30)
    del parts[5]
    result = plan(parts, NOW, 0, 300)
    names = [p.name for p in result.create]
    assert names[0] == "positions_before_20261120" and result.create[0].lower is None
    assert "positions_20261125" in names
    assert covered(parts + result.create, datetime(1970, 1, 1, tzinfo=UTC), result.ready_until)


def test_plan_drops_whole_days_beyond_the_horizon_plus_one() -> None:
    """With N days a partition goes once its upper bound is at or before the start of the day of now − N − 1 days."""
    parts = layout(datetime(2026, 11, 1, tzinfo=UTC), 45)
    result = plan(parts, NOW, 10, 300)
    assert result.horizon == NOW - 10 * DAY
    assert result.keep_from == datetime(2026, 11, 19, tzinfo=UTC)
    dropped = [p.name for p in result.drop]
    assert dropped[0] == "positions_before_20261101"
    assert dropped[-1] == "positions_20261118"  # ends Nov 19 = keep_from
    assert all(p.upper is not None and p.upper <= result.keep_from for p in result.drop)
    kept = [p for p in parts if p not in result.drop]
    assert min(p.lower for p in kept) == result.keep_from <= result.horizon - DAY
    assert result.create == []  # nothing below the kept days is needed: older fixes are expired


def test_plan_when_retention_grows_makes_one_partition_down_to_the_new_bound() -> None:
    """Raising POSITIONS_RETENTION_DAYS after drops: the range down to the new bound becomes one partition, not hundreds."""
    parts = days(datetime(2026, 11, 19, tzinfo=UTC), 30)
    result = plan(parts, NOW, 365, 300)
    assert result.create[0].name == "positions_before_20261119"
    assert (result.create[0].lower, result.create[0].upper) == (day_floor(NOW - 366 * DAY), datetime(2026, 11, 19, tzinfo=UTC))
    assert result.drop == []


def test_ready_until_follows_partitions_without_a_gap() -> None:
    parts = layout(datetime(2026, 12, 2, tzinfo=UTC))
    assert ready_until(parts, NOW) == datetime(2026, 12, 16, tzinfo=UTC)
    assert ready_until([p for p in parts if p.name != "positions_20261205"], NOW) == datetime(2026, 12, 5, tzinfo=UTC)
    assert ready_until(days(datetime(2026, 12, 5, tzinfo=UTC), 3), NOW) is None


# --- passes against Postgres ----------------------------------------------------------------


def connect(url: str) -> psycopg.Connection:
    conn = psycopg.connect(url, autocommit=True)
    conn.execute("SET TimeZone = 'UTC'")
    return conn


def test_a_pass_after_migration_keeps_days_ready_and_covers_the_far_past(database_url: str) -> None:
    """Right after migrating, a pass creates the days up to 14 past now + MAX_FUTURE_S; 1970 and now + 1 day have partitions."""
    apply_migrations(database_url)
    result = maintain(database_url, 0, 86_400)
    assert result is not None and result.failed == {}
    with connect(database_url) as conn:
        parts = read_partitions(conn)
        assert ready_until(parts, datetime.now(UTC)) >= datetime.now(UTC) + timedelta(days=DAYS_AHEAD + 1)
        conn.execute("INSERT INTO positions (device_id, ts, lat, lon) VALUES ('d', '1970-01-01Z', 0, 0), "
                     "('d', now() + interval '86390 seconds', 0, 0)")
    assert maintain(database_url, 0, 86_400).created == []  # nothing left to do


def test_retention_pass_drops_old_partitions_and_never_touches_derived_state(database_url: str) -> None:
    """Rows in partitions beyond the horizon go with their partitions; last_position and timing_records stay."""
    apply_migrations(database_url)
    with connect(database_url) as conn:
        parts = read_partitions(conn)
        cutover = parts[0].upper
        # A row in the far past and one an hour into each of the 14 days the migration made.
        conn.execute("INSERT INTO positions (device_id, ts, lat, lon) SELECT 'd', ts, 1, 2 FROM "
                     "generate_series(%s::timestamptz, %s::timestamptz, interval '1 day') ts "
                     "UNION ALL SELECT 'd', '1999-01-01Z', 1, 2", (cutover + timedelta(hours=1), cutover + 14 * DAY))
        conn.execute("INSERT INTO last_position (device_id, ts, lat, lon, odometer_m) VALUES ('d', %s, 1, 2, 1234.5)",
                     (cutover + 13 * DAY,))
        conn.execute("INSERT INTO geofences (name, geometry, radius_m) VALUES ('g', '{\"type\": \"Point\", \"coordinates\": [2, 1]}', 10)")
        conn.execute("INSERT INTO timing_records (device_id, geofence_id, entered_at, exited_at, samples) "
                     "SELECT 'd', id, %s, %s, 5 FROM geofences", (cutover + DAY, cutover + 2 * DAY))
        before = conn.execute("SELECT * FROM last_position").fetchall(), conn.execute("SELECT * FROM timing_records").fetchall()
    later = cutover + 20 * DAY + timedelta(hours=5)  # keeps 8 + 1 days: from cutover + 11 days on
    result = maintain(database_url, 8, 300, now=later)
    assert result is not None and result.failed == {}
    keep_from = cutover + 11 * DAY
    assert result.plan.keep_from == keep_from
    assert result.dropped == [parts[0].name] + [p.name for p in parts[1:12]]
    with connect(database_url) as conn:
        assert min(p.lower for p in read_partitions(conn)) == keep_from
        stored = [ts for (ts,) in conn.execute("SELECT ts FROM positions ORDER BY ts")]
        assert stored == [cutover + timedelta(days=day, hours=1) for day in (11, 12, 13)]
        assert conn.execute("SELECT * FROM last_position").fetchall() == before[0]
        assert conn.execute("SELECT * FROM timing_records").fetchall() == before[1]
        assert not conn.execute("SELECT count(*) FROM pg_class WHERE relname = ANY(%s)", (result.dropped,)).fetchone()[0]
        # Where history ends is kept, for late fixes once retention grows again (shard/devices/replay.py).
        assert conn.execute("SELECT dropped_below FROM retention_floor").fetchall() == [(keep_from,)]


def test_pass_is_skipped_while_another_instance_holds_the_lock(database_url: str) -> None:
    apply_migrations(database_url)
    with connect(database_url) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (PARTITION_LOCK_KEY,))
        assert maintain(database_url, 0, 300) is None
    assert maintain(database_url, 0, 300) is not None


def test_an_interrupted_detach_is_finalised_by_the_next_pass(database_url: str) -> None:
    """A partition left "detach pending" (a pass killed mid-way) is finalised and dropped."""
    apply_migrations(database_url)
    with connect(database_url) as conn:
        old = read_partitions(conn)[0]
        reader = psycopg.connect(database_url)  # an open snapshot makes DETACH CONCURRENTLY wait
        reader.execute("SELECT count(*) FROM positions")
        conn.execute("SET lock_timeout = '300ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            conn.execute(f'ALTER TABLE positions DETACH PARTITION "{old.name}" CONCURRENTLY')
        reader.close()
        assert [p.detach_pending for p in read_partitions(conn) if p.name == old.name] == [True]
    result = maintain(database_url, 1, 300, now=old.upper + 3 * DAY)
    assert old.name in result.dropped and result.failed == {}


def test_a_row_without_a_partition_is_an_outage_not_a_rejected_row(database_url: str) -> None:
    """Beyond the partitions Postgres says "no partition … found for row": the shards pause instead of dead-lettering."""
    apply_migrations(database_url)
    with connect(database_url) as conn:
        with pytest.raises(psycopg.errors.CheckViolation) as info:
            conn.execute("INSERT INTO positions (device_id, ts, lat, lon) VALUES ('d', now() + interval '400 days', 0, 0)")
        assert classify(info.value) is Outcome.OUTAGE
        conn.execute("ALTER TABLE positions ADD CONSTRAINT not_x CHECK (device_id <> 'x')")
        with pytest.raises(psycopg.errors.CheckViolation) as info:
            conn.execute("INSERT INTO positions (device_id, ts, lat, lon) VALUES ('x', now(), 0, 0)")
        assert classify(info.value) is Outcome.ROW_REJECTED


def test_the_maintenance_process_duty_runs_a_pass_on_the_migration_url(database_url: str, env: dict[str, str]) -> None:
    """The duty uses MIGRATION_DATABASE_URL, POSITIONS_RETENTION_DAYS and MAX_FUTURE_S of the settings."""
    from common.config import Settings
    from common.status import StatusBoard
    from supervisor.maintenance import _factories
    from supervisor.partitions import MAINTAIN_EVERY_S, partitions_duty

    assert partitions_duty in _factories()
    apply_migrations(database_url)
    settings = Settings.from_env({**env, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
                                  "MIGRATION_DATABASE_URL": database_url, "MAX_FUTURE_S": str(30 * 86_400)})
    duty = partitions_duty(settings, StatusBoard(1))
    assert (duty.name, duty.every_s) == ("partitions", MAINTAIN_EVERY_S)
    duty.run()
    with connect(database_url) as conn:
        assert ready_until(read_partitions(conn), datetime.now(UTC)) >= datetime.now(UTC) + 44 * DAY
