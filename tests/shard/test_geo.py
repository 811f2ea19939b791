"""shard.geo: haversine, geometry parsing, membership through the index, boundary crossings."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shard.geo import EARTH_RADIUS_M, Geofence, GeofenceIndex, GeometryError, haversine_m, id_ranges, parse_geofence

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ONE_MS = timedelta(milliseconds=1)
Stamped = tuple[datetime, float, float]  # (ts, lat, lon), as crossing_at takes fixes


def square(west: float, south: float, east: float, north: float) -> list[list[float]]:
    return [[west, south], [east, south], [east, north], [west, north], [west, south]]


def polygon(geofence_id: int, *rings: list[list[float]]) -> Geofence:
    return parse_geofence(geofence_id, f"p{geofence_id}", {"type": "Polygon", "coordinates": list(rings)}, None)


def circle(geofence_id: int, lat: float, lon: float, radius_m: float) -> Geofence:
    return parse_geofence(geofence_id, f"c{geofence_id}", {"type": "Point", "coordinates": [lon, lat]}, radius_m)


def inside_one(index: GeofenceIndex, lat: float, lon: float) -> frozenset[int]:
    return index.inside([lat], [lon])[0]


def interpolate(a: Stamped, b: Stamped, at: datetime) -> tuple[float, float]:
    """The position at `at` on the straight track from a to b, the short way round in longitude."""
    (t0, lat0, lon0), (t1, lat1, lon1) = a, b
    fraction = (at - t0) / (t1 - t0)
    dlon = (lon1 - lon0 + 180.0) % 360.0 - 180.0
    return lat0 + fraction * (lat1 - lat0), (lon0 + fraction * dlon + 180.0) % 360.0 - 180.0


# --- haversine ---------------------------------------------------------------------------


def test_one_degree_of_longitude_at_the_equator() -> None:
    """One degree of longitude on the equator is 111195.08 m (Earth radius 6,371,008.8 m)."""
    assert haversine_m(0.0, 0.0, 0.0, 1.0) == pytest.approx(111_195.08, abs=0.1)


def test_haversine_known_distances() -> None:
    """Zero for one point, symmetric, short way across the antimeridian, half a circumference pole to pole."""
    assert haversine_m(51.5, -0.12, 51.5, -0.12) == 0.0
    assert haversine_m(48.85, 2.35, 51.5, -0.12) == haversine_m(51.5, -0.12, 48.85, 2.35)
    assert haversine_m(0.0, 179.5, 0.0, -179.5) == pytest.approx(111_195.08, abs=0.1)
    assert haversine_m(90.0, 0.0, -90.0, 0.0) == pytest.approx(math.pi * EARTH_RADIUS_M, abs=1e-6)
    assert haversine_m(0.0, 0.0, 1.0, 0.0) == pytest.approx(111_195.08, abs=0.1)


# --- membership --------------------------------------------------------------------------


def test_point_in_a_hole_is_outside() -> None:
    """A polygon with a hole covers its ring but not the hole; the hole's edge is boundary, so inside."""
    fence = polygon(1, square(0, 0, 10, 10), square(4, 4, 6, 6))
    index = GeofenceIndex([fence])
    assert fence.covers(1.0, 1.0) and inside_one(index, 1.0, 1.0) == {1}
    assert not fence.covers(5.0, 5.0) and inside_one(index, 5.0, 5.0) == frozenset()
    assert fence.covers(4.0, 5.0) and inside_one(index, 4.0, 5.0) == {1}


def test_multipolygon_covers_both_parts() -> None:
    """A MultiPolygon covers points in either part and none in the gap between them."""
    fence = parse_geofence(
        7, "two", {"type": "MultiPolygon", "coordinates": [[square(0, 0, 1, 1)], [square(5, 5, 6, 6)]]}, None
    )
    index = GeofenceIndex([fence])
    for lat, lon in ((0.5, 0.5), (5.5, 5.5)):
        assert fence.covers(lat, lon) and inside_one(index, lat, lon) == {7}
    assert not fence.covers(3.0, 3.0) and inside_one(index, 3.0, 3.0) == frozenset()


def test_circle_across_the_antimeridian() -> None:
    """A 200 m circle at lon 179.9995 covers lon -179.9999 (66 m away) but not 179.99 (1 km away)."""
    fence = circle(3, 0.0, 179.9995, 200.0)
    index = GeofenceIndex([fence])
    assert fence.covers(0.0, -179.9999) and inside_one(index, 0.0, -179.9999) == {3}
    assert not fence.covers(0.0, 179.99) and inside_one(index, 0.0, 179.99) == frozenset()
    assert fence.covers(0.0, 180.0) and inside_one(index, 0.0, -180.0) == {3}


def test_polygon_boundary_counts_as_inside() -> None:
    """A point on an edge, or exactly on a vertex, is inside the polygon."""
    fence = polygon(1, square(0, 0, 1, 1))
    index = GeofenceIndex([fence])
    for lat, lon in ((0.0, 0.5), (0.5, 1.0), (0.0, 0.0), (1.0, 1.0), (1.0, 0.0)):
        assert fence.covers(lat, lon), (lat, lon)
        assert inside_one(index, lat, lon) == {1}, (lat, lon)
    assert inside_one(index, 1.0 + 1e-9, 0.5) == frozenset()


def test_circle_boundary_counts_as_inside() -> None:
    """A point exactly radius_m from the centre is inside; one a hair further is not."""
    center, point = (45.0, 7.0), (45.0123, 7.0231)
    radius_m = haversine_m(*point, *center)
    fence = circle(2, *center, radius_m)
    index = GeofenceIndex([fence])
    assert fence.covers(*point) and inside_one(index, *point) == {2}
    tighter = circle(2, *center, math.nextafter(radius_m, 0.0))
    assert not tighter.covers(*point) and inside_one(GeofenceIndex([tighter]), *point) == frozenset()


def random_geofences(rng: random.Random, count: int) -> list[Geofence]:
    """Circles and star-shaped polygons over a small region and around the antimeridian."""
    fences: list[Geofence] = []
    for geofence_id in range(1, count + 1):
        lat = rng.uniform(-3, 3)
        lon = rng.choice([rng.uniform(-3, 3), rng.uniform(179, 180), rng.uniform(-180, -179)])
        if geofence_id % 2:
            fences.append(circle(geofence_id, lat, lon, rng.uniform(50, 150_000)))
            continue
        lon = max(-179.0, min(179.0, lon))  # polygons are planar: kept off the antimeridian
        size = rng.uniform(0.01, 1.0)
        angles = sorted(rng.uniform(0, 2 * math.pi) for _ in range(rng.randint(3, 12)))
        radii = [size * rng.uniform(0.2, 1) for _ in angles]
        ring = [[lon + r * math.cos(a), lat + r * math.sin(a)] for r, a in zip(radii, angles, strict=True)]
        try:
            fences.append(polygon(geofence_id, [*ring, ring[0]]))
        except GeometryError:
            continue  # a degenerate star (collinear vertices); rare
    return fences


def test_index_equals_per_point_covers() -> None:
    """GeofenceIndex.inside over many points equals Geofence.covers point by point, for 200 geofences."""
    rng = random.Random(20260301)
    fences = random_geofences(rng, 200)
    assert len(fences) >= 190
    lats = [rng.uniform(-4, 4) for _ in range(4000)]
    lons = [rng.choice([rng.uniform(-4, 4), rng.uniform(178.5, 180), rng.uniform(-180, -178.5)]) for _ in lats]
    for fence in fences:  # vertices: on the boundary, the hardest case for the index's box filter
        if fence.area is not None:
            for lon, lat in list(fence.area.exterior.coords)[:2]:
                lats.append(lat)
                lons.append(lon)
    found = GeofenceIndex(fences).inside(lats, lons)
    hits = 0
    for lat, lon, ids in zip(lats, lons, found):
        expected = {f.id for f in fences if f.covers(lat, lon)}
        assert ids == expected, (lat, lon)
        hits += len(ids)
    assert hits > 1000  # the comparison is not vacuous


def test_empty_index_covers_nothing() -> None:
    """An index without geofences answers an empty set for every point."""
    assert GeofenceIndex([]).inside([1.0, 2.0], [3.0, 4.0]) == [frozenset(), frozenset()]


# --- crossings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fence", "a", "b"),
    [
        (polygon(1, square(0, 0, 1, 1)), (T0, 0.5, -0.5), (T0 + timedelta(seconds=10), 0.5, 0.5)),
        (polygon(1, square(0, 0, 1, 1)), (T0, 0.2, 0.3), (T0 + timedelta(seconds=37), 1.7, 2.9)),
        (circle(1, 10.0, 20.0, 500.0), (T0, 10.0, 20.0), (T0 + timedelta(minutes=3), 10.01, 20.003)),
        (circle(1, 0.0, 179.9995, 200.0), (T0, 0.0, 179.99), (T0 + timedelta(seconds=30), 0.0, -179.9999)),
    ],
    ids=["entering-polygon", "leaving-polygon-diagonally", "leaving-circle", "entering-circle-over-antimeridian"],
)
def test_crossing_is_on_the_boundary(fence: Geofence, a: Stamped, b: Stamped) -> None:
    """crossing_at lies between the fixes, and the interpolated track changes side within 1 ms of it."""
    index = GeofenceIndex([fence])
    at = index.crossing_at(1, a, b)
    assert at is not None and a[0] < at < b[0]
    start_inside = fence.covers(a[1], a[2])
    assert start_inside != fence.covers(b[1], b[2])
    assert fence.covers(*interpolate(a, b, at - ONE_MS)) == start_inside
    assert fence.covers(*interpolate(a, b, at + ONE_MS)) != start_inside


def test_crossing_of_a_straight_edge_is_exact() -> None:
    """Halfway across a fix interval, on the edge at lon 0: the crossing is at the middle of it."""
    index = GeofenceIndex([polygon(1, square(0, 0, 1, 1))])
    at = index.crossing_at(1, (T0, 0.5, -0.5), (T0 + timedelta(seconds=10), 0.5, 0.5))
    assert at is not None and abs(at - (T0 + timedelta(seconds=5))) <= ONE_MS


def test_no_crossing_when_both_fixes_on_one_side() -> None:
    """Both outside, both inside, or an unknown geofence: no crossing."""
    index = GeofenceIndex([polygon(1, square(0, 0, 1, 1)), circle(2, 0.5, 0.5, 1000.0)])
    later = T0 + timedelta(seconds=10)
    assert index.crossing_at(1, (T0, 2.0, 2.0), (later, 3.0, 3.0)) is None
    assert index.crossing_at(1, (T0, 0.2, 0.2), (later, 0.8, 0.8)) is None
    assert index.crossing_at(2, (T0, 0.5, 0.5), (later, 0.501, 0.5)) is None
    assert index.crossing_at(99, (T0, 2.0, 2.0), (later, 0.5, 0.5)) is None


# --- invalid geometry --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("geometry", "radius_m", "reason"),
    [
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}, None, "Self-intersection"),
        ({"type": "Point", "coordinates": [10.0, 50.0]}, None, "radius_m"),
        ({"type": "Point", "coordinates": [10.0, 50.0]}, 0, "radius_m"),
        ({"type": "Point", "coordinates": [10.0, 50.0]}, -5.0, "radius_m"),
        ({"type": "Point", "coordinates": [10.0, 50.0]}, math.nan, "radius_m"),
        ({"type": "LineString", "coordinates": [[0, 0], [1, 1]]}, None, "LineString"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]}, None, "not closed"),
        ({"type": "MultiPolygon", "coordinates": [[[[0, 0], [1, 0], [1, 1], [0, 1]]]]}, None, "not closed"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 0]]]}, None, "at least 4"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [200, 0], [200, 1], [0, 0]]]}, None, "outside lon"),
        ({"type": "Polygon"}, None, "no coordinates"),
        ({"type": "Polygon", "coordinates": [[["a", 0], [1, 0], [1, 1], ["a", 0]]]}, None, "finite numbers"),
        ({"type": "Point", "coordinates": [10.0, 95.0]}, 100.0, "outside lon"),
        ([[0, 0], [1, 1]], None, "GeoJSON object"),
    ],
    ids=[
        "bowtie", "point-without-radius", "zero-radius", "negative-radius", "nan-radius", "linestring",
        "unclosed-ring", "unclosed-multipolygon-ring", "too-few-positions", "lon-out-of-range",
        "no-coordinates", "non-numeric", "lat-out-of-range", "not-an-object",
    ],
)
def test_invalid_geometries_are_rejected(geometry: object, radius_m: float | None, reason: str) -> None:
    """parse_geofence raises GeometryError saying why, never another exception."""
    with pytest.raises(GeometryError, match=reason):
        parse_geofence(1, "bad", geometry, radius_m)


@pytest.mark.parametrize("interval", [timedelta(milliseconds=1), timedelta(seconds=1), timedelta(hours=1), timedelta(days=10)])
def test_a_crossing_is_found_to_the_microsecond_whatever_the_fix_interval(interval: timedelta) -> None:
    """The bisection takes as many steps as the interval needs (not a fixed 40): still within a
    microsecond of the true crossing, here a third of the way along a track across a straight edge."""
    square = parse_geofence(1, "sq", {"type": "Polygon", "coordinates": [[[2, 0], [3, 0], [3, 1], [2, 1], [2, 0]]]}, None)
    index = GeofenceIndex([square])
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    found = index.crossing_at(1, (t0, 0.5, 1.5), (t0 + interval, 0.5, 3.0))
    exact = t0 + interval / 3
    assert found is not None and abs(found - exact) <= timedelta(microseconds=1)


@given(st.sets(st.integers(min_value=1, max_value=200), max_size=60))
def test_id_ranges_are_the_fewest_runs_holding_exactly_the_ids(ids: set[int]) -> None:
    runs = id_ranges(ids)
    assert [i for first, last in runs for i in range(first, last + 1)] == sorted(ids)
    assert all(runs[k][1] + 1 < runs[k + 1][0] for k in range(len(runs) - 1))  # none could be merged
