"""Retention as a shard sees it: expired fixes, the edges of the accepted range, late data after a drop."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone

import psycopg
from psycopg import sql

from common.config import Settings
from common.status import StatusBoard
from shard.lifecycle import Shard
from supervisor.migrations import apply_migrations
from tests.shard.test_pipeline import fix, read_as, run_pipeline

DAY_MS = 86_400_000
CIRCLE = '{"type": "Point", "coordinates": [7.0, 45.0]}'  # around every fix() at lat 45, lon 7


def now_ms() -> int:
    return int(time.time() * 1000)


def derived(url: str) -> tuple[list[tuple], list[tuple]]:
    with psycopg.connect(url) as conn:
        return (
            conn.execute("SELECT device_id, ts, odometer_m, state_version, updated_at FROM last_position ORDER BY 1").fetchall(),
            conn.execute("SELECT device_id, entered_at, exited_at, samples FROM timing_records ORDER BY 1, 2").fetchall(),
        )


def stored(url: str, device: str) -> list[int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT (extract(epoch FROM ts) * 1000)::bigint FROM positions WHERE device_id = %s ORDER BY 1",
                            (device,)).fetchall()
    return [ms for (ms,) in rows]


def test_a_fix_older_than_the_horizon_is_expired(redis_client, database_url, stream_key, env, caplog) -> None:
    """Older than POSITIONS_RETENTION_DAYS: not stored, no derived state, acknowledged, counted, logged by device, no letter."""
    settings = Settings.from_env({**env, "POSITIONS_RETENTION_DAYS": "30"})
    apply_migrations(database_url)
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO geofences (name, geometry, radius_m) VALUES ('depot', %s, 1000)", (CIRCLE,))
    now = now_ms()
    first = read_as(redis_client, stream_key, "t-0", [{b"data": fix("d1", now - 2 * DAY_MS, lat=46.0)},
                                                     {b"data": fix("d1", now - DAY_MS, lat=46.5)}])
    board = StatusBoard(1)
    run_pipeline(Shard(settings, 0, board, consumer="t-0"), [first])
    before = derived(database_url)

    for device, ts, lat in (("d1", now - 31 * DAY_MS, 45.0), ("d1", now - 40 * DAY_MS, 45.0), ("d3", now - 29 * DAY_MS, 46.2)):
        redis_client.xadd(stream_key, {b"data": fix(device, ts, lat=lat)})
    redis_client.xadd(stream_key, {b"data": fix("d2", 0)})  # 1970
    late = redis_client.xreadgroup("processor", "t-0", {stream_key: ">"}, count=100)[0][1]
    shard = Shard(settings, 0, board, consumer="t-0")
    with caplog.at_level(logging.WARNING, logger="processor.shard"):
        run_pipeline(shard, [late])

    assert stored(database_url, "d1") == [now - 2 * DAY_MS, now - DAY_MS]
    assert stored(database_url, "d2") == []
    assert stored(database_url, "d3") == [now - 29 * DAY_MS]  # within the horizon: stored
    assert (shard.report.expired, shard.report.processed) == (3, 1)
    assert board.read(0).expired == 3
    assert redis_client.xlen(f"{stream_key}:dlq") == 0
    assert redis_client.xpending(stream_key, "processor")["pending"] == 0
    after = derived(database_url)
    assert after[1] == before[1] == []  # the expired fixes lay in the depot: no visit came of them
    assert [row for row in after[0] if row[0] == "d1"] == before[0]  # d1's ts, odometer and version untouched
    assert [row[0] for row in after[0]] == ["d1", "d3"]  # d2 was never stored
    lines = [r for r in caplog.records if r.getMessage() == "fixes older than the retention horizon were not stored"]
    assert sorted((r.device_id, r.fixes) for r in lines) == [("d1", 2), ("d2", 1)]


def test_the_far_past_and_just_under_max_future_s_are_stored(redis_client, database_url, stream_key, settings: Settings) -> None:
    """Both ends of the accepted range find a partition: 1970 and now + MAX_FUTURE_S − a few seconds."""
    apply_migrations(database_url)
    ahead = now_ms() + int(settings.max_future_s * 1000) - 5_000
    entries = read_as(redis_client, stream_key, "t-0", [{b"data": fix("edge", 0)}, {b"data": fix("edge", ahead)}])
    shard = Shard(settings, 0, StatusBoard(1), consumer="t-0")
    run_pipeline(shard, [entries])
    assert stored(database_url, "edge") == [0, ahead]
    assert shard.report.dead_lettered == 0


def _visit_history(redis_client, database_url, stream_key, settings, fixes: list[tuple[int, float]]) -> Shard:
    """Process (ts, lat) fixes of device p in order, with a 1 km circle around lat 45, lon 7."""
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO geofences (name, geometry, radius_m) VALUES ('depot', %s, 1000)", (CIRCLE,))
    entries = read_as(redis_client, stream_key, "t-0", [{b"data": fix("p", ts, lat=lat)} for ts, lat in fixes])
    shard = Shard(settings, 0, StatusBoard(1), consumer="t-0")
    run_pipeline(shard, [entries])
    return shard


def _drop_before(database_url: str, ms: int) -> None:
    """What retention leaves behind: no partition, and no row, below `ms` (the floor)."""
    floor = datetime.fromtimestamp(ms / 1000, timezone.utc)
    with psycopg.connect(database_url, autocommit=True) as conn:
        (old,) = conn.execute("SELECT relname FROM pg_class WHERE relname LIKE 'positions_before_%'").fetchone()
        cutover = datetime.strptime(old[-8:], "%Y%m%d").replace(tzinfo=timezone.utc)
        conn.execute(f'ALTER TABLE positions DETACH PARTITION "{old}"')
        conn.execute(sql.SQL("CREATE TABLE kept PARTITION OF positions FOR VALUES FROM ({}) TO ({})").format(
            sql.Literal(floor), sql.Literal(cutover)))
        conn.execute(f'INSERT INTO positions SELECT * FROM "{old}" WHERE ts >= %s', (floor,))
        conn.execute(f'DROP TABLE "{old}"')


def _visits(database_url: str) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT entered_at, exited_at, samples FROM timing_records WHERE device_id = 'p' ORDER BY 1").fetchall()


def test_a_late_fix_inside_a_visit_whose_start_was_dropped_keeps_the_visit(
    redis_client, database_url, stream_key, settings: Settings, caplog
) -> None:
    """A device parked in a geofence longer than retention: a late fix is stored, its visit is not rewritten, newer fixes still count."""
    apply_migrations(database_url)
    t = now_ms() - 10 * DAY_MS
    _visit_history(redis_client, database_url, stream_key, settings,
                   [(t, 46.0), (t + DAY_MS, 45.0), (t + 2 * DAY_MS, 45.0), (t + 8 * DAY_MS, 45.0)])
    (entered, exited, samples), = _visits(database_url)
    assert (exited, samples) == (None, 3)
    _drop_before(database_url, t + 2 * DAY_MS)
    for ts in (t + 5 * DAY_MS, t + 9 * DAY_MS):  # one late fix inside, one newer than the device's last
        redis_client.xadd(stream_key, {b"data": fix("p", ts)})
    entries = redis_client.xreadgroup("processor", "t-0", {stream_key: ">"}, count=10)[0][1]
    with caplog.at_level(logging.WARNING, logger="processor.writer"):
        run_pipeline(Shard(settings, 0, StatusBoard(1), consumer="t-0"), [entries])
    assert stored(database_url, "p") == [t + 2 * DAY_MS, t + 5 * DAY_MS, t + 8 * DAY_MS, t + 9 * DAY_MS]
    assert _visits(database_url) == [(entered, None, 4)]  # the same visit; the newer fix counted, the late one not
    assert any(r.getMessage().startswith("late fix reaches history that retention dropped") for r in caplog.records)


def test_a_late_fix_with_no_stored_predecessor_keeps_older_visits(redis_client, database_url, stream_key, settings: Settings) -> None:
    """With dropped partitions, a replay from the device's first stored fix replaces only visits entered above the floor."""
    apply_migrations(database_url)
    t = now_ms() - 10 * DAY_MS
    _visit_history(redis_client, database_url, stream_key, settings,
                   [(t, 45.0), (t + DAY_MS, 46.0), (t + 3 * DAY_MS, 46.0), (t + 5 * DAY_MS, 45.0), (t + 6 * DAY_MS, 46.0)])
    old = _visits(database_url)
    assert [samples for _, _, samples in old] == [1, 1]
    _drop_before(database_url, t + 2 * DAY_MS + DAY_MS // 2)  # the day-0 visit's fixes are gone, the visit stays
    redis_client.xadd(stream_key, {b"data": fix("p", t + 2 * DAY_MS + DAY_MS * 7 // 10, lat=46.0)})  # before every stored fix
    entries = redis_client.xreadgroup("processor", "t-0", {stream_key: ">"}, count=10)[0][1]
    run_pipeline(Shard(settings, 0, StatusBoard(1), consumer="t-0"), [entries])
    assert _visits(database_url) == old  # the visit of day 0 stays, the one of day 5 is replayed to the same row
    start = datetime.fromtimestamp(t / 1000, timezone.utc)
    assert old[0][0] == start and old[1][0] == start + timedelta(days=5)


def test_history_dropped_before_retention_grew_back_is_still_known_as_dropped(
    redis_client, database_url, stream_key, settings: Settings
) -> None:
    """Retention raised (or set to 0) after a drop: maintenance makes a partition below the dropped
    range again, yet a late fix landing there must not replay (and delete) the visits of history
    that is gone: the floor maintenance recorded when it dropped still holds."""
    apply_migrations(database_url)
    t = now_ms() - 10 * DAY_MS
    _visit_history(redis_client, database_url, stream_key, settings,
                   [(t, 45.0), (t + DAY_MS, 46.0), (t + 3 * DAY_MS, 46.0), (t + 5 * DAY_MS, 45.0), (t + 6 * DAY_MS, 46.0)])
    old = _visits(database_url)
    _regrown_below(database_url, t + 2 * DAY_MS + DAY_MS // 2)
    redis_client.xadd(stream_key, {b"data": fix("p", t + 2 * DAY_MS, lat=46.0)})  # below the floor, before every stored fix
    entries = redis_client.xreadgroup("processor", "t-0", {stream_key: ">"}, count=10)[0][1]
    run_pipeline(Shard(settings, 0, StatusBoard(1), consumer="t-0"), [entries])
    assert stored(database_url, "p")[0] == t + 2 * DAY_MS
    assert _visits(database_url) == old, "the visits of dropped history are kept as they were"


def _crossings(database_url: str) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT entered_at, entry_crossing_at, exited_at, exit_crossing_at, samples FROM timing_records "
                            "WHERE device_id = 'p' ORDER BY 1").fetchall()


def test_a_late_fix_after_a_visit_entered_at_the_first_kept_fix_keeps_its_entry_crossing(
    redis_client, database_url, stream_key, settings: Settings
) -> None:
    """The visit's entry crossing was interpolated from a fix retention dropped since: the replay starts
    at the first kept fix with that visit open as stored, and keeps the crossing (it used to replay from
    the first kept fix as if nothing came before it, and wrote the crossing as unknown)."""
    apply_migrations(database_url)
    t = now_ms() - 10 * DAY_MS
    _visit_history(redis_client, database_url, stream_key, settings,
                   [(t, 45.02), (t + DAY_MS, 45.0), (t + 3 * DAY_MS, 45.0), (t + 5 * DAY_MS, 46.0)])
    (entered, entry, exited, exit_, samples), = _crossings(database_url)
    assert entry is not None and exited is not None and samples == 2
    _drop_before(database_url, t + DAY_MS // 2)
    redis_client.xadd(stream_key, {b"data": fix("p", t + 2 * DAY_MS)})  # late, inside the visit
    entries = redis_client.xreadgroup("processor", "t-0", {stream_key: ">"}, count=10)[0][1]
    run_pipeline(Shard(settings, 0, StatusBoard(1), consumer="t-0"), [entries])
    assert _crossings(database_url) == [(entered, entry, exited, exit_, 3)]


def test_a_late_fix_below_the_floor_leaves_the_visits_of_dropped_history_alone(
    redis_client, database_url, stream_key, settings: Settings, caplog
) -> None:
    """Retention set back to 0 after a drop: a late fix lands in the regrown far past, inside a visit of
    dropped history. It is stored; no replay adds a second visit overlapping the kept one."""
    apply_migrations(database_url)
    t = now_ms() - 10 * DAY_MS
    _visit_history(redis_client, database_url, stream_key, settings,
                   [(t, 45.0), (t + DAY_MS // 2, 45.0), (t + DAY_MS, 46.0), (t + 3 * DAY_MS, 46.0), (t + 9 * DAY_MS, 46.0)])
    old = _crossings(database_url)
    assert [samples for *_, samples in old] == [2]
    _regrown_below(database_url, t + 2 * DAY_MS)
    redis_client.xadd(stream_key, {b"data": fix("p", t + DAY_MS // 4)})  # inside the visit of dropped history
    entries = redis_client.xreadgroup("processor", "t-0", {stream_key: ">"}, count=10)[0][1]
    with caplog.at_level(logging.WARNING, logger="processor.writer"):
        run_pipeline(Shard(settings, 0, StatusBoard(1), consumer="t-0"), [entries])
    assert stored(database_url, "p") == [t + DAY_MS // 4, t + 3 * DAY_MS, t + 9 * DAY_MS]
    assert _crossings(database_url) == old
    assert any(r.getMessage().startswith("late fix reaches history that retention dropped") for r in caplog.records)


def test_a_batch_with_late_fixes_on_both_sides_of_the_floor_replays_those_above_it(
    redis_client, database_url, stream_key, settings: Settings, caplog
) -> None:
    """One late fix below the floor and one above it, in one batch: the first is stored and left out,
    the second is replayed as it would be alone (it used to be skipped with the first)."""
    apply_migrations(database_url)
    t = now_ms() - 10 * DAY_MS
    _visit_history(redis_client, database_url, stream_key, settings,
                   [(t, 45.0), (t + DAY_MS // 2, 45.0), (t + DAY_MS, 46.0), (t + 3 * DAY_MS, 46.0),
                    (t + 5 * DAY_MS, 46.0), (t + 9 * DAY_MS, 46.0)])
    old = _crossings(database_url)
    _regrown_below(database_url, t + 2 * DAY_MS)
    for ts in (t + DAY_MS // 4, t + 4 * DAY_MS):  # below the floor, inside; above it, inside
        redis_client.xadd(stream_key, {b"data": fix("p", ts)})
    entries = redis_client.xreadgroup("processor", "t-0", {stream_key: ">"}, count=10)[0][1]
    with caplog.at_level(logging.WARNING, logger="processor.writer"):
        run_pipeline(Shard(settings, 0, StatusBoard(1), consumer="t-0"), [entries])
    start = datetime.fromtimestamp(t / 1000, timezone.utc)
    (kept, (entered, _, exited, _, samples)) = _crossings(database_url)
    assert kept == old[0]
    assert (entered, exited, samples) == (start + timedelta(days=4), start + timedelta(days=5), 1)
    assert any(r.getMessage().startswith("late fix reaches history that retention dropped") for r in caplog.records)


def test_a_late_fix_after_a_visit_that_ended_at_the_first_kept_fix_is_replayed_exactly(
    redis_client, database_url, stream_key, settings: Settings
) -> None:
    """A visit entered in dropped history and left at the first kept fix is closed there: a late fix
    after it is replayed from that fix, exactly (the visit's exit crossing, from a dropped fix, kept)."""
    apply_migrations(database_url)
    t = now_ms() - 10 * DAY_MS
    _visit_history(redis_client, database_url, stream_key, settings,
                   [(t, 45.0), (t + DAY_MS, 46.0), (t + 3 * DAY_MS, 46.0), (t + 5 * DAY_MS, 46.0)])
    old = _crossings(database_url)
    _drop_before(database_url, t + DAY_MS // 2)
    redis_client.xadd(stream_key, {b"data": fix("p", t + 2 * DAY_MS)})  # late, inside
    entries = redis_client.xreadgroup("processor", "t-0", {stream_key: ">"}, count=10)[0][1]
    run_pipeline(Shard(settings, 0, StatusBoard(1), consumer="t-0"), [entries])
    start = datetime.fromtimestamp(t / 1000, timezone.utc)
    (kept, (entered, entry, exited, _, samples)) = _crossings(database_url)
    assert kept == old[0]
    assert (entered, exited, samples) == (start + timedelta(days=2), start + timedelta(days=3), 1)
    assert entry is not None and start + timedelta(days=1) < entry < entered


def _regrown_below(database_url: str, floor_ms: int) -> None:
    """Retention dropped everything below `floor_ms`, then was set back to 0: the far past regrown, the floor recorded."""
    floor = datetime.fromtimestamp(floor_ms / 1000, timezone.utc)
    _drop_before(database_url, floor_ms)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO retention_floor (dropped_below) VALUES (%s)", (floor,))  # as maintenance's drop does
        conn.execute(sql.SQL("CREATE TABLE regrown PARTITION OF positions FOR VALUES FROM (MINVALUE) TO ({})").format(sql.Literal(floor)))
