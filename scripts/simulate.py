#!/usr/bin/env python3
"""Deterministic GPS-tracker fleet simulator feeding a Redis Stream.

Each stream entry has a single field ``data`` holding a UTF-8 JSON object::

    {"device_id": "dev-00042", "ts": 1767225600000, "lat": 52.370001,
     "lon": 4.900002, "alt": 3.2, "speed": 42.5, "heading": 87.1,
     "sats": 11, "io": {"ign": 1, "batt_mv": 13950, "odo_km": 12.345}}

Importable API
--------------
``Fleet(devices, seed=1, start_ms=None, center=(52.37, 4.90), spread_deg=0.5)``
    ``Fleet.fixes(n, live=False)`` yields ``n`` fix dicts, round-robin over the
    devices, 1 Hz per device (``ts`` +1000 ms per round).  Same seed -> same
    sequence; consecutive ``fixes()`` calls continue where the last one stopped.
``malformed(rng, kind=None) -> bytes`` and ``MALFORMED_KINDS``
    One poison ``data`` value.
``produce(client, stream, fixes, *, malformed_fraction=0.0, seed=1,
pipeline_size=1000, devices=100, progress=None) -> Counts``
    Pipelined XADD of ``{"data": orjson.dumps(fix)}`` entries.
``backlog(client, stream, n, devices=100, seed=1, malformed_fraction=0.0, ...)``
    Write ``n`` entries as fast as possible.
``steady(client, stream, rate_per_s, seconds, devices=100, seed=1,
malformed_fraction=0.0, on_sent=None, ...)``
    Paced writer (10 ms ticks on ``time.monotonic()``) with wall-clock ``ts``.

CLI
---
::

    python scripts/simulate.py backlog 200000 --devices 2000 [--seed S] [--malformed F]
    python scripts/simulate.py steady --rate 5000 --seconds 30 [--devices D] ...

Common options: ``--stream`` (env ``STREAM_KEY``, default ``telemetry:t``),
``--redis-url`` (env ``REDIS_URL``, default ``redis://localhost:6379/0``).
Progress goes to stderr (at most every 0.5 s); one JSON summary line goes to
stdout at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import orjson

__all__ = [
    "DEFAULT_START_MS",
    "MALFORMED_KINDS",
    "Counts",
    "Fleet",
    "backlog",
    "device_id",
    "main",
    "malformed",
    "produce",
    "redact_url",
    "steady",
]

#: 2026-01-01T00:00:00Z -- fixed default so that output is reproducible.
DEFAULT_START_MS = 1_767_225_600_000

_M_PER_DEG_LAT = 111_320.0
_MAX_SPEED = 115.0  # km/h hard cap of the random walk
_dumps = orjson.dumps


def device_id(i: int) -> str:
    """Device id for index ``i`` (``dev-00042``)."""
    return f"dev-{i:05d}"


# --------------------------------------------------------------------------
# Fleet
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Poison
# --------------------------------------------------------------------------


def _base(rng: random.Random) -> dict[str, Any]:
    return {
        "device_id": device_id(rng.randrange(100_000)),
        "ts": DEFAULT_START_MS + rng.randrange(86_400_000),
        "lat": round(52.0 + rng.random(), 6),
        "lon": round(4.5 + rng.random(), 6),
        "alt": round(rng.random() * 20.0, 1),
        "speed": round(rng.random() * 100.0, 1),
        "heading": round(rng.random() * 359.0, 1),
        "sats": 4 + rng.randrange(17),
        "io": {"ign": 1, "batt_mv": 13_900, "odo_km": round(rng.random() * 1e5, 3)},
    }


def _with(**changes: Any) -> Callable[[random.Random], bytes]:
    def make(rng: random.Random) -> bytes:
        fix = _base(rng)
        fix.update(changes)
        return _dumps(fix)

    return make


def _without(key: str) -> Callable[[random.Random], bytes]:
    def make(rng: random.Random) -> bytes:
        fix = _base(rng)
        del fix[key]
        return _dumps(fix)

    return make


def _raw_number(key: str, literal: bytes) -> Callable[[random.Random], bytes]:
    """Replace the value of ``key`` by a raw (non-orjson) JSON literal."""

    def make(rng: random.Random) -> bytes:
        fix = _base(rng)
        fix[key] = 0.0
        return _dumps(fix).replace(b'"%s":0.0' % key.encode(), b'"%s":%s' % (key.encode(), literal), 1)

    return make


def _not_json(rng: random.Random) -> bytes:
    return rng.choice([b"not json at all", b"{device_id: dev-00001, ts: 1}", b'{"device_id":"dev-00001","ts":17', b""])


def _invalid_utf8(rng: random.Random) -> bytes:
    fix = _base(rng)
    fix["device_id"] = "dev-@@"
    return _dumps(fix).replace(b"dev-@@", b"dev-\xff\xfe\xc3", 1)


_MALFORMED: dict[str, Callable[[random.Random], bytes]] = {
    "not_json": _not_json,
    "json_array": lambda rng: _dumps([_base(rng)]),
    "json_scalar": lambda rng: rng.choice([b"null", b"42", b'"dev-00001"', b"true"]),
    "missing_device_id": _without("device_id"),
    "empty_device_id": _with(device_id=""),
    "long_device_id": _with(device_id="d" * 65),
    "device_id_control_char": _with(device_id="dev-\x01bad"),
    "device_id_not_string": _with(device_id=42),
    "missing_ts": _without("ts"),
    "ts_bogus_string": _with(ts="yesterday at noon"),
    "ts_iso_no_offset": _with(ts="2026-01-01T12:00:00"),
    "missing_lat": _without("lat"),
    "lat_91": _with(lat=91.0),
    "lon_minus_181": _with(lon=-181.0),
    "lat_nan_string": _with(lat="NaN"),
    "lat_nan_literal": _raw_number("lat", b"NaN"),
    "lat_1e999": _raw_number("lat", b"1e999"),
    "speed_negative": _with(speed=-5.0),
    "heading_400": _with(heading=400.0),
    "sats_negative": _with(sats=-1),
    "io_list": _with(io=[1, 2, 3]),
    "invalid_utf8": _invalid_utf8,
}

#: Names of the poison kinds :func:`malformed` draws from.
MALFORMED_KINDS: list[str] = list(_MALFORMED)


def malformed(rng: random.Random, kind: str | None = None) -> bytes:
    """Return one poison ``data`` value (bytes) of ``kind`` (random if None)."""
    if kind is None:
        kind = rng.choice(MALFORMED_KINDS)
    return _MALFORMED[kind](rng)


# --------------------------------------------------------------------------
# Writing to Redis
# --------------------------------------------------------------------------


@dataclass(slots=True)
class Counts:
    valid: int = 0
    malformed: int = 0

    @property
    def total(self) -> int:
        return self.valid + self.malformed

    def as_dict(self) -> dict[str, int]:
        return {"valid": self.valid, "malformed": self.malformed, "total": self.total}


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


class _Writer:
    """Sends batches of ``XADD stream * data <payload>``.

    Fast path: commands are packed by hand into one buffer, written with a
    single ``sendall`` on a pooled connection and the replies read back one by
    one.  Clients without a standard connection pool fall back to a
    non-transactional redis-py pipeline.
    """

    def __init__(self, client: Any, stream: str | bytes) -> None:
        self.client = client
        key = stream.encode() if isinstance(stream, str) else bytes(stream)
        self.stream = key
        self.prefix = b"*5\r\n$4\r\nXADD\r\n" + _bulk(key) + b"$1\r\n*\r\n$4\r\ndata\r\n"
        pool = getattr(client, "connection_pool", None)
        self.raw = pool is not None and hasattr(pool, "get_connection") and hasattr(pool, "release")
        self.conn: Any = None

    def send(self, payloads: Sequence[bytes]) -> int:
        """XADD every payload; returns how many were added.  Raises the first
        error reply after having drained all replies of the batch."""
        if not payloads:
            return 0
        if not self.raw:
            return self._send_pipeline(payloads)
        prefix = self.prefix
        buf = b"".join([b"%s$%d\r\n%s\r\n" % (prefix, len(p), p) for p in payloads])
        if self.conn is None:
            self.conn = self.client.connection_pool.get_connection()
        conn = self.conn
        try:
            conn.send_packed_command([buf])
            read = conn.read_response
            first_error = None
            ok = 0
            for _ in range(len(payloads)):
                try:
                    read(disable_decoding=True)
                    ok += 1
                except Exception as exc:  # error reply: keep draining
                    if first_error is None:
                        first_error = exc
                    if not _is_reply_error(exc):
                        raise
        except BaseException:
            # Unknown number of unread replies: never reuse this connection.
            self._drop()
            raise
        if first_error is not None:
            raise first_error
        return ok

    def _send_pipeline(self, payloads: Sequence[bytes]) -> int:
        pipe = self.client.pipeline(transaction=False)
        key = self.stream
        for p in payloads:
            pipe.execute_command("XADD", key, "*", "data", p)
        results = pipe.execute(raise_on_error=False)
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise errors[0]
        return len(results)

    def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.disconnect()
            finally:
                self.client.connection_pool.release(conn)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            self.client.connection_pool.release(conn)


def _is_reply_error(exc: BaseException) -> bool:
    try:
        from redis.exceptions import ConnectionError as RConnErr
        from redis.exceptions import ResponseError, TimeoutError as RTimeout
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, ResponseError) and not isinstance(exc, (RConnErr, RTimeout))


def _poison_rng(seed: int) -> random.Random:
    return random.Random(f"simulate-poison:{seed}")


def produce(
    client: Any,
    stream: str,
    fixes: Iterable[dict[str, Any] | bytes] | int,
    *,
    malformed_fraction: float = 0.0,
    seed: int = 1,
    pipeline_size: int = 1000,
    devices: int = 100,
    progress: Callable[[Counts], None] | None = None,
) -> Counts:
    """XADD ``{"data": orjson.dumps(fix)}`` for every fix, pipelined.

    ``fixes`` is an iterable of fix dicts (``bytes`` items are sent verbatim
    and counted as valid) or an int ``n`` meaning ``Fleet(devices, seed).fixes(n)``.
    With ``malformed_fraction`` > 0, each entry is replaced by
    :func:`malformed` data with that probability (seeded by ``seed``); the
    replaced fix is consumed, so the number of entries is unchanged.
    ``progress(counts)`` is called after every acknowledged batch.
    """
    if isinstance(fixes, int):
        fixes = Fleet(devices, seed=seed).fixes(fixes)
    if not 0.0 <= malformed_fraction <= 1.0:
        raise ValueError("malformed_fraction must be within [0, 1]")
    pipeline_size = max(1, int(pipeline_size))
    prng = _poison_rng(seed)
    prnd = prng.random
    mf = float(malformed_fraction)
    dumps = _dumps
    counts = Counts()
    writer = _Writer(client, stream)
    batch: list[bytes] = []
    append = batch.append
    bad = 0
    try:
        for fix in fixes:
            if mf and prnd() < mf:
                append(malformed(prng))
                bad += 1
            elif type(fix) is bytes:
                append(fix)
            else:
                append(dumps(fix))
            if len(batch) >= pipeline_size:
                writer.send(batch)
                counts.malformed += bad
                counts.valid += len(batch) - bad
                batch.clear()
                bad = 0
                if progress is not None:
                    progress(counts)
        if batch:
            writer.send(batch)
            counts.malformed += bad
            counts.valid += len(batch) - bad
            batch.clear()
            if progress is not None:
                progress(counts)
    finally:
        writer.close()
    return counts


def backlog(
    client: Any,
    stream: str,
    n: int,
    devices: int = 100,
    seed: int = 1,
    malformed_fraction: float = 0.0,
    *,
    start_ms: int | None = None,
    pipeline_size: int = 1000,
    progress: Callable[[Counts], None] | None = None,
) -> Counts:
    """Write ``n`` entries as fast as possible (deterministic ``ts``)."""
    fleet = Fleet(devices, seed=seed, start_ms=start_ms)
    return produce(
        client,
        stream,
        fleet.fixes(n),
        malformed_fraction=malformed_fraction,
        seed=seed,
        pipeline_size=pipeline_size,
        progress=progress,
    )


def steady(
    client: Any,
    stream: str,
    rate_per_s: float,
    seconds: float,
    devices: int = 100,
    seed: int = 1,
    malformed_fraction: float = 0.0,
    on_sent: Callable[[list[tuple[dict[str, Any], float]]], None] | None = None,
    *,
    tick_s: float = 0.01,
    pipeline_size: int = 1000,
    progress: Callable[[Counts], None] | None = None,
) -> Counts:
    """Offer ``rate_per_s`` entries/s for ``seconds`` s (``round(rate*seconds)`` total).

    Every ``tick_s`` the entries due by ``time.monotonic()`` are generated
    (``ts`` = wall clock ms) and sent in one pipelined batch, so the load is
    smooth.  If the writer falls behind it catches up in batches of at most
    ``pipeline_size``.  ``on_sent`` receives ``[(fix, t_send_monotonic), ...]``
    for the valid fixes of each batch once the batch is acknowledged
    (``t_send`` is taken just before the write).
    """
    if rate_per_s <= 0 or seconds < 0:
        raise ValueError("rate_per_s must be > 0 and seconds >= 0")
    if not 0.0 <= malformed_fraction <= 1.0:
        raise ValueError("malformed_fraction must be within [0, 1]")
    total = int(round(rate_per_s * seconds))
    pipeline_size = max(1, int(pipeline_size))
    fleet = Fleet(devices, seed=seed, start_ms=time.time_ns() // 1_000_000)
    gen = fleet.fixes(total, live=True)
    prng = _poison_rng(seed)
    prnd = prng.random
    mf = float(malformed_fraction)
    dumps = _dumps
    monotonic = time.monotonic
    sleep = time.sleep
    counts = Counts()
    writer = _Writer(client, stream)
    sent = 0
    try:
        t0 = monotonic()
        next_tick = t0
        while sent < total:
            now = monotonic()
            due = int((now - t0) * rate_per_s) + 1  # the first entry goes at t0
            if due > total:
                due = total
            while sent < due:
                k = min(due - sent, pipeline_size)
                payloads: list[bytes] = []
                fixes_sent: list[dict[str, Any]] = []
                bad = 0
                for _ in range(k):
                    fix = next(gen)
                    if mf and prnd() < mf:
                        payloads.append(malformed(prng))
                        bad += 1
                    else:
                        payloads.append(dumps(fix))
                        if on_sent is not None:
                            fixes_sent.append(fix)
                t_send = monotonic()
                writer.send(payloads)
                sent += k
                counts.malformed += bad
                counts.valid += k - bad
                if on_sent is not None and fixes_sent:
                    on_sent([(f, t_send) for f in fixes_sent])
                if progress is not None:
                    progress(counts)
            if sent >= total:
                break
            next_tick += tick_s
            now = monotonic()
            if next_tick > now:
                sleep(next_tick - now)
            else:
                next_tick = now  # behind schedule: don't accumulate a burst of ticks
    finally:
        writer.close()
    return counts


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))
    except ValueError:
        return "<redis url>"


class _Progress:
    """Rate-limited progress line on stderr (``\\r`` on a TTY)."""

    def __init__(self, label: str, total: int, interval: float = 0.5) -> None:
        self.label = label
        self.total = total
        self.interval = interval
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.last = 0.0
        self.counts: Counts | None = None
        self.dirty = False

    def __call__(self, counts: Counts) -> None:
        self.counts = counts
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._emit(now)

    def _emit(self, now: float) -> None:
        c = self.counts
        if c is None:
            return
        el = max(now - self.t0, 1e-9)
        pct = 100.0 * c.total / self.total if self.total else 100.0
        line = (
            f"{self.label}: {c.total}/{self.total} ({pct:5.1f}%) "
            f"valid={c.valid} malformed={c.malformed} {el:6.1f}s {c.total / el:,.0f}/s"
        )
        if self.tty:
            sys.stderr.write("\r" + line + "\x1b[K")
            self.dirty = True
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty and self.dirty:
            self._emit(time.monotonic())
            sys.stderr.write("\n")
            sys.stderr.flush()


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--devices", type=int, default=1000, help="number of simulated trackers (default 1000)")
    common.add_argument("--seed", type=int, default=1, help="RNG seed (default 1)")
    common.add_argument(
        "--malformed", type=float, default=0.0, metavar="F", help="fraction of poison entries, 0..1 (default 0)"
    )
    common.add_argument(
        "--stream",
        default=os.environ.get("STREAM_KEY", "telemetry:t"),
        help="stream key (env STREAM_KEY, default telemetry:t)",
    )
    common.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", "redis://localhost:6379/0"),
        help="Redis URL (env REDIS_URL, default redis://localhost:6379/0)",
    )
    common.add_argument("--pipeline", type=int, default=1000, help="commands per pipelined batch (default 1000)")

    p = argparse.ArgumentParser(prog="simulate.py", description="GPS-tracker fleet simulator for a Redis Stream.")
    sub = p.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("backlog", parents=[common], help="write N entries as fast as possible")
    b.add_argument("n", type=int, help="number of entries")
    b.add_argument(
        "--start-ms",
        default=None,
        help=f"ts of the first round: epoch ms or 'now' (default {DEFAULT_START_MS})",
    )
    s = sub.add_parser("steady", parents=[common], help="offer a steady rate with live timestamps")
    s.add_argument("--rate", type=float, required=True, help="entries per second")
    s.add_argument("--seconds", type=float, required=True, help="duration in seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if not 0.0 <= args.malformed <= 1.0:
        print("error: --malformed must be within [0, 1]", file=sys.stderr)
        return 2
    if args.devices < 1:
        print("error: --devices must be >= 1", file=sys.stderr)
        return 2

    import redis

    try:
        client = redis.Redis.from_url(args.redis_url)
    except ValueError:
        print(f"error: invalid Redis URL {redact_url(args.redis_url)}", file=sys.stderr)
        return 2

    if args.mode == "backlog":
        total = max(0, args.n)
        start_ms = None
        if args.start_ms is not None:
            start_ms = time.time_ns() // 1_000_000 if args.start_ms == "now" else int(args.start_ms)
    else:
        total = int(round(args.rate * args.seconds))
    prog = _Progress(args.mode, total)
    interrupted = False
    counts = Counts()
    t0 = time.monotonic()
    try:
        if args.mode == "backlog":
            counts = backlog(
                client,
                args.stream,
                total,
                devices=args.devices,
                seed=args.seed,
                malformed_fraction=args.malformed,
                start_ms=start_ms,
                pipeline_size=args.pipeline,
                progress=prog,
            )
        else:
            counts = steady(
                client,
                args.stream,
                args.rate,
                args.seconds,
                devices=args.devices,
                seed=args.seed,
                malformed_fraction=args.malformed,
                pipeline_size=args.pipeline,
                progress=prog,
            )
    except KeyboardInterrupt:
        interrupted = True
        counts = prog.counts or counts
    except redis.RedisError as exc:
        prog.finish()
        msg = str(exc)
        if args.redis_url and urlsplit(args.redis_url).password:
            msg = msg.replace(urlsplit(args.redis_url).password, "***")
        print(f"error: {type(exc).__name__}: {msg} ({redact_url(args.redis_url)})", file=sys.stderr)
        return 1
    finally:
        client.close()
    seconds = time.monotonic() - t0
    prog.finish()
    out: dict[str, Any] = {
        "mode": args.mode,
        "stream": args.stream,
        "devices": args.devices,
        "seed": args.seed,
        **counts.as_dict(),
        "seconds": round(seconds, 3),
        "rate": round(counts.total / seconds, 1) if seconds > 0 else None,
    }
    if args.mode == "steady":
        out["target_rate"] = args.rate
    if interrupted:
        out["interrupted"] = True
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
