"""shard.devices against a real Postgres: the live path, late data, stale caches, rehydrate.

Each test drives `DeviceStates` the way the writer does (stage the fixes, apply, commit)
and compares what Postgres holds with a serial, in-order replay of the same fixes
(tests/e2e/fleet.py), which is what SPEC §5 requires.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson
import psycopg
import pytest
from psycopg.types.json import set_json_dumps, set_json_loads

from common.keys import DEVICE_LOCK_CLASS
from shard.decode import Fix, decode_entry
from shard.devices import Applied, CachedStateDirty, DeviceStates, bump_state_version
from shard.geofences import GeofenceSource
from shard.staging_rows import copy_data
from shard.writer import batch_transaction, stage
from supervisor.migrations import apply_migrations
from tests.e2e.fleet import Scenario, assert_same_result, build_scenario, insert_geofences, serial_replay, stored_result

T0_MS = 1_772_352_000_000  # 2026-03-01T08:00:00Z


def square(name: str, west: float, east: float) -> dict[str, Any]:
    ring = [[west, 0], [east, 0], [east, 1], [west, 1], [west, 0]]
    return {"name": name, "geometry": {"type": "Polygon", "coordinates": [ring]}, "radius_m": None}


# A covers lon 0..1, B lon 0.5..1.5, both lat 0..1: they overlap on lon 0.5..1.
GEOFENCES = [square("A", 0, 1), square("B", 0.5, 1.5)]


def point(device_id: str, seconds: int, lon: float, lat: float = 0.5, speed: float | None = None) -> dict[str, Any]:
    return {"device_id": device_id, "ts": T0_MS + seconds * 1000, "lat": lat, "lon": lon, "speed": speed}


def decoded(points: Sequence[dict[str, Any]]) -> list[Fix]:
    return [decode_entry({b"data": orjson.dumps(p)}) for p in points]


@pytest.fixture
def migrated(database_url: str) -> str:
    apply_migrations(database_url)
    insert_geofences(database_url, GEOFENCES)
    return database_url


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[tuple[psycopg.AsyncConnection, GeofenceSource]]:
    """A connection set up as the writer's, and a shard's geofence source, loaded as at start-up."""
    source = GeofenceSource(url, "test")
    await source.refresh()
    await source.close()
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    set_json_dumps(orjson.dumps, context=conn)
    set_json_loads(orjson.loads, context=conn)
    try:
        yield conn, source
    finally:
        await conn.close()


class RolledBack(Exception):
    pass


async def write(
    conn: psycopg.AsyncConnection, states: DeviceStates, geofences: GeofenceSource, points: Sequence[dict[str, Any]],
    *, roll_back: bool = False,
) -> Applied:
    """One batch, as the writer runs it; `roll_back` fails its transaction after the apply."""
    fixes = decoded(points)
    with states.batch(fixes) as batch:
        async with batch_transaction(conn) as cur:
            await stage(cur, copy_data(fixes, batch.cached_versions()))
            applied = await batch.apply(cur, geofences)
            if roll_back:
                raise RolledBack
    return applied


def expected(points: Sequence[dict[str, Any]]) -> tuple[list[tuple], dict[str, float]]:
    return serial_replay(Scenario([], GEOFENCES, list(points)))


def version(url: str, device_id: str) -> int | None:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT state_version FROM last_position WHERE device_id = %s", (device_id,)).fetchone()
    return row[0] if row else None


def open_visits(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT t.device_id, g.name FROM timing_records t JOIN geofences g ON g.id = t.geofence_id"
            " WHERE t.exited_at IS NULL ORDER BY 1, 2"
        ).fetchall()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def test_live_path_advances_the_odometer_and_opens_and_closes_visits(migrated: str) -> None:
    """In-order batches: the cached state is used (nothing reloaded), visits open and close, versions go up."""
    first = [point("d1", 0, -0.5), point("d1", 10, 0.25, speed=20.0), point("d2", 0, 3.0), point("d2", 10, 3.1, lat=0.6)]
    second = [point("d1", 20, 0.75, lat=0.4, speed=35.0), point("d1", 30, 1.75), point("d2", 20, 3.2)]

    async def run() -> tuple[Applied, Applied]:
        async with connected(migrated) as (conn, geofences):
            states = DeviceStates(100)
            applied = await write(conn, states, geofences, first)
            assert open_visits(migrated) == [("d1", "A")]
            return applied, await write(conn, states, geofences, second)

    one, two = asyncio.run(run())
    assert (one.reloaded, one.late, one.changed, one.visits) == (frozenset(), frozenset(), {"d1", "d2"}, 1)
    assert (two.reloaded, two.late, two.changed, two.visits) == (frozenset(), frozenset(), {"d1", "d2"}, 2)
    assert open_visits(migrated) == []
    assert (version(migrated, "d1"), version(migrated, "d2")) == (2, 2)
    rows, odometers = expected(first + second)
    assert [(r[0], r[1], r[8]) for r in rows] == [("d1", "A", 2), ("d1", "B", 1)]
    assert_same_result(stored_result(migrated), (rows, odometers))


@pytest.mark.parametrize("speed", [1e-46, 1.4e-45, 3.4028234663852886e38, 0.1])
def test_a_visit_stores_any_valid_speed_as_its_real(migrated: str, speed: float) -> None:
    """A speed beyond float4's precision or range below is stored as the real it rounds to
    (0 for one too small), never failing the batch with an underflow."""
    points = [point("d1", 0, -0.5), point("d1", 10, 0.25, speed=speed)]

    async def run() -> Applied:
        async with connected(migrated) as (conn, geofences):
            return await write(conn, DeviceStates(100), geofences, points)

    assert asyncio.run(run()).visits == 1
    with psycopg.connect(migrated) as conn:
        (max_speed,) = conn.execute("SELECT max_speed FROM timing_records", binary=True).fetchone()  # type: ignore[misc]
        (last_speed,) = conn.execute("SELECT speed FROM last_position", binary=True).fetchone()  # type: ignore[misc]
    as_float4 = struct.unpack("f", struct.pack("f", speed))[0]
    assert max_speed == last_speed == as_float4


@pytest.mark.usefixtures("visit_deletion")
def test_late_fixes_are_replayed_to_what_an_in_order_pass_gives(migrated: str) -> None:
    """Fixes older than the device's newest (one inside B, one before all) rewrite visits and odometer."""
    on_time = [point("d1", s, lon, lat) for s, lon, lat in ((10, -0.5, 0.5), (20, 0.25, 0.5), (30, 0.3, 0.6), (50, 0.4, 0.5), (60, -0.2, 0.4))]
    late = [point("d1", 40, 0.9, 0.2, speed=50.0), point("d1", 0, -1.0, 0.9), point("d2", 0, 5.0)]
    resent = [point("d1", 20, 0.25, 0.5)]

    async def run() -> Applied:
        async with connected(migrated) as (conn, geofences):
            states = DeviceStates(100)
            await write(conn, states, geofences, on_time)
            return await write(conn, states, geofences, late + resent)

    applied = asyncio.run(run())
    assert (applied.late, applied.changed) == ({"d1"}, {"d1", "d2"})
    rows, odometers = expected(on_time + late)
    assert [(r[0], r[1], r[8]) for r in rows] == [("d1", "A", 4), ("d1", "B", 1)]
    assert_same_result(stored_result(migrated), (rows, odometers))


@pytest.mark.usefixtures("visit_deletion", "device_lookup")
def test_a_fleet_split_between_two_shards_equals_a_serial_replay(database_url: str) -> None:
    """Round-robin, late uploads and resent fixes, batches alternating between two shards' caches."""
    apply_migrations(database_url)
    scenario = build_scenario(devices=6, per_device=260, late_devices=2, seed=11)
    insert_geofences(database_url, scenario.geofences)
    points = [orjson.loads(entry) for entry in scenario.entries]

    async def run() -> list[Applied]:
        async with connected(database_url) as (conn_a, geofences), connected(database_url) as (conn_b, _):
            shards = [(conn_a, DeviceStates(100)), (conn_b, DeviceStates(100))]
            done = []
            for n, start in enumerate(range(0, len(points), 97)):
                conn, states = shards[n % 2]
                done.append(await write(conn, states, geofences, points[start : start + 97]))
            return done

    applied = asyncio.run(run())
    assert_same_result(stored_result(database_url), serial_replay(scenario))
    assert any(a.late for a in applied) and all(a.reloaded for a in applied[1:])  # the other shard moved them


@pytest.mark.usefixtures("device_lookup")
def test_a_stale_cached_state_is_not_used(migrated: str) -> None:
    """Shard B moves the device on; shard A's cached copy is then stale and reloaded, not continued."""
    zigzag = [point("d1", s * 10, -0.6 + s * 0.3, lat=0.2 + 0.6 * (s % 2)) for s in range(6)]

    shard_a, shard_b = DeviceStates(100), DeviceStates(100)

    async def run() -> list[Applied]:
        async with connected(migrated) as (conn_a, geofences), connected(migrated) as (conn_b, _):
            return [
                await write(conn_a, shard_a, geofences, zigzag[:2]),
                await write(conn_b, shard_b, geofences, zigzag[2:4]),
                await write(conn_a, shard_a, geofences, zigzag[4:]),
            ]

    a1, b, a2 = asyncio.run(run())
    assert shard_a.counts["devices_reloaded"] == shard_b.counts["devices_reloaded"] == 1  # what the shard logs
    assert_same_result(stored_result(migrated), expected(zigzag))
    assert (a1.reloaded, b.reloaded, a2.reloaded) == (frozenset(), {"d1"}, {"d1"})
    assert version(migrated, "d1") == 3


def test_a_rehydrate_bump_makes_the_next_batch_reload_a_correction(migrated: str) -> None:
    """An operator's SQL correction plus bump_state_version: the cached copy is dropped for the truth."""
    track = [point("d1", 0, 3.0), point("d1", 10, 3.1), point("d1", 20, 3.2)]

    async def run() -> Applied:
        async with connected(migrated) as (conn, geofences):
            states = DeviceStates(100)
            await write(conn, states, geofences, track[:2])
            with psycopg.connect(migrated) as operator:
                operator.execute("UPDATE last_position SET odometer_m = 1000 WHERE device_id = 'd1'")
                assert bump_state_version(operator, "d1") == 2
            return await write(conn, states, geofences, track[2:])

    applied = asyncio.run(run())
    _, odometers = stored_result(migrated)
    _, steps = expected(track[1:])
    assert odometers["d1"] == pytest.approx(1000 + steps["d1"], rel=1e-12)
    assert applied.reloaded == {"d1"}
    assert version(migrated, "d1") == 3


def test_a_rolled_back_batch_leaves_nothing_behind(migrated: str) -> None:
    """A batch whose transaction fails changes neither Postgres nor what the next batch starts from."""
    track = [point("d1", s * 10, s * 0.3 - 0.4, lat=0.3 + 0.1 * s) for s in range(5)]

    states = DeviceStates(100)

    async def run() -> Applied:
        async with connected(migrated) as (conn, geofences):
            await write(conn, states, geofences, track[:2])
            with pytest.raises(RolledBack):
                await write(conn, states, geofences, [point("d1", 15, 9.0)], roll_back=True)
            return await write(conn, states, geofences, track[2:])

    applied = asyncio.run(run())
    assert applied.reloaded == {"d1"}
    assert states.counts["devices_replayed"] == 0, "a rolled-back batch's late fix is not counted"
    assert_same_result(stored_result(migrated), expected(track))


def test_bump_state_version_under_the_device_lock(migrated: str) -> None:
    """Known device: version + 1, lock held until the caller commits. Unknown: None, no row made."""

    async def seed() -> None:
        async with connected(migrated) as (conn, geofences):
            await write(conn, DeviceStates(100), geofences, [point("d1", 0, 3.0)])

    asyncio.run(seed())
    with psycopg.connect(migrated) as conn, psycopg.connect(migrated, autocommit=True) as other:
        try_lock = "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))"
        assert bump_state_version(conn, "d1") == 2
        assert other.execute(try_lock, (DEVICE_LOCK_CLASS, "d1")).fetchone() == (False,)
        conn.commit()
        assert other.execute(try_lock, (DEVICE_LOCK_CLASS, "d1")).fetchone() == (True,)
        assert bump_state_version(conn, "ghost") is None
        conn.commit()
    assert (version(migrated, "d1"), version(migrated, "ghost")) == (2, None)


@pytest.mark.usefixtures("visit_deletion")
def test_late_devices_of_one_batch_replay_through_one_prefetch(migrated: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Devices outside every visit take the batch's one prefetch; one inside a visit, and one whose late
    fix precedes all its history, take the step-by-step path: all end as an in-order pass gives."""
    from shard.devices import replay, states

    seen: list[tuple[int, int]] = []

    async def spy(cur, late):  # type: ignore[no-untyped-def]
        found = await replay.prefetch_replays(cur, late)
        seen.append((len(late), len(found)))
        return found

    monkeypatch.setattr(states, "prefetch_replays", spy)
    outside = [point(f"o{n}", s, -5.0 - n, lat=0.1 * s) for n in range(3) for s in (10, 20, 30, 40)]
    inside = [point("in", s, 0.7) for s in (10, 20, 30)]  # in A and B from the first fix on
    first = [point("first", s, -9.0, lat=s / 100) for s in (20, 30)]
    late = [point(f"o{n}", 25, -5.5 - n, lat=3.0) for n in range(3)] + [point("in", 25, 0.8), point("first", 5, -9.5)]

    async def run() -> Applied:
        async with connected(migrated) as (conn, geofences):
            states_ = DeviceStates(100)
            await write(conn, states_, geofences, outside + inside + first)
            return await write(conn, states_, geofences, late)

    applied = asyncio.run(run())
    assert applied.late == {"o0", "o1", "o2", "in", "first"}
    assert seen == [(5, 3)], "three devices prefetched, two on the step-by-step path"
    assert_same_result(stored_result(migrated), expected(outside + inside + first + late))


def test_a_state_changed_in_place_by_an_uncommitted_batch_is_not_trusted(migrated: str) -> None:
    """Two batches in flight (shard/pipeline.py): the later picked the cached state before the
    earlier changed it in place and rolled back. Its version still matches Postgres's, yet the
    later batch must not derive from it; written again, it gives the serial result."""
    track = [point("d1", s * 10, s * 0.3 - 0.4, lat=0.3 + 0.1 * s) for s in range(5)]

    async def run() -> Applied:
        async with connected(migrated) as (conn, geofences), connected(migrated) as (other, _):
            states = DeviceStates(100)
            await write(conn, states, geofences, track[:2])
            later_fixes = decoded(track[2:])
            with pytest.raises(CachedStateDirty):
                with states.batch(later_fixes) as later:
                    staged = copy_data(later_fixes, later.cached_versions())  # picked: the committed version
                    with pytest.raises(RolledBack):
                        await write(other, states, geofences, [point("d1", 15, 9.0)], roll_back=True)
                    async with batch_transaction(conn) as cur:
                        await stage(cur, staged)
                        await later.apply(cur, geofences)
            return await write(conn, states, geofences, track[2:])

    applied = asyncio.run(run())
    assert applied.reloaded == {"d1"}
    assert_same_result(stored_result(migrated), expected(track))
