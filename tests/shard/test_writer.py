"""The writer against a real Postgres: a row that cannot even be staged is isolated like a rejected one."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import psycopg

from common.config import Settings
from shard.decode import Fix
from shard.geofences import GeofenceSource
from shard.writer import PositionWriter
from supervisor.migrations import apply_migrations

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)


def test_a_row_that_cannot_be_encoded_is_rejected_alone(database_url: str, settings: Settings) -> None:
    """An attribute COPY cannot encode (a bug upstream, say) fails that row only; the others commit."""
    apply_migrations(database_url)
    good = Fix("d1", T0, 1.0, 2.0, None, None, None, None, {"a": 1})
    bad = Fix("d2", T0, 1.0, 2.0, None, None, None, None, {"a": {1, 2}})  # a set: not JSON

    async def go() -> dict[int, str]:
        geofences = GeofenceSource(database_url, "test")
        writer = PositionWriter(settings, "test", geofences)
        try:
            await geofences.refresh()
            return await writer.write_isolating([good, bad])
        finally:
            await writer.close()
            await geofences.close()

    rejected = asyncio.run(go())
    assert list(rejected) == [1] and rejected[1].startswith("RowRejected: row cannot be staged")
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT device_id FROM positions").fetchall() == [("d1",)]
