"""A replay deletes exactly the visits it rebuilds: of the geofences it evaluated, entered strictly
inside its stretch, whichever path `delete_replayed_visits` takes."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from shard.devices.replay import VisitDeletion, delete_replayed_visits
from shard.geo import id_ranges
from supervisor.migrations import apply_migrations
from tests.e2e.fleet import insert_geofences
from tests.shard.devices.test_states import square

T0 = datetime(2026, 3, 1, 8, tzinfo=timezone.utc)


@pytest.mark.usefixtures("visit_deletion")
def test_only_the_evaluated_geofences_visits_inside_the_stretch_are_deleted(database_url: str) -> None:
    apply_migrations(database_url)
    # Ids 1, 2, 3: the evaluated ones are two runs, with the other between them.
    insert_geofences(database_url, [square(name, 0, 1) for name in ("EVALUATED", "NOT_EVALUATED", "ALSO_EVALUATED")])
    with psycopg.connect(database_url) as conn:
        ids = dict(conn.execute("SELECT name, id FROM geofences").fetchall())
        for name in ids:
            for seconds in (10, 20, 30, 40):  # the stretch is (10 s, 40 s): its bounds are kept
                conn.execute("INSERT INTO timing_records (device_id, geofence_id, entered_at) VALUES (%s, %s, %s)",
                             ("d1", ids[name], T0 + timedelta(seconds=seconds)))
            conn.execute("INSERT INTO timing_records (device_id, geofence_id, entered_at) VALUES (%s, %s, %s)",
                         ("d2", ids[name], T0 + timedelta(seconds=20)))

    async def delete() -> None:
        async with await psycopg.AsyncConnection.connect(database_url) as conn, conn.cursor() as cur:
            replayed = {ids["EVALUATED"], ids["ALSO_EVALUATED"]}
            await delete_replayed_visits(cur, [
                VisitDeletion("d1", replayed, id_ranges(replayed), T0 + timedelta(seconds=10), T0 + timedelta(seconds=40)),
                VisitDeletion("d2", {ids["EVALUATED"]}, id_ranges({ids["EVALUATED"]}), T0, T0 + timedelta(seconds=21)),
                VisitDeletion("d3", replayed, id_ranges(replayed), T0, T0 + timedelta(seconds=99)),  # has none
            ])

    asyncio.run(delete())
    with psycopg.connect(database_url) as conn:
        kept = conn.execute(
            "SELECT t.device_id, g.name, extract(epoch FROM t.entered_at - %s)::int FROM timing_records t"
            " JOIN geofences g ON g.id = t.geofence_id ORDER BY 1, 2, 3", (T0,)
        ).fetchall()
    assert kept == [("d1", "ALSO_EVALUATED", 10), ("d1", "ALSO_EVALUATED", 40), ("d1", "EVALUATED", 10), ("d1", "EVALUATED", 40)] + [
        ("d1", "NOT_EVALUATED", s) for s in (10, 20, 30, 40)] + [("d2", name, 20) for name in ("ALSO_EVALUATED", "NOT_EVALUATED")]
