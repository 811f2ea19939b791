"""The shard's geofence index is built off the event loop: a polygon of hundreds of thousands of
vertices takes seconds to check and index, and a loop held that long missed its heartbeats
(the supervisor aborted the shard) and let its open batch time out."""

from __future__ import annotations

import asyncio
import math
import threading

import orjson
import psycopg

from shard import geofences
from shard.geofences import GeofenceSource
from supervisor.migrations import apply_migrations

VERTICES = 20_000


def ring(vertices: int) -> list[list[float]]:
    points = [[10 + 0.1 * math.cos(2 * math.pi * i / vertices), 45 + 0.1 * math.sin(2 * math.pi * i / vertices)] for i in range(vertices)]
    return [*points, points[0]]


def test_the_index_is_built_on_a_worker_thread(database_url: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    apply_migrations(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        geometry = orjson.dumps({"type": "Polygon", "coordinates": [ring(VERTICES)]}).decode()
        conn.execute("INSERT INTO geofences (name, geometry) VALUES ('big', %s::jsonb)", (geometry,))
    threads: list[tuple[str, int]] = []
    build = geofences._build

    def recording(rows, by):  # type: ignore[no-untyped-def]
        threads.append((by, threading.get_ident()))
        return build(rows, by)

    monkeypatch.setattr(geofences, "_build", recording)

    async def scenario() -> None:
        source = GeofenceSource(database_url, "test")
        try:
            assert await source.refresh()
            assert [g.name for g in source.index.by_id.values()] == ["big"]
            async with await psycopg.AsyncConnection.connect(database_url) as conn, conn.cursor() as cur:
                index = await source.for_revision(cur, source.index.revision + 1)  # as after a change
                assert len(index) == 1
        finally:
            await source.close()

    asyncio.run(scenario())
    loop_thread = threading.get_ident()
    assert [by for by, _ in threads] == ["poll", "batch"]
    assert all(thread != loop_thread for _, thread in threads), "built on the event loop's thread"


def test_every_revision_is_rebuilt_from_the_versions_as_it_was(database_url: str) -> None:
    """After inserts, an update, a deactivation, a deletion and an import of several at once, the index
    `at` builds for each revision holds the geofences (and shapes) that revision's batches derived with."""
    apply_migrations(database_url)
    square = lambda west: orjson.dumps({"type": "Polygon", "coordinates": [  # noqa: E731
        [[west, 0], [west + 1, 0], [west + 1, 1], [west, 1], [west, 0]]]}).decode()
    changes = [
        "INSERT INTO geofences (name, geometry) VALUES ('a', '{0}'), ('b', '{1}')".format(square(0), square(2)),
        "UPDATE geofences SET geometry = '{0}' WHERE name = 'a'".format(square(4)),
        "UPDATE geofences SET active = false WHERE name = 'b'",
        "INSERT INTO geofences (name, geometry, radius_m) VALUES "
        "('c', '{\"type\": \"Point\", \"coordinates\": [7, 0.5]}', 100)",
        "DELETE FROM geofences WHERE name = 'b'",
        "UPDATE geofences SET active = true",
        "TRUNCATE geofences CASCADE",  # no row trigger fires: a statement trigger keeps their end
        "INSERT INTO geofences (name, geometry) VALUES ('d', '{0}')".format(square(8)),
    ]
    snapshots: dict[int, list[tuple]] = {}
    with psycopg.connect(database_url, autocommit=True) as conn:
        for change in changes:
            conn.execute(change)
            rows = conn.execute(geofences._ACTIVE).fetchall()
            snapshots[rows[0][0]] = rows

    def described(index: geofences.GeofenceIndex) -> list[tuple]:
        return sorted((g.id, g.name, g.area.wkt if g.area is not None else (g.center, g.radius_m)) for g in index.by_id.values())

    async def scenario() -> None:
        source = GeofenceSource(database_url, "test")
        try:
            assert await source.refresh()
            current = source.index
            async with await psycopg.AsyncConnection.connect(database_url) as conn, conn.cursor() as cur:
                for revision, rows in snapshots.items():
                    rebuilt = await source.at(cur, revision, current)
                    assert rebuilt.revision == revision
                    assert described(rebuilt) == described(await geofences.build(rows, "test")), revision
                assert await source.at(cur, current.revision, current) is current
                before_history = await source.at(cur, None, current)  # a fix stored before migration 0006
                assert (before_history.revision, len(before_history)) == (0, 0), "the geofences the migration found"
        finally:
            await source.close()

    assert len(snapshots) == len(changes), "every change is a revision of its own"
    asyncio.run(scenario())
