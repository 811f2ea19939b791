"""The writer against a real Postgres: a row that cannot even be staged is isolated like a rejected
one; two batches in flight take their device locks in turn."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from common.config import Settings
from shard.decode import Fix
from shard.geofences import GeofenceSource
from shard.devices import LockTurn
from shard.staging_rows import copy_data
from shard.writer import PositionWriter, stage
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


def test_a_row_postgres_refuses_is_rejected_with_a_one_line_error(database_url: str, settings: Settings) -> None:
    """Postgres adds a DETAIL line to a constraint's refusal: the error that becomes the dead
    letter's `error` (docs/contract.md: one line) is the primary message alone."""
    apply_migrations(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE positions ADD CONSTRAINT no_rejects CHECK (device_id <> 'reject-me')")
    fixes = [Fix(device_id, T0, 1.0, 2.0, None, None, None, None, None) for device_id in ("d1", "reject-me", "d2")]

    async def go() -> dict[int, str]:
        geofences = GeofenceSource(database_url, "test")
        writer = PositionWriter(settings, "test", geofences)
        try:
            await geofences.refresh()
            return await writer.write_isolating(fixes)
        finally:
            await writer.close()
            await geofences.close()

    rejected = asyncio.run(go())
    assert list(rejected) == [1]
    assert rejected[1].startswith("CheckViolation: new row for relation") and "no_rejects" in rejected[1]
    assert "\n" not in rejected[1] and "DETAIL" not in rejected[1]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT device_id FROM positions ORDER BY 1").fetchall() == [("d1",), ("d2",)]


@pytest.mark.parametrize("ordered", [True, False], ids=["in-turn", "without-turn"])
def test_the_later_of_two_batches_in_flight_locks_its_devices_after_the_earlier(
    database_url: str, settings: Settings, monkeypatch: pytest.MonkeyPatch, ordered: bool
) -> None:
    """The earlier batch stages only once the later one holds its locks or waits for its turn.
    In turn (LockTurn), the later waits for the earlier's locks, so the device's fixes apply in
    read order and none looks late. Without the turn, the later locks first and the earlier
    batch's fixes must be replayed: what the turn is there to avoid."""
    apply_migrations(database_url)
    earlier = [Fix("d1", T0 + timedelta(seconds=s), 1.0 + s / 1000, 2.0, None, None, None, None, None) for s in range(3)]
    later = [Fix("d1", T0 + timedelta(seconds=s), 1.0 + s / 1000, 2.0, None, None, None, None, None) for s in range(3, 6)]
    earlier_data = copy_data(earlier, {"d1": None})  # neither batch finds d1 cached

    async def go() -> dict[str, int]:
        held_back = asyncio.Event()  # the later batch waits for its turn

        class Watched(LockTurn):
            async def come(self) -> None:
                waiting = asyncio.ensure_future(super().come())
                await asyncio.sleep(0)  # its first step: done at once unless it must wait
                if not waiting.done():
                    held_back.set()
                await waiting

        first = LockTurn()
        second = Watched(first.granted if ordered else None)  # no previous: locks at once

        async def stage_earlier_last(cur, data: bytes) -> None:  # type: ignore[no-untyped-def]
            if data == earlier_data:
                signals = {asyncio.ensure_future(held_back.wait()), asyncio.ensure_future(second.granted.wait())}
                _, pending = await asyncio.wait(signals, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
            await stage(cur, data)

        monkeypatch.setattr("shard.writer.stage", stage_earlier_last)
        geofences = GeofenceSource(database_url, "test")
        writer = PositionWriter(settings, "test", geofences)
        try:
            await geofences.refresh()
            await asyncio.wait_for(
                asyncio.gather(writer.write_isolating(earlier, first), writer.write_isolating(later, second)), 30
            )
            return writer.devices.counts
        finally:
            await writer.close()
            await geofences.close()

    counts = asyncio.run(go())
    assert counts["devices_replayed"] == (0 if ordered else 1)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM positions").fetchone() == (6,)
