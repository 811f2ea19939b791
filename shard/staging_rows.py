"""A batch's fixes as binary COPY data for `staging_positions`, formatted in one pass.

psycopg's `write_row` finds a dumper for each of a row's eleven values and calls it
from Python; here one precompiled `struct` packs a row's fixed-width columns at once,
which halves what staging costs the shard. The bytes are what psycopg's binary dumpers
write for the same values (tests/shard/test_staging_rows.py compares them in Postgres):
int4/int8/int2 big-endian, float8 and float4 IEEE (float4 rounded as `struct` does),
timestamptz as microseconds since 2000-01-01 UTC, text as UTF-8, jsonb as version 1
then the JSON text orjson writes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from functools import cache

import orjson

from common.errors import RowRejected
from common.faults import one_line
from shard.decode import ExactJson, Fix

# The order the rows are packed in; the COPY statement names it (the table's own order differs).
COLUMNS = ("seq", "cached_version", "ts", "lat", "lon", "alt", "speed", "heading", "sats", "device_id", "attributes")

_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # no flags, no header extension
_TRAILER = b"\xff\xff"
_NULL = b"\xff\xff\xff\xff"
_JSONB_VERSION = b"\x01"
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
_length = struct.Struct(">i").pack
# Field count, then (length, value) for seq .. sats; the nullable ones may be a -1 length alone.
_FIELDS = (("i", 4), ("q", 8), ("q", 8), ("d", 8), ("d", 8), ("f", 4), ("f", 4), ("f", 4), ("h", 2))
_NULLABLE = (1, 5, 6, 7, 8)  # cached_version, alt, speed, heading, sats


@cache
def _head(nulls: tuple[bool, ...]) -> struct.Struct:
    """The packer of a row's fixed-width part when the nullable columns flagged in `nulls` are NULL."""
    flagged = dict(zip(_NULLABLE, nulls))
    code = ">h" + "".join("i" if flagged.get(i) else f"i{kind}" for i, (kind, _) in enumerate(_FIELDS))
    return struct.Struct(code)


_ALL_PRESENT = _head((False,) * len(_NULLABLE)).pack


def copy_data(fixes: Sequence[Fix], cached_versions: Mapping[str, int | None]) -> bytes:
    """The whole COPY stream (signature, rows, trailer) of `fixes` with their devices' cached versions.

    A row that cannot be encoded raises RowRejected: its failure, not the batch's
    (the writer isolates it like a row Postgres refuses).
    """
    # One growing buffer: orjson's results are freed as soon as they are copied. (Keeping them
    # alive for a join costs ~2 µs each: every one holds a fresh, oversized allocation.)
    out = bytearray(_SIGNATURE)
    for seq, fix in enumerate(fixes):
        try:
            device_id, ts, lat, lon, alt, speed, heading, sats, attributes = fix
            version = cached_versions[device_id]
            since = ts - _PG_EPOCH
            micros = (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds
            if version is not None and alt is not None and speed is not None and heading is not None and sats is not None:
                out += _ALL_PRESENT(11, 4, seq, 8, version, 8, micros, 8, lat, 8, lon, 4, alt, 4, speed, 4, heading, 2, sats)
            else:
                out += _head_with_nulls(seq, version, micros, lat, lon, alt, speed, heading, sats)
            name = device_id.encode()
            out += _length(len(name))
            out += name
            if attributes is None:
                out += _NULL
            else:
                document = attributes if type(attributes) is ExactJson else orjson.dumps(attributes)
                out += _length(len(document) + 1)
                out += _JSONB_VERSION
                out += document
        except Exception as exc:
            raise RowRejected(f"row cannot be staged: {type(exc).__name__}: {one_line(exc)}") from exc
    out += _TRAILER
    return bytes(out)


def _head_with_nulls(seq: int, *values: object) -> bytes:
    """The fixed-width part of a row with some NULL among cached_version, alt, speed, heading, sats."""
    nulls = tuple(values[i - 1] is None for i in _NULLABLE)
    args: list[object] = [11, 4, seq]
    for (_, size), value in zip(_FIELDS[1:], values):
        args.extend((-1,) if value is None else (size, value))
    return _head(nulls).pack(*args)
