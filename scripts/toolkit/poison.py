"""Poison stream entries: one malformed ``data`` value of each kind the contract rejects."""

from __future__ import annotations

import random
from typing import Any, Callable

import orjson

from scripts.toolkit.fleet import DEFAULT_START_MS, device_id

_dumps = orjson.dumps


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


def poison_rng(seed: int) -> random.Random:
    """The generator that decides which entries are poison, independent of the fleet's."""
    return random.Random(f"simulate-poison:{seed}")
