"""DeviceCache's description of itself, as a panic dump shows it (SPEC §5 "Panic")."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from shard.devices.cache import DeviceCache
from shard.devices.track import DeviceState, TrackFix, Visit

T0 = datetime(2026, 3, 1, 8, tzinfo=UTC)


def test_the_snapshot_describes_devices_with_open_visits_too() -> None:
    cache = DeviceCache(10)
    cache.put(DeviceState("quiet", 1, TrackFix(T0, 52.0, 4.0, None), 12.5))
    cache.put(DeviceState("inside", 2, TrackFix(T0, 52.1, 4.1, 30.0), 99.0, {7: Visit(7, T0, None, samples=3, max_speed=30.0)}))
    snapshot = cache.snapshot()
    assert orjson.loads(orjson.dumps(snapshot)) == snapshot  # plain JSON, as the dump writes it
    assert snapshot["quiet"]["open"] == {} and snapshot["quiet"]["odometer_m"] == 12.5
    visit = snapshot["inside"]["open"]["7"]
    assert (visit["geofence_id"], visit["entered_at"], visit["samples"]) == (7, "2026-03-01T08:00:00+00:00", 3)
    assert snapshot["inside"]["last"] == {"ts": "2026-03-01T08:00:00+00:00", "lat": 52.1, "lon": 4.1, "speed": 30.0}
