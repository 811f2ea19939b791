"""Cost of the geofence membership test per fix, for few and for many geofences."""

from __future__ import annotations

import math
import random
import time

from scripts.benchmark.base import SEED, Result, say


def run_membership(result: Result, counts: tuple[int, ...] = (10, 1_000, 10_000), points: int = 50_000) -> None:
    """Cost of the geofence test per fix (STRtree + exact check) for few and for many geofences."""
    from shard.geo import GeofenceIndex, parse_geofence

    rng = random.Random(SEED)
    lats = [52.37 + (rng.random() * 2 - 1) * 0.45 for _ in range(points)]
    lons = [4.90 + (rng.random() * 2 - 1) * 0.45 for _ in range(points)]
    for count in counts:
        fences = []
        for n in range(count):
            lat, lon = 52.37 + (rng.random() * 2 - 1) * 0.45, 4.90 + (rng.random() * 2 - 1) * 0.45
            if n % 2:
                fences.append(parse_geofence(n, f"c{n}", {"type": "Point", "coordinates": [lon, lat]}, 100 + rng.random() * 500))
            else:
                d = 0.002 + rng.random() * 0.004
                ring = [[lon - d, lat - d], [lon + d, lat - d], [lon + d, lat + d], [lon - d, lat + d], [lon - d, lat - d]]
                fences.append(parse_geofence(n, f"p{n}", {"type": "Polygon", "coordinates": [ring]}, None))
        index = GeofenceIndex(fences)
        best = math.inf
        for _ in range(3):
            t = time.perf_counter()
            inside = sum(len(ids) for i in range(0, points, 500) for ids in index.inside(lats[i:i + 500], lons[i:i + 500]))
            best = min(best, time.perf_counter() - t)
        result.values[f"us_per_fix_{count}"] = best / points * 1e6
        result.values[f"inside_share_{count}"] = inside / points
        say(f"  membership with {count:,} geofences: {best / points * 1e6:.2f} µs per fix "
            f"({inside / points:.1%} of fixes inside one)")
