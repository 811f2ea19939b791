"""shard.devices.track.advance: visits opened, measured and closed one fix at a time; the odometer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shard.devices.track import DeviceState, TrackFix, Visit, advance
from shard.geo import GeofenceIndex, haversine_m, parse_geofence

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
ONE_MS = timedelta(milliseconds=1)
A, B = 1, 2  # A covers lon 0..1, B lon 0.5..1.5, both lat 0..1: they overlap on lon 0.5..1


def square(west: float, east: float) -> dict[str, object]:
    return {"type": "Polygon", "coordinates": [[[west, 0], [east, 0], [east, 1], [west, 1], [west, 0]]]}


@pytest.fixture
def index() -> GeofenceIndex:
    return GeofenceIndex([parse_geofence(A, "A", square(0, 1), None), parse_geofence(B, "B", square(0.5, 1.5), None)])


def fix(seconds: float, lon: float, speed: float | None = None, lat: float = 0.5) -> TrackFix:
    return TrackFix(T0 + timedelta(seconds=seconds), lat, lon, speed)


def feed(state: DeviceState, index: GeofenceIndex, *fixes: TrackFix) -> list[list[Visit]]:
    """advance() over the fixes in order, as the writer does; returns what each step changed."""
    return [advance(state, f, index.inside([f.lat], [f.lon])[0], index) for f in fixes]


def near(actual: datetime | None, expected: datetime) -> bool:
    return actual is not None and abs(actual - expected) <= ONE_MS


def test_entering_opens_a_visit_with_an_interpolated_entry(index: GeofenceIndex) -> None:
    """Outside then inside: a visit entered at the inside fix, its crossing halfway between the two."""
    state = DeviceState("d1")
    steps = feed(state, index, fix(0, -0.5), fix(10, 0.5 - 1e-9, speed=42.0))
    assert steps[0] == []
    (visit,) = steps[1]
    assert (visit.geofence_id, visit.entered_at, visit.exited_at) == (A, T0 + timedelta(seconds=10), None)
    assert near(visit.entry_crossing_at, T0 + timedelta(seconds=5))
    assert (visit.samples, visit.distance_m, visit.max_speed) == (1, 0.0, 42.0)
    assert state.open == {A: visit}


def test_first_fix_ever_inside_has_no_entry_crossing(index: GeofenceIndex) -> None:
    """A device first seen inside opens a visit whose entry crossing is unknown (None)."""
    state = DeviceState("d1")
    ((visit,),) = feed(state, index, fix(0, 0.25))
    assert (visit.geofence_id, visit.entered_at, visit.entry_crossing_at) == (A, T0, None)
    assert visit.samples == 1


def test_samples_speed_and_distance_count_only_inside_fixes(index: GeofenceIndex) -> None:
    """samples and max_speed over the inside fixes; distance_m sums only consecutive inside fixes."""
    inside = [fix(10, 0.1, speed=10.0, lat=0.2), fix(20, 0.3, speed=30.0, lat=0.4), fix(30, 0.4, speed=None, lat=0.3)]
    steps = feed(DeviceState("d1"), index, fix(0, -0.4, speed=99.0), *inside, fix(40, -0.3, speed=80.0))
    (visit,) = steps[-1]
    assert visit.exited_at == T0 + timedelta(seconds=40)
    distances = [haversine_m(p.lat, p.lon, q.lat, q.lon) for p, q in zip(inside, inside[1:])]
    assert visit.samples == 3
    assert visit.max_speed == 30.0
    assert visit.distance_m == pytest.approx(sum(distances), rel=1e-12)


def test_leaving_closes_the_visit_at_the_first_fix_outside(index: GeofenceIndex) -> None:
    """exited_at is the first outside fix's time; exit_crossing_at is where the track crosses the edge."""
    state = DeviceState("d1")
    steps = feed(state, index, fix(0, 0.2), fix(10, 0.4), fix(30, -0.4), fix(40, -0.6))
    (visit,) = steps[2]
    assert visit.exited_at == T0 + timedelta(seconds=30)
    assert near(visit.exit_crossing_at, T0 + timedelta(seconds=20))  # lon 0 is halfway from 0.4 to -0.4
    assert (visit.samples, visit.entered_at) == (2, T0)
    assert state.open == {}
    assert steps[3] == []


def test_overlapping_geofences_are_tracked_independently(index: GeofenceIndex) -> None:
    """Through A, then A and B, then B: each geofence gets its own visit, entry and exit."""
    state = DeviceState("d1")
    steps = feed(state, index, fix(0, -0.25), fix(10, 0.25), fix(20, 0.75), fix(30, 1.25), fix(40, 1.75))
    visits: dict[int, Visit] = {}
    for changed in steps:
        visits.update((v.geofence_id, v) for v in changed)
    a, b = visits[A], visits[B]
    assert (a.entered_at, a.exited_at, a.samples) == (T0 + timedelta(seconds=10), T0 + timedelta(seconds=30), 2)
    assert (b.entered_at, b.exited_at, b.samples) == (T0 + timedelta(seconds=20), T0 + timedelta(seconds=40), 2)
    assert near(a.entry_crossing_at, T0 + timedelta(seconds=5))  # lon 0
    assert near(a.exit_crossing_at, T0 + timedelta(seconds=25))  # lon 1
    assert near(b.entry_crossing_at, T0 + timedelta(seconds=15))  # lon 0.5
    assert near(b.exit_crossing_at, T0 + timedelta(seconds=35))  # lon 1.5
    assert a.distance_m == pytest.approx(haversine_m(0.5, 0.25, 0.5, 0.75))
    assert b.distance_m == pytest.approx(haversine_m(0.5, 0.75, 0.5, 1.25))
    assert state.open == {}


def test_odometer_sums_haversine_between_consecutive_fixes(index: GeofenceIndex) -> None:
    """odometer_m adds the great-circle distance of every step, inside or outside any geofence."""
    fixes = [fix(0, -2.0, lat=3.0), fix(10, 0.5), fix(20, 5.0, lat=-1.0), fix(30, 5.0, lat=-1.0), fix(40, 179.0)]
    state = DeviceState("d1", odometer_m=1000.0)
    feed(state, index, *fixes)
    expected = 1000.0 + sum(haversine_m(p.lat, p.lon, q.lat, q.lon) for p, q in zip(fixes, fixes[1:]))
    assert state.odometer_m == pytest.approx(expected, rel=1e-12)
    assert state.last == fixes[-1]


def test_a_geofence_gone_from_the_index_closes_its_visit(index: GeofenceIndex) -> None:
    """A visit open in a geofence that is no longer active closes at the next fix, without a crossing."""
    state = DeviceState("d1")
    feed(state, index, fix(0, 0.25))
    without_a = GeofenceIndex([parse_geofence(B, "B", square(0.5, 1.5), None)])
    ((visit,),) = feed(state, without_a, fix(10, 0.3))
    assert (visit.geofence_id, visit.exited_at, visit.exit_crossing_at) == (A, T0 + timedelta(seconds=10), None)
    assert state.open == {}
