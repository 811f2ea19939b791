"""Geofence geometry: great-circle distance, membership through a spatial index, crossings.

Coordinates are GeoJSON's: longitude first, degrees, planar for polygons. Circles are
measured on the sphere, so one across the antimeridian or near a pole works as well.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box, shape
from shapely.geometry.base import BaseGeometry

EARTH_RADIUS_M = 6_371_008.8
BISECTION_STEPS = 40  # at most: 2⁻⁴⁰ of a segment, below a microsecond for fix intervals up to 12 days
_BOX_MARGIN = 1.001  # circle bounding boxes are widened a little against rounding
_RADIANS = math.pi / 180.0
_TWO_R = 2 * EARTH_RADIUS_M


class GeometryError(ValueError):
    """A geofence's geometry is not one the Processor can use."""


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float, _sin=math.sin, _cos=math.cos) -> float:
    """Great-circle distance in metres (SPEC §3)."""
    p1, p2 = lat1 * _RADIANS, lat2 * _RADIANS
    a = _sin((p2 - p1) * 0.5)
    b = _sin((lon2 - lon1) * _RADIANS * 0.5)
    h = a * a + _cos(p1) * _cos(p2) * b * b
    return _TWO_R * math.asin(math.sqrt(h) if h < 1.0 else 1.0)


@dataclass(frozen=True)
class Geofence:
    """A polygonal area, or a circle of `radius_m` around `center` (lat, lon)."""

    id: int
    name: str
    area: BaseGeometry | None = None
    center: tuple[float, float] | None = None
    radius_m: float | None = None

    def covers(self, lat: float, lon: float) -> bool:
        """Inside, boundary included."""
        if self.area is not None:
            # For a point, "intersects" is "covers" (interior or boundary), and the _xy form
            # builds no Point: half the cost, 40 times per crossing.
            return bool(shapely.intersects_xy(self.area, lon, lat))
        assert self.center is not None and self.radius_m is not None
        return haversine_m(lat, lon, *self.center) <= self.radius_m


def parse_geofence(geofence_id: int, name: str, geometry: object, radius_m: float | None) -> Geofence:
    """Build a Geofence from GeoJSON; raises GeometryError with the reason."""
    if not isinstance(geometry, dict):
        raise GeometryError("geometry must be a GeoJSON object")
    kind = geometry.get("type")
    if kind == "Point":
        lon, lat = _position(geometry.get("coordinates"), "the Point")
        if not (_is_number(radius_m) and math.isfinite(radius_m) and radius_m > 0):  # type: ignore[arg-type]
            raise GeometryError("a Point geofence needs a positive radius_m (a circle)")
        return Geofence(geofence_id, name, center=(lat, lon), radius_m=float(radius_m))  # type: ignore[arg-type]
    if kind not in ("Polygon", "MultiPolygon"):
        raise GeometryError(f"geometry type must be Polygon, MultiPolygon or Point, got {kind!r}")
    _check_polygon_coordinates(kind, geometry.get("coordinates"))
    try:
        area = shape(geometry)
    except (ValueError, TypeError, AttributeError, IndexError, shapely.errors.ShapelyError) as exc:
        raise GeometryError(f"malformed {kind}: {exc}") from None
    if not isinstance(area, (Polygon, MultiPolygon)) or area.is_empty:
        raise GeometryError(f"{kind} is empty")
    if not area.is_valid:
        raise GeometryError(f"{kind} is not valid: {shapely.is_valid_reason(area)}")
    shapely.prepare(area)
    return Geofence(geofence_id, name, area=area)


def _is_number(value: object) -> bool:
    return type(value) in (int, float)


def _position(value: object, where: str) -> tuple[float, float]:
    """A GeoJSON position [lon, lat, ...] within range; returns (lon, lat)."""
    if not (isinstance(value, list) and len(value) >= 2 and all(_is_number(c) and math.isfinite(c) for c in value)):
        raise GeometryError(f"{where} needs a position [lon, lat] of finite numbers, got {str(value)[:60]}")
    lon, lat = float(value[0]), float(value[1])
    if not (-180 <= lon <= 180 and -90 <= lat <= 90):
        raise GeometryError(f"{where} has position [{lon:g}, {lat:g}] outside lon -180..180, lat -90..90")
    return lon, lat


def _check_polygon_coordinates(kind: str, coordinates: object) -> None:
    """GeoJSON's rules shapely does not check: closed rings of 4+ positions, coordinates in range."""
    if not (isinstance(coordinates, list) and coordinates):
        raise GeometryError(f"{kind} has no coordinates")
    polygons = coordinates if kind == "MultiPolygon" else [coordinates]
    for p, rings in enumerate(polygons):
        prefix = f"polygon {p}, " if kind == "MultiPolygon" else ""
        if not (isinstance(rings, list) and rings):
            raise GeometryError(f"{kind} {prefix}has no rings")
        for r, ring in enumerate(rings):
            where = prefix + ("exterior ring" if r == 0 else f"hole {r}")
            if not (isinstance(ring, list) and len(ring) >= 4):
                raise GeometryError(f"{kind} {where} needs at least 4 positions (first = last)")
            positions = [_position(position, f"{kind} {where}") for position in ring]
            if positions[0] != positions[-1]:
                raise GeometryError(f"{kind} {where} is not closed: its first and last positions differ")


_NONE: frozenset[int] = frozenset()


class GeofenceIndex:
    """Which geofences cover which points, through an STRtree over areas and circle boxes."""

    def __init__(self, geofences: Iterable[Geofence], revision: int = 0) -> None:
        self.revision = revision
        self.by_id = {g.id: g for g in geofences}
        self.id_ranges = id_ranges(self.by_id)
        entries: list[BaseGeometry] = []
        owners: list[Geofence] = []
        for geofence in self.by_id.values():
            boxes = [geofence.area] if geofence.area is not None else _circle_boxes(geofence)
            entries.extend(boxes)  # type: ignore[arg-type]
            owners.extend([geofence] * len(boxes))
        self._owners = owners
        self._tree = shapely.STRtree(entries) if entries else None
        # Per tree entry, for the vectorised part of `inside`: whether it is a circle's box
        # (tested exactly afterwards), and its geofence's id.
        self._is_circle = np.array([g.area is None for g in owners], dtype=bool)
        self._ids = np.array([g.id for g in owners], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.by_id)

    def inside(self, lats: Sequence[float], lons: Sequence[float]) -> list[frozenset[int]]:
        """For each point, the ids of the geofences that cover it."""
        count = len(lats)
        if self._tree is None or not count:
            return [_NONE] * count
        lat_arr, lon_arr = np.asarray(lats, dtype=float), np.asarray(lons, dtype=float)
        points = shapely.points(lon_arr, lat_arr)
        point_idx, entry_idx = self._tree.query(points)
        found: dict[int, set[int]] = {}
        circle = self._is_circle[entry_idx]
        polygon_points, polygon_entries = point_idx[~circle], entry_idx[~circle]
        if len(polygon_points):
            hit = shapely.covers(self._tree.geometries[polygon_entries], points[polygon_points])
            for p, geofence_id in zip(polygon_points[hit].tolist(), self._ids[polygon_entries[hit]].tolist()):
                found.setdefault(p, set()).add(geofence_id)
        # Circles through the scalar haversine_m, like Geofence.covers: numpy's vectorised
        # sin/cos can differ from libm's in the last bit, which flips a fix on the rim.
        circle_points = point_idx[circle].tolist()
        if circle_points:
            lat_list, lon_list, owners = lat_arr.tolist(), lon_arr.tolist(), self._owners
            for p, e in zip(circle_points, entry_idx[circle].tolist()):
                geofence = owners[e]
                if geofence.covers(lat_list[p], lon_list[p]):
                    found.setdefault(p, set()).add(geofence.id)
        result = [_NONE] * count
        for p, ids in found.items():
            result[p] = frozenset(ids)
        return result

    def crossing_at(
        self, geofence_id: int, a: tuple[datetime, float, float], b: tuple[datetime, float, float]
    ) -> datetime | None:
        """When the track from fix `a` to fix `b` (ts, lat, lon) crosses the geofence's boundary.

        Position is interpolated linearly between the fixes (the short way round in
        longitude) and the crossing found by bisection; None if the geofence is gone or
        both fixes are on the same side.
        """
        geofence = self.by_id.get(geofence_id)
        if geofence is None:
            return None
        (t0, lat0, lon0), (t1, lat1, lon1) = a, b
        start_inside = geofence.covers(lat0, lon0)
        if start_inside == geofence.covers(lat1, lon1):
            return None  # no boundary between them (a geofence created around a device)
        dlon = (lon1 - lon0 + 180.0) % 360.0 - 180.0
        low, high = 0.0, 1.0
        # Enough halvings for a quarter of a microsecond of the interval (it is rounded to one).
        interval_us = (t1 - t0) // timedelta(microseconds=1)
        for _ in range(min(BISECTION_STEPS, max(interval_us, 1).bit_length() + 2)):
            middle = (low + high) / 2
            lon = (lon0 + middle * dlon + 180.0) % 360.0 - 180.0
            if geofence.covers(lat0 + middle * (lat1 - lat0), lon) == start_inside:
                low = middle
            else:
                high = middle
        fraction = (low + high) / 2
        return t0 + timedelta(microseconds=round((t1 - t0) / timedelta(microseconds=1) * fraction))


def id_ranges(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Ids as the fewest runs of consecutive ones, [(first, last), ...]: a set of identity ids
    (most of them active) is a run or a few, a multirange Postgres reads at once
    (`multirange`), where an array of 10,000 ids took it milliseconds to parse."""
    runs: list[tuple[int, int]] = []
    for geofence_id in sorted(ids):
        if runs and geofence_id == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], geofence_id)
        else:
            runs.append((geofence_id, geofence_id))
    return runs


def multirange(runs: Iterable[tuple[int, int]]) -> str:
    """An int8multirange literal of `id_ranges` runs."""
    return "{" + ",".join(f"[{first},{last}]" for first, last in runs) + "}"


def _circle_boxes(geofence: Geofence) -> list[BaseGeometry]:
    """Bounding boxes of a spherical cap in lon/lat: two where it wraps the antimeridian."""
    assert geofence.center is not None and geofence.radius_m is not None
    lat, lon = geofence.center
    angle = geofence.radius_m / EARTH_RADIUS_M * _BOX_MARGIN
    dlat = math.degrees(angle)
    south, north = lat - dlat, lat + dlat
    ratio = math.sin(angle) / max(math.cos(math.radians(lat)), 1e-12)
    if south <= -90 or north >= 90 or angle >= math.pi / 2 or ratio >= 1:
        return [box(-180, max(south, -90), 180, min(north, 90))]
    dlon = math.degrees(math.asin(ratio))
    west, east = lon - dlon, lon + dlon
    if west < -180:
        return [box(west + 360, south, 180, north), box(-180, south, east, north)]
    if east > 180:
        return [box(west, south, 180, north), box(-180, south, east - 360, north)]
    return [box(west, south, east, north)]
