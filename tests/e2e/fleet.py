"""A fleet with geofences on its tracks, late uploads and resent fixes, and its expected result."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg

from scripts.toolkit.fleet import Fleet
from shard.decode import decode_entry
from shard.devices.track import DeviceState, TrackFix, advance
from shard.geo import GeofenceIndex, parse_geofence


@dataclass
class Scenario:
    entries: list[bytes]  # `data` values in stream order
    geofences: list[dict[str, Any]]  # name, geometry, radius_m
    fixes: list[dict[str, Any]] = field(default_factory=list)  # every distinct fix


def build_scenario(devices: int = 24, per_device: int = 500, late_devices: int = 6, seed: int = 5) -> Scenario:
    """Fixes in round-robin order, with chunks of some devices' fixes moved to the end (late)."""
    rng = random.Random(seed)
    fixes = list(Fleet(devices, seed=seed, spread_deg=0.05).fixes(devices * per_device))
    geofences = _geofences_on_tracks(fixes, rng)
    late_ids = {f"dev-{i:05d}" for i in rng.sample(range(devices), late_devices)}
    on_time, late = [], []
    for fix in fixes:
        rank = (fix["ts"] - fixes[0]["ts"]) // 1000
        (late if fix["device_id"] in late_ids and 150 <= rank < 230 else on_time).append(fix)
    resent = rng.sample(fixes, 150)
    entries = [orjson.dumps(f) for f in on_time + late + resent]
    return Scenario(entries, geofences, fixes)


def _geofences_on_tracks(fixes: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """Circles, squares (one with a hole) and a MultiPolygon placed where devices drive."""
    geofences = []
    for n, fix in enumerate(rng.sample(fixes, 40)):
        lat, lon = fix["lat"], fix["lon"]
        name = f"gf-{n:02d}"
        if n % 3 == 0:
            geofences.append({"name": name, "geometry": {"type": "Point", "coordinates": [lon, lat]}, "radius_m": 40 + n * 5})
            continue
        d = 0.0004 + 0.00005 * n
        ring = [[lon - d, lat - d], [lon + d, lat - d], [lon + d, lat + d], [lon - d, lat + d], [lon - d, lat - d]]
        if n % 3 == 1:
            h = d / 3
            hole = [[lon - h, lat - h], [lon - h, lat + h], [lon + h, lat + h], [lon + h, lat - h], [lon - h, lat - h]]
            geometry = {"type": "Polygon", "coordinates": [ring, hole] if n % 2 else [ring]}
        else:
            far = [[x + 0.01, y] for x, y in ring]
            geometry = {"type": "MultiPolygon", "coordinates": [[ring], [far]]}
        geofences.append({"name": name, "geometry": geometry, "radius_m": None})
    return geofences


def insert_geofences(database_url: str, geofences: list[dict[str, Any]]) -> None:
    with psycopg.connect(database_url) as conn:
        for g in geofences:
            conn.execute(
                "INSERT INTO geofences (name, geometry, radius_m) VALUES (%s, %s, %s)",
                (g["name"], orjson.dumps(g["geometry"]).decode(), g["radius_m"]),
            )


def serial_replay(scenario: Scenario) -> tuple[list[tuple], dict[str, float]]:
    """Visits (by geofence name) and odometers from a plain in-order pass over the fixes."""
    return timeline_replay(scenario.fixes, [(None, scenario.geofences)])


# (ts in ms from which the set applies, None for the first; the active geofences then)
Timeline = list[tuple[int | None, list[dict[str, Any]]]]


def timeline_replay(fixes: list[dict[str, Any]], timeline: Timeline) -> tuple[list[tuple], dict[str, float]]:
    """An in-order pass over every device's fixes that switches geofence sets as `timeline` says.

    The set of the last entry whose ts is not above a fix's applies to that fix: a change
    committed between two of a device's fixes takes effect at the later one. Geofences are
    named; one that leaves a set and comes back is the same geofence.
    """
    ids: dict[str, int] = {}
    for _, geofences in timeline:
        for g in geofences:
            ids.setdefault(g["name"], len(ids))
    indexes = [
        (since, GeofenceIndex([parse_geofence(ids[g["name"]], g["name"], g["geometry"], g["radius_m"]) for g in geofences]))
        for since, geofences in timeline
    ]
    names = {n: name for name, n in ids.items()}
    by_device: dict[str, dict[datetime, Any]] = {}
    for fix in fixes:
        decoded = decode_entry({b"data": orjson.dumps(fix)})
        by_device.setdefault(decoded.device_id, {}).setdefault(decoded.ts, decoded)
    visits: dict[tuple, Any] = {}
    odometers = {}
    for device_id, track in by_device.items():
        state = DeviceState(device_id)
        for ts in sorted(track):
            fix = track[ts]
            ms = round(ts.timestamp() * 1000)
            index = [index for since, index in indexes if since is None or since <= ms][-1]
            inside = index.inside([fix.lat], [fix.lon])[0]
            for visit in advance(state, TrackFix(fix.ts, fix.lat, fix.lon, fix.speed), inside, index):
                visits[(device_id, visit.geofence_id, visit.entered_at)] = visit
        odometers[device_id] = state.odometer_m
    rows = sorted(
        (d, names[g], v.entered_at, v.exited_at, v.entry_crossing_at, v.exit_crossing_at, v.distance_m, v.max_speed, v.samples)
        for (d, g, _), v in visits.items()
    )
    return rows, odometers


def stored_result(database_url: str) -> tuple[list[tuple], dict[str, float]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT t.device_id, g.name, t.entered_at, t.exited_at, t.entry_crossing_at, t.exit_crossing_at, "
            "t.distance_m, t.max_speed, t.samples FROM timing_records t JOIN geofences g ON g.id = t.geofence_id "
            "ORDER BY 1, 2, 3"
        ).fetchall()
        odometers = dict(conn.execute("SELECT device_id, odometer_m FROM last_position").fetchall())
    return [tuple(r) for r in rows], odometers


def assert_same_result(actual: tuple[list[tuple], dict[str, float]], expected: tuple[list[tuple], dict[str, float]]) -> None:
    """Identical visits (crossing times within 1 ms, floats to 1e-6) and odometers."""
    rows, odometers = actual
    want_rows, want_odometers = expected
    assert [r[:4] + (r[8],) for r in rows] == [r[:4] + (r[8],) for r in want_rows]
    for got, want in zip(rows, want_rows):
        for a, b in ((got[4], want[4]), (got[5], want[5])):
            assert (a is None) == (b is None), (got, want)
            if a is not None:
                assert abs((a - b).total_seconds()) < 0.001, (got, want)
        assert abs(got[6] - want[6]) < 1e-6 * max(1.0, want[6]), (got, want)
        assert (got[7] is None and want[7] is None) or abs(got[7] - want[7]) < 1e-3, (got, want)
    assert odometers.keys() == want_odometers.keys()
    for device_id, value in want_odometers.items():
        assert abs(odometers[device_id] - value) < 1e-6 * max(1.0, value), device_id
