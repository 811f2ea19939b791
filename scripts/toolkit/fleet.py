"""A deterministic fleet of GPS trackers, one fix dict at a time.

Each fix is what one stream entry's ``data`` field holds (as JSON)::

    {"device_id": "dev-00042", "ts": 1767225600000, "lat": 52.370001,
     "lon": 4.900002, "alt": 3.2, "speed": 42.5, "heading": 87.1,
     "sats": 11, "io": {"ign": 1, "batt_mv": 13950, "odo_km": 12.345}}

``Fleet(devices, seed=1, start_ms=None, center=(52.37, 4.90), spread_deg=0.5)``;
``Fleet.fixes(n, live=False)`` yields ``n`` fix dicts, round-robin over the devices,
1 Hz per device (``ts`` +1000 ms per round). Same seed -> same sequence; consecutive
``fixes()`` calls continue where the last one stopped.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any, Iterator

#: 2026-01-01T00:00:00Z -- fixed default so that output is reproducible.
DEFAULT_START_MS = 1_767_225_600_000

_M_PER_DEG_LAT = 111_320.0
_MAX_SPEED = 115.0  # km/h hard cap of the random walk


def device_id(i: int) -> str:
    """Device id for index ``i`` (``dev-00042``)."""
    return f"dev-{i:05d}"


class Fleet:
    """A deterministic fleet of GPS trackers moving around ``center``.

    All per-device state lives in flat lists mutated in place, so generating
    a fix costs a handful of float operations, three ``random()`` calls, two
    small dicts and a few ``round()``s.
    """

    def __init__(
        self,
        devices: int,
        seed: int = 1,
        start_ms: int | None = None,
        center: tuple[float, float] = (52.37, 4.90),
        spread_deg: float = 0.5,
    ) -> None:
        devices = int(devices)
        if devices < 1:
            raise ValueError("devices must be >= 1")
        clat, clon = float(center[0]), float(center[1])
        spread = float(spread_deg)
        if spread <= 0:
            raise ValueError("spread_deg must be > 0")
        if not (-89.0 <= clat - spread and clat + spread <= 89.0):
            raise ValueError("center/spread must keep latitudes within (-89, 89)")
        if not (-179.0 <= clon - spread and clon + spread <= 179.0):
            raise ValueError("center/spread must keep longitudes within (-179, 179)")

        self.devices = devices
        self.seed = seed
        self.start_ms = DEFAULT_START_MS if start_ms is None else int(start_ms)
        self.center = (clat, clon)
        self.spread_deg = spread
        self.rng = rng = random.Random(seed)
        rnd = rng.random

        self.ids = [device_id(i) for i in range(devices)]
        self.lat: list[float] = []
        self.lon: list[float] = []
        self.m_per_deg_lon: list[float] = []
        self.speed: list[float] = []
        self.target: list[float] = []
        self.heading: list[float] = []
        self.turn: list[float] = []
        self.alt: list[float] = []
        self.sats: list[int] = []
        self.odo: list[float] = []
        # Last emitted ts per device.  Devices are staggered inside the second
        # so that one round-robin round is in ts order.
        self.ts: list[int] = []
        for i in range(devices):
            lat = clat + (rnd() * 2.0 - 1.0) * spread * 0.8
            lon = clon + (rnd() * 2.0 - 1.0) * spread * 0.8
            self.lat.append(lat)
            self.lon.append(lon)
            self.m_per_deg_lon.append(_M_PER_DEG_LAT * math.cos(math.radians(lat)))
            moving = rnd() < 0.85
            tgt = 10.0 + rnd() * 100.0 if moving else 0.0
            self.target.append(tgt)
            self.speed.append(tgt * (0.5 + rnd() * 0.5))
            self.heading.append(rnd() * 360.0)
            self.turn.append(0.0)
            self.alt.append(-4.0 + rnd() * 30.0)
            self.sats.append(6 + int(rnd() * 10))
            self.odo.append(1000.0 + rnd() * 200_000.0)
            self.ts.append(self.start_ms + (i * 1000) // devices - 1000)
        self._next = 0  # round-robin position

    def fixes(self, n: int, live: bool = False) -> Iterator[dict[str, Any]]:
        """Yield ``n`` fix dicts, round-robin over the devices.

        Each device's ``ts`` advances by exactly 1000 ms per round.  With
        ``live=True`` the ``ts`` is the wall clock instead (ms, forced strictly
        increasing per device); the track itself still advances 1 s per fix.
        """
        rnd = self.rng.random
        ids = self.ids
        lat_a, lon_a, mdl_a = self.lat, self.lon, self.m_per_deg_lon
        sp_a, tgt_a, hd_a, tr_a = self.speed, self.target, self.heading, self.turn
        alt_a, sats_a, odo_a, ts_a = self.alt, self.sats, self.odo, self.ts
        clat, clon = self.center
        spread = self.spread_deg
        ndev = self.devices
        cos, sin, radians, atan2, degrees = math.cos, math.sin, math.radians, math.atan2, math.degrees
        time_ns = time.time_ns
        i = self._next
        for _ in range(int(n)):
            r1 = rnd()
            r2 = rnd()
            r3 = rnd()

            # -- speed: smoothed random walk towards a target, occasional stops
            tgt = tgt_a[i]
            if r1 < 0.02:  # new target roughly every 50 s
                tgt = 0.0 if r1 < 0.004 else 5.0 + r2 * 105.0
                tgt_a[i] = tgt
            sp = sp_a[i]
            sp += (tgt - sp) * 0.08 + (r2 - 0.5) * 2.0
            if sp < 0.0 or (tgt == 0.0 and sp < 1.0):
                sp = 0.0
            elif sp > _MAX_SPEED:
                sp = _MAX_SPEED
            sp_a[i] = sp

            lat = lat_a[i]
            lon = lon_a[i]
            hd = hd_a[i]
            if sp > 0.0:
                # -- heading: smooth turn rate, a few degrees per second
                tr = tr_a[i] * 0.9 + (r3 - 0.5) * 1.6
                dlat = lat - clat
                dlon = lon - clon
                if dlat > spread or dlat < -spread or dlon > spread or dlon < -spread:
                    # outside the area: steer smoothly back towards the center
                    bearing = degrees(atan2(-dlon * mdl_a[i], -dlat * _M_PER_DEG_LAT))
                    diff = (bearing - hd + 540.0) % 360.0 - 180.0
                    tr = 6.0 if diff > 6.0 else (-6.0 if diff < -6.0 else diff)
                elif tr > 6.0:
                    tr = 6.0
                elif tr < -6.0:
                    tr = -6.0
                tr_a[i] = tr
                hd = (hd + tr) % 360.0
                hd_a[i] = hd
                # -- position: speed x 1 s along heading (local flat earth)
                dist = sp / 3.6
                h = radians(hd)
                lat += dist * cos(h) / _M_PER_DEG_LAT
                lon += dist * sin(h) / mdl_a[i]
                lat_a[i] = lat
                lon_a[i] = lon
                odo_a[i] += dist / 1000.0
                ign = 1
                batt = 14_200 - int(r3 * 400.0)
            else:
                ign = 0 if tgt == 0.0 else 1
                batt = (14_200 - int(r3 * 400.0)) if ign else (12_700 - int(r3 * 200.0))

            # -- altitude: smooth drift
            alt = alt_a[i] + (r3 - 0.5) * 0.3
            alt_a[i] = alt

            # -- satellites: occasional +-1 within 4..20
            s = sats_a[i]
            if 0.02 <= r1 < 0.05:
                if r1 < 0.035:
                    if s < 20:
                        s += 1
                elif s > 4:
                    s -= 1
                sats_a[i] = s

            if live:
                ts = time_ns() // 1_000_000
                prev = ts_a[i] + 1
                if ts < prev:
                    ts = prev
            else:
                ts = ts_a[i] + 1000
            ts_a[i] = ts

            hdr = round(hd, 1)
            if hdr >= 360.0:
                hdr = 0.0
            yield {
                "device_id": ids[i],
                "ts": ts,
                "lat": round(lat, 6),
                "lon": round(lon, 6),
                "alt": round(alt, 1),
                "speed": round(sp, 1),
                "heading": hdr,
                "sats": s,
                "io": {"ign": ign, "batt_mv": batt, "odo_km": round(odo_a[i], 3)},
            }
            i += 1
            if i == ndev:
                i = 0
            self._next = i

    def __iter__(self) -> Iterator[dict[str, Any]]:  # endless stream
        while True:
            yield from self.fixes(self.devices)
