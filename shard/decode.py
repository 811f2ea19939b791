"""Decoding and validation of one stream entry (SPEC §2): a fix, or InvalidEntry."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, NamedTuple

import msgspec
import orjson

from common.contract import device_id_problem
from common.errors import InvalidEntry
from common.keys import DATA_FIELD
from shard.poison import invalid, json_type, preview
from shard.timestamps import EPOCH, MAX_TS_MS, timestamp

# Limits on what one entry may be (docs/contract.md, "Limits"). Each bounds the work and
# memory one entry can cost a shard; beyond any of them the entry is `validate` poison
# whose error names the limit. Checked before parsing where the raw entry tells.
MAX_ENTRY_BYTES = 1 << 20  # field names and values of the entry, together
MAX_ENTRY_FIELDS = 100  # field/value pairs of the stream entry
MAX_DATA_MEMBERS = 64  # members of the `data` object (SPEC §2 names nine)
MAX_IO_MEMBERS = 512  # members of `io`, counted at every level
MAX_JSON_DEPTH = 16  # nesting of `data`: the object itself is depth 1, `io` depth 2
# Largest finite float4: `alt`, `speed` and `heading` are `real` columns.
MAX_REAL = 3.4028234663852886e38
MAX_SMALLINT = 32_767


class Fix(NamedTuple):
    """One position fix, in the column order of `positions` (and of the COPY into staging)."""

    device_id: str
    ts: datetime
    lat: float
    lon: float
    alt: float | None
    speed: float | None
    heading: float | None
    sats: int | None
    attributes: dict[str, Any] | ExactJson | None


def decode_entry(fields: Sequence[bytes] | Mapping[bytes, bytes], not_after: datetime | None = None) -> Fix:
    """The fix carried by an entry's `data` field; raises InvalidEntry for poison.

    `fields` is the entry's flat [name, value, …] list as Redis sent it (or a dict);
    a fix dated after `not_after` (the clock plus MAX_FUTURE_S) is poison too.
    The fast path takes the common, valid entry; every other one takes the slow path
    (`decode_entry_slow`'s), which alone decides what is poison and says why.
    """
    raw = _data_field(fields if type(fields) is list else _flat(fields))  # a list skips the ABC check
    try:
        fix = _decode_fast(raw)
    except _UNUSUAL:
        fix = _exact_io(_decode_slow(raw), raw)
    return _not_after(fix, not_after)


def decode_entry_slow(fields: Sequence[bytes] | Mapping[bytes, bytes], not_after: datetime | None = None) -> Fix:
    """decode_entry without the fast path: orjson, then every rule checked in Python (the reference)."""
    raw = _data_field(_flat(fields))
    return _not_after(_exact_io(_decode_slow(raw), raw), not_after)


class ExactJson(bytes):
    """`io` as the producer wrote it, stored as such: its numbers would not survive a float64.

    jsonb keeps any JSON number exactly; a parser's float64 does not: a 20-digit ICCID sent
    as a number, a decimal of 20 digits, 1e-400 (read as 0.0). The checks ran on the parsed
    `io`; only what is stored is the text.
    """


# A number float64 may round has 16 digits or more, or an exponent of 3 digits. A string
# with such a run (an ICCID as text) takes the same path, which stores it the same. Looked for
# in the text's shape (digits → 0, e/E → e, signs dropped, the rest → space): a translate and
# two finds cost ~0.4 µs for an `io` of 50 bytes, a regular expression more than 1.
_SHAPE = bytes(48 if 48 <= b <= 57 else 101 if b in b"eE" else 32 for b in range(256))
_SIXTEEN_DIGITS = b"0" * 16


def _may_round(text: bytes) -> bool:
    shape = text.translate(_SHAPE, b"+-")
    return shape.find(_SIXTEEN_DIGITS) >= 0 or shape.find(b"e000") >= 0


class _IoText(msgspec.Struct):
    io: msgspec.Raw = msgspec.Raw(b"null")  # of a repeated `io`, the last, as orjson reads it


_io_text = msgspec.json.Decoder(_IoText).decode


def _stored_io(parsed: dict[str, Any] | None, text: bytes) -> dict[str, Any] | ExactJson | None:
    """What is stored of `io`, checked as `parsed`: its `text` where a float64 would round a number."""
    return ExactJson(text) if parsed is not None and _may_round(text) else parsed


def _exact_io(fix: Fix, raw: bytes) -> Fix:
    """The slow path's Fix with `io` stored as the fast path stores it (`_stored_io`)."""
    if fix.attributes is None:
        return fix
    return fix._replace(attributes=_stored_io(fix.attributes, bytes(_io_text(raw).io)))


def _flat(fields: Sequence[bytes] | Mapping[bytes, bytes]) -> Sequence[bytes]:
    return fields if not isinstance(fields, Mapping) else [item for pair in fields.items() for item in pair]


def _decode_slow(raw: bytes) -> Fix:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):  # orjson's own limit (1024), far past ours
            raise InvalidEntry("validate", _TOO_DEEP) from None
        raise InvalidEntry("decode", f"data is not valid UTF-8 JSON: {exc}") from None
    if type(obj) is not dict:
        raise InvalidEntry("validate", f"data must be a JSON object, got {json_type(obj)}")
    if len(obj) > MAX_DATA_MEMBERS:
        raise InvalidEntry("validate", f"data has {len(obj)} members, over the limit of {MAX_DATA_MEMBERS}")
    for name, value in obj.items():
        if name != "io" and not _within_depth(value, 2):  # `io` has its own check, with its other limits
            raise InvalidEntry("validate", f"{_TOO_DEEP} (in member {preview(name)})")
    return validate(obj, raw)


_TOO_DEEP = f"data is nested deeper than the limit of {MAX_JSON_DEPTH} levels (data itself is level 1)"


def _within_depth(value: object, depth: int) -> bool:
    """Whether `value`, found at `depth`, nests no deeper than MAX_JSON_DEPTH; iterative, as any input may be."""
    stack = [(value, depth)]
    while stack:
        value, depth = stack.pop()
        kind = type(value)
        if kind is dict or kind is list:
            if depth > MAX_JSON_DEPTH:
                return False
            stack.extend((item, depth + 1) for item in (value.values() if kind is dict else value))  # type: ignore[union-attr]
    return True


def _not_after(fix: Fix, not_after: datetime | None) -> Fix:
    if not_after is not None and fix.ts > not_after:
        ahead_s = (fix.ts - not_after).total_seconds()
        raise InvalidEntry("validate", f"ts in the future: {fix.ts.isoformat()} is {ahead_s:.0f}s beyond MAX_FUTURE_S")
    return fix


# The fast path: msgspec reads `data` into _Data in C, checking each member's JSON type and
# range (the limits `validate` applies); Python applies the rest with the same functions.
# It must never accept what the slow path refuses, nor yield a different Fix, so it leaves
# to the slow path whatever could differ:
#   - unknown members (so never more than MAX_DATA_MEMBERS); a member of another JSON type
#     (bools, strings or floats where ints go, null for a required member);
#   - integers beyond int64 (orjson reads those beyond uint64 as floats, msgspec as ints);
#   - an `io` that is not one flat object within MAX_IO_MEMBERS (flat, it is within the
#     depth limit too);
#   - a NUL anywhere (JSON can only carry it escaped, as \u0000);
#   - a run of 16 digits or an exponent of 3 anywhere (`_may_round`): a number float64 may round
#     or overflow. msgspec leaves an `io` it replaces by a later, repeated `io` unparsed, so
#     `"io":2e308,"io":{…}` passed, which orjson refuses; and a kept `io` with such a number is
#     stored as its text, which only the slow path decides.
def _number_in(low: float, high: float) -> Any:
    """A JSON number within [low, high]; integers stay int (so that -0 is 0, as orjson reads it)."""
    meta = msgspec.Meta
    return Annotated[int, meta(ge=max(math.ceil(low), -(2**63)), le=min(math.floor(high), 2**63 - 1))] | Annotated[
        float, meta(ge=low, le=high)
    ]


_NO_IO = msgspec.Raw(b"null")
_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_FlatIo = Annotated[dict[str, _Int64 | float | str | bool | None], msgspec.Meta(max_length=MAX_IO_MEMBERS)]


class _Data(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    device_id: str
    ts: Annotated[int, msgspec.Meta(ge=0, le=MAX_TS_MS)] | str
    lat: _number_in(-90.0, 90.0)  # type: ignore[valid-type]
    lon: _number_in(-180.0, 180.0)  # type: ignore[valid-type]
    alt: _number_in(-MAX_REAL, MAX_REAL) | None = None  # type: ignore[valid-type]
    speed: _number_in(0.0, MAX_REAL) | None = None  # type: ignore[valid-type]
    heading: _number_in(0.0, 360.0) | None = None  # type: ignore[valid-type]
    sats: Annotated[int, msgspec.Meta(ge=0, le=MAX_SMALLINT)] | None = None
    io: msgspec.Raw = _NO_IO  # its text, read apart (_read_io): stored as sent where a float64 would round it


_read_data = msgspec.json.Decoder(_Data).decode
_read_io = msgspec.json.Decoder(_FlatIo | None).decode


class _Unusual(Exception):
    """An entry the fast path leaves to the slow path."""


# msgspec's refusals (ValidationError is a DecodeError), and timestamp's for an ISO ts.
_UNUSUAL = (_Unusual, msgspec.DecodeError, RecursionError, InvalidEntry)
_new_fix = tuple.__new__  # Fix(...) runs a Python-level __new__; the same tuple, made in C


def _decode_fast(raw: bytes) -> Fix:
    """The entry's Fix, or one of _UNUSUAL when the slow path must judge it."""
    if type(raw) is not bytes or b"\\u0000" in raw or _may_round(raw):
        raise _Unusual
    data = _read_data(raw)
    device_id = data.device_id
    if device_id_problem(device_id) is not None:
        raise _Unusual
    ts = data.ts  # an int is within 0..MAX_TS_MS: timestamp's sum, without keyword arguments' cost
    when = EPOCH + timedelta(0, 0, 0, ts) if type(ts) is int else timestamp(ts)
    alt, speed, heading = data.alt, data.speed, data.heading
    io_text = data.io
    attributes = _read_io(io_text)  # no number in it that a float64 rounds (checked above)
    return _new_fix(
        Fix,
        (
            device_id,
            when,
            float(data.lat),
            float(data.lon),
            None if alt is None else float(alt),
            None if speed is None else float(speed),
            None if heading is None else float(heading),
            data.sats,
            attributes,
        ),
    )


def _data_field(flat: Sequence[bytes]) -> bytes:
    """The one `data` value of an entry within the entry limits."""
    if len(flat) == 2 and flat[0] == DATA_FIELD:  # what tcp-ingestion sends
        if len(flat[1]) + 4 > MAX_ENTRY_BYTES:
            raise InvalidEntry("validate", f"entry is {len(flat[1]) + 4} bytes, over the limit of {MAX_ENTRY_BYTES}")
        return flat[1]
    pairs = len(flat) // 2
    if pairs > MAX_ENTRY_FIELDS:
        raise InvalidEntry("validate", f"entry has {pairs} fields, over the limit of {MAX_ENTRY_FIELDS}")
    size = sum(len(item) for item in flat)
    if size > MAX_ENTRY_BYTES:
        raise InvalidEntry("validate", f"entry is {size} bytes, over the limit of {MAX_ENTRY_BYTES}")
    values = [flat[i + 1] for i in range(0, 2 * pairs, 2) if flat[i] == DATA_FIELD]
    if not values:
        raise InvalidEntry("decode", "entry has no 'data' field")
    if len(values) > 1:
        raise InvalidEntry("validate", f"entry has {len(values)} 'data' fields; exactly one is allowed")
    return values[0]


def validate(obj: dict[str, Any], raw: bytes = b"\\u0000") -> Fix:
    """Check every rule of SPEC §2 and convert to column types.

    `raw` is the undecoded JSON; it lets the NUL check skip the (common) entries without one.
    """
    get = obj.get
    device_id = get("device_id")
    if type(device_id) is not str:
        raise invalid("device_id", "is required and must be a string", device_id)
    problem = device_id_problem(device_id)
    if problem is not None:
        raise invalid("device_id", problem)
    ts = timestamp(get("ts"))
    lat = get("lat")
    if lat is None:
        raise invalid("lat", "is required")
    lon = get("lon")
    if lon is None:
        raise invalid("lon", "is required")

    sats = get("sats")
    if sats is not None and (type(sats) is not int or not 0 <= sats <= MAX_SMALLINT):
        raise invalid("sats", f"must be a whole number from 0 to {MAX_SMALLINT}", sats)

    attributes = get("io")
    if attributes is not None:
        if type(attributes) is not dict:
            raise invalid("io", f"must be a JSON object, got {json_type(attributes)}")
        # JSON can only carry NUL escaped, so a raw document without the escape has none.
        _check_io(attributes, nul_possible=b"\\u0000" in raw)

    return Fix(
        device_id,
        ts,
        _number("lat", lat, -90.0, 90.0),
        _number("lon", lon, -180.0, 180.0),
        _number("alt", get("alt"), -MAX_REAL, MAX_REAL),
        _number("speed", get("speed"), 0.0, MAX_REAL),
        _number("heading", get("heading"), 0.0, 360.0),
        sats,
        attributes,
    )


def _number(name: str, value: object, low: float, high: float) -> float | None:
    """A finite number within [low, high]; NaN and infinities fail the comparison."""
    if value is None:
        return None
    kind = type(value)
    if (kind is float or kind is int) and low <= value <= high:  # type: ignore[operator]
        return float(value)  # type: ignore[arg-type]
    if kind is not float and kind is not int:
        raise invalid(name, "must be a number", value)
    raise invalid(name, f"must be a finite number from {low:g} to {high:g}", value)


def _check_io(io: dict[str, Any], nul_possible: bool) -> None:
    """`io` within MAX_IO_MEMBERS and MAX_JSON_DEPTH, and without NUL (jsonb cannot store it).

    Iterative, so that no document can exhaust the stack; a flat `io` costs one pass.
    """
    members = 0
    stack: list[tuple[Any, int]] = [(io, 2)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise invalid("io", f"is nested deeper than the limit of {MAX_JSON_DEPTH} levels (data itself is level 1)")
        items = value.items() if type(value) is dict else enumerate(value)
        members += len(value)
        if members > MAX_IO_MEMBERS:
            raise invalid("io", f"has more than the limit of {MAX_IO_MEMBERS} members (counted at every level)")
        for key, item in items:
            kind = type(item)
            if kind is dict or kind is list:
                stack.append((item, depth + 1))
            elif nul_possible and (kind is str and "\x00" in item or type(key) is str and "\x00" in key):
                raise invalid("io", "contains a NUL character, which Postgres jsonb cannot store")
        if nul_possible and type(value) is dict and any("\x00" in key for key in value):
            raise invalid("io", "contains a NUL character, which Postgres jsonb cannot store")
