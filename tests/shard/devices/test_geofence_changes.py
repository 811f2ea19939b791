"""Geofence changes reach every batch at the revision committed before it (shard/geofences.py).

Shards hold geofence indexes of different ages; whichever writes a device next must derive
with the geofences committed before its post-lock statement, so that the device's visits
equal a serial replay that applies each change at its commit (tests/e2e/fleet.py's
`timeline_replay`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import psycopg
import pytest

from common.keys import DEVICE_LOCK_CLASS
from shard.devices import DeviceStates
from supervisor.migrations import apply_migrations
from tests.e2e.fleet import assert_same_result, stored_result, timeline_replay
from tests.e2e.processes import wait_for
from tests.shard.devices.test_states import connected, point, square, write

C = square("C", 2, 3)


def import_c(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO geofences (name, geometry, radius_m) VALUES (%s, %s, NULL)",
            (C["name"], orjson.dumps(C["geometry"]).decode()),
        )


def set_active(url: str, active: bool) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE geofences SET active = %s WHERE name = 'C'", (active,))


def revision(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT revision FROM geofence_revision").fetchone()[0]  # type: ignore[index]


def names(rows: list[tuple]) -> list[tuple[Any, ...]]:
    """(device, geofence, entered_at seconds, exited_at seconds, samples) of each visit."""
    t0 = point("d1", 0, 0)["ts"] / 1000
    seconds = lambda t: None if t is None else round(t.timestamp() - t0)  # noqa: E731
    return [(r[0], r[1], seconds(r[2]), seconds(r[3]), r[8]) for r in rows]


def test_a_shard_with_an_older_index_uses_the_geofence_imported_before_its_batch(database_url: str) -> None:
    """Shard A loaded its index before C was imported, shard B after: A's batch still times C."""
    apply_migrations(database_url)
    track = [point("d1", s * 10, lon, speed=float(s)) for s, lon in enumerate((1.7, 2.2, 2.5, 2.8, 3.4, 2.6))]

    async def run() -> list[int]:
        async with connected(database_url) as (conn_a, old):
            before = old.index.revision
            import_c(database_url)
            async with connected(database_url) as (conn_b, new):
                assert (old.index.revision, new.index.revision) == (before, before + 1)
                shard_a, shard_b = DeviceStates(100), DeviceStates(100)
                b1 = await write(conn_b, shard_b, new, track[:2])  # enters C
                a = await write(conn_a, shard_a, old, track[2:4])  # inside: the visit goes on
                b2 = await write(conn_b, shard_b, new, track[4:])  # leaves and enters again
                assert old.index.revision == before + 1, "the source keeps the index the batch loaded"
                assert len(old.index) == 1
                return [b1.revision, a.revision, b2.revision]

    assert asyncio.run(run()) == [revision(database_url)] * 3
    stored = stored_result(database_url)
    assert names(stored[0]) == [("d1", "C", 10, 40, 3), ("d1", "C", 50, None, 1)]
    assert_same_result(stored, timeline_replay(track, [(None, [C])]))


@pytest.mark.usefixtures("visit_deletion")
def test_deactivation_and_reactivation_take_effect_at_the_next_batch_whatever_its_shard_holds(database_url: str) -> None:
    """Both shards hold C; it is deactivated, then reactivated, between batches written by stale shards.

    A deactivated geofence closes the open visit at the device's next fix, without a
    crossing; reactivated, the next fix inside opens a new visit.
    """
    apply_migrations(database_url)
    import_c(database_url)
    track = [point("d1", s * 10, lon) for s, lon in enumerate((1.5, 2.2, 2.4, 2.6, 2.7, 2.8, 2.9))]
    changes: list[int | None] = [None]

    async def run() -> None:
        async with connected(database_url) as (conn_a, source_a), connected(database_url) as (conn_b, source_b):
            shard_a, shard_b = DeviceStates(100), DeviceStates(100)
            await write(conn_a, shard_a, source_a, track[:3])  # enters C at 10 s
            set_active(database_url, False)
            changes.append(track[3]["ts"])
            await write(conn_b, shard_b, source_b, track[3:4])  # B held C: closes the visit at 30 s
            await write(conn_a, shard_a, source_a, track[4:5])  # A held C too: no new visit
            set_active(database_url, True)
            changes.append(track[5]["ts"])
            await write(conn_a, shard_a, source_a, track[5:])  # A held "no C": enters at 50 s

    asyncio.run(run())
    stored = stored_result(database_url)
    assert names(stored[0]) == [("d1", "C", 10, 30, 2), ("d1", "C", 50, None, 2)]
    assert stored[0][0][5] is None and stored[0][1][4] is None, "no crossing at a (de)activation"
    timeline = [(ts, [C] if n % 2 == 0 else []) for n, ts in enumerate(changes)]
    assert_same_result(stored, timeline_replay(track, timeline))


def test_a_batch_that_waited_for_a_device_lock_sees_a_change_committed_while_it_waited(database_url: str) -> None:
    """The revision is read after the locks: a statement that waited took its snapshot before waiting."""
    apply_migrations(database_url)
    track = [point("d1", 0, 1.8), point("d1", 10, 2.2), point("d1", 20, 2.4)]

    async def run() -> int:
        async with connected(database_url) as (conn, source):
            states = DeviceStates(100)
            await write(conn, states, source, track[:1])
            with psycopg.connect(database_url) as holder:  # another transaction of the device
                holder.execute("SELECT pg_advisory_xact_lock(%s, hashtext('d1'))", (DEVICE_LOCK_CLASS,))
                batch = asyncio.create_task(write(conn, states, source, track[1:]))
                await asyncio.to_thread(wait_for, lambda: lock_waiters(database_url) == 1, 10, what="the batch waiting")
                import_c(database_url)
                holder.commit()
            applied = await batch
            return applied.revision

    assert asyncio.run(run()) == revision(database_url)
    assert names(stored_result(database_url)[0]) == [("d1", "C", 10, None, 2)]


def lock_waiters(url: str) -> int:
    with psycopg.connect(url) as conn:
        query = """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""
        return conn.execute(query).fetchone()[0]  # type: ignore[index]



BIG = square("BIG", 1, 4)


def reshape(url: str, geofence: dict[str, Any]) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE geofences SET geometry = %s WHERE name = %s",
                      (orjson.dumps(geofence["geometry"]).decode(), geofence["name"]))


def stored_revisions(url: str) -> list[int | None]:
    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute("SELECT geofence_revision FROM positions ORDER BY ts")]


def test_a_fix_records_the_revision_its_batch_derived_with_even_one_loaded_after_its_state(
    database_url: str, monkeypatch: Any
) -> None:
    """A change that commits between the batch's state load (which read revision r) and the loading
    of the new set (another snapshot: r + 1) makes the batch derive with r + 1: its fixes say so."""
    from shard.geo import GeofenceIndex
    from shard.geofences import GeofenceSource

    apply_migrations(database_url)
    load = GeofenceSource.for_revision

    async def change_first(self, cur, revision):  # type: ignore[no-untyped-def]
        await asyncio.to_thread(import_c, database_url)
        return await load(self, cur, revision)

    async def run() -> int:
        async with connected(database_url) as (conn, source):
            source.index = GeofenceIndex([], revision=-1)  # not polled yet: the batch loads the set itself
            monkeypatch.setattr(GeofenceSource, "for_revision", change_first)
            applied = await write(conn, DeviceStates(100), source, [point("d1", 0, 2.5)])
            return applied.revision

    derived_with = asyncio.run(run())
    assert derived_with == revision(database_url) and stored_revisions(database_url) == [derived_with]
    assert names(stored_result(database_url)[0]) == [("d1", "C", 0, None, 1)]


@pytest.mark.usefixtures("visit_deletion")
def test_a_late_fix_replays_history_with_the_geofences_each_fix_was_derived_with(database_url: str) -> None:
    """Two shards interleave a device's batches, so one writes a fix older than the device's newest
    after the geofences changed. Its replay spans the history before the change (BIG's visit is open
    since the first fix), yet evaluates each stored fix with the geofences it was first derived
    with: the change reaches neither C's finished visit nor the start of BIG's (SPEC §5)."""
    apply_migrations(database_url)
    with psycopg.connect(database_url) as conn:
        for geofence in (BIG, C):
            conn.execute("INSERT INTO geofences (name, geometry) VALUES (%s, %s)",
                         (geofence["name"], orjson.dumps(geofence["geometry"]).decode()))
    before = [point("d1", s, lon) for s, lon in ((0, 1.5), (10, 2.2), (20, 2.5), (30, 3.5), (40, 3.6))]
    newest, late = point("d1", 50, 3.7), point("d1", 45, 3.65)
    moved_c, shrunk_big = square("C", 5, 6), square("BIG", 3, 4)  # neither covers the first three fixes now

    async def run() -> int:
        async with connected(database_url) as (conn_a, source_a), connected(database_url) as (conn_b, source_b):
            shard_a, shard_b = DeviceStates(100), DeviceStates(100)
            await write(conn_a, shard_a, source_a, before)
            reshape(database_url, moved_c)
            reshape(database_url, shrunk_big)
            await write(conn_a, shard_a, source_a, [newest])
            applied = await write(conn_b, shard_b, source_b, [late])  # read before `newest`, committed after
            return len(applied.late)

    assert asyncio.run(run()) == 1
    stored = stored_result(database_url)
    assert names(stored[0]) == [("d1", "BIG", 0, None, 7), ("d1", "C", 10, 30, 2)]
    timeline = [(None, [BIG, C]), (newest["ts"], [shrunk_big, moved_c])]  # the late fix is inside BIG either way
    assert_same_result(stored, timeline_replay(before + [newest, late], timeline))
