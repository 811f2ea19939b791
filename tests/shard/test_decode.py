"""decode_entry: every rule of the stream contract (SPEC §2), one fix or one InvalidEntry."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from common.errors import InvalidEntry
from shard.decode import Fix, decode_entry

UTC = timezone.utc
VALID: dict[str, Any] = {"device_id": "dev-1", "ts": 1_700_000_000_123, "lat": 52.5, "lon": 13.4}
MISSING = object()


def entry(**changes: Any) -> dict[bytes, bytes]:
    """A stream entry whose data is VALID with `changes` applied (MISSING deletes a member)."""
    data = {k: v for k, v in {**VALID, **changes}.items() if v is not MISSING}
    return {b"data": orjson.dumps(data)}


def raw(data: bytes) -> dict[bytes, bytes]:
    return {b"data": data}


def rejected(fields: dict[bytes, bytes]) -> InvalidEntry:
    with pytest.raises(InvalidEntry) as info:
        decode_entry(fields)
    return info.value


def test_valid_entry_decodes_to_fix() -> None:
    """A minimal valid entry becomes a Fix with exact values and None for the optional members."""
    fix = decode_entry(entry())
    assert isinstance(fix, Fix)
    assert fix == Fix("dev-1", datetime(2023, 11, 14, 22, 13, 20, 123_000, tzinfo=UTC), 52.5, 13.4,
                      None, None, None, None, None)


def test_other_fields_and_unknown_members_are_ignored() -> None:
    """Fields besides `data` and unknown members of data do not affect the fix."""
    fields = {**entry(extra="x", nested={"a": 1}), b"source": b"tcp-ingestion"}
    assert decode_entry(fields) == decode_entry(entry())


def test_all_optional_members_are_converted() -> None:
    """alt/speed/heading become floats, sats an int and io the attributes dict."""
    fix = decode_entry(entry(alt=-12, speed=88.5, heading=359.9, sats=11, io={"ign": True, "v": [1, 2]}))
    assert (fix.alt, fix.speed, fix.heading, fix.sats, fix.attributes) == (
        -12.0, 88.5, 359.9, 11, {"ign": True, "v": [1, 2]})
    assert type(fix.alt) is float and type(fix.sats) is int


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({}, id="no-fields"),
        pytest.param({b"payload": b"{}"}, id="no-data-field"),
        pytest.param(raw(b"not json"), id="not-json"),
        pytest.param(raw(b'{"device_id": "a",'), id="truncated-json"),
        pytest.param(raw(b'{"device_id": "\xff\xfe", "ts": 1, "lat": 0, "lon": 0}'), id="invalid-utf8"),
        pytest.param(raw(b""), id="empty-data"),
    ],
)
def test_decode_errors(fields: dict[bytes, bytes]) -> None:
    """A missing data field, non-JSON or invalid UTF-8 is poison of kind 'decode'."""
    assert rejected(fields).kind == "decode"


@pytest.mark.parametrize("data", [b"[1, 2]", b'"text"', b"42", b"null", b"true"])
def test_json_that_is_not_an_object_is_invalid(data: bytes) -> None:
    """Valid JSON that is not an object is poison of kind 'validate'."""
    assert rejected(raw(data)).kind == "validate"


def test_oversized_data_is_refused_before_parsing() -> None:
    """Data over 1 MiB is 'validate' poison even when it is not JSON at all (it was never parsed)."""
    error = rejected(raw(b"x" * ((1 << 20) + 1)))
    assert error.kind == "validate"


def test_an_entry_of_exactly_the_limit_is_parsed() -> None:
    """An entry of exactly 1 MiB, field names included, is still parsed (the limit is 'over 1 MiB')."""
    padding = "p" * ((1 << 20) - len(b"data") - len(orjson.dumps({**VALID, "pad": ""})))
    data = orjson.dumps({**VALID, "pad": padding})
    assert len(data) + len(b"data") == 1 << 20
    assert decode_entry(raw(data)).device_id == "dev-1"


@pytest.mark.parametrize(
    "device_id",
    ["x", "d" * 64, "é" * 64, "Gerät-Ω-東京-🚚", "imei:356938035643809"],
    ids=["one-char", "64-chars", "64-non-ascii", "non-ascii", "imei"],
)
def test_device_id_accepted(device_id: str) -> None:
    """device_id of 1-64 characters (counted as characters, not bytes), non-ASCII allowed."""
    assert decode_entry(entry(device_id=device_id)).device_id == device_id


@pytest.mark.parametrize(
    "device_id",
    [MISSING, None, "", "d" * 65, 123, True, ["a"], {"a": 1},
     "a\x00b", "a\x1fb", "a\x7fb", "a\x85b", "tab\there", "new\nline"],
    ids=["missing", "null", "empty", "65-chars", "number", "bool", "array", "object",
         "nul", "unit-separator", "del", "c1-nel", "tab", "newline"],
)
def test_device_id_rejected(device_id: Any) -> None:
    """device_id missing, not a string, empty, over 64 characters or with control characters is rejected."""
    error = rejected(entry(device_id=device_id))
    assert error.kind == "validate"
    assert "device_id" in str(error)


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (0, datetime(1970, 1, 1, tzinfo=UTC)),
        (1_700_000_000_001, datetime(2023, 11, 14, 22, 13, 20, 1_000, tzinfo=UTC)),
        (1_700_000_000_999, datetime(2023, 11, 14, 22, 13, 20, 999_000, tzinfo=UTC)),
        ("2024-03-01T12:34:56.789Z", datetime(2024, 3, 1, 12, 34, 56, 789_000, tzinfo=UTC)),
        ("2024-03-01T12:34:56+02:00", datetime(2024, 3, 1, 10, 34, 56, tzinfo=UTC)),
        ("2024-01-01T01:00:00+02:00", datetime(2023, 12, 31, 23, 0, tzinfo=UTC)),
        ("2024-03-01T12:34:56-05:30", datetime(2024, 3, 1, 18, 4, 56, tzinfo=UTC)),
        ("2024-03-01 12:34:56z", datetime(2024, 3, 1, 12, 34, 56, tzinfo=UTC)),
        ("20240301T123456+0200", datetime(2024, 3, 1, 10, 34, 56, tzinfo=UTC)),
        ("2024-03-01T12:34:56,5-05", datetime(2024, 3, 1, 17, 34, 56, 500_000, tzinfo=UTC)),
        ("2016-12-31T23:59:60.25Z", datetime(2017, 1, 1, 0, 0, 0, 250_000, tzinfo=UTC)),
        ("2024-02-29T24:00Z", datetime(2024, 3, 1, tzinfo=UTC)),
    ],
    ids=["epoch", "ms-1", "ms-999", "iso-z", "iso-plus2", "iso-plus2-day-before", "iso-minus530",
         "rfc3339-space-lowercase", "basic-format", "comma-fraction-hour-offset", "leap-second", "end-of-day"],
)
def test_ts_accepted(ts: int | str, expected: datetime) -> None:
    """ts as epoch ms or ISO-8601 with an offset is the exact instant, timezone-aware."""
    fix = decode_entry(entry(ts=ts))
    assert fix.ts.tzinfo is not None
    assert fix.ts == expected
    assert fix.ts - expected == timedelta(0)


@pytest.mark.parametrize(
    "ts",
    [MISSING, None, 1_700_000_000_000.0, 1.5, True, False, -1, "garbage", "", "2024-03-01T12:34:56",
     "2024-03-01", "2024-13-01T00:00:00Z", [1], {"ms": 1}, "1700000000000", 10**16,
     "2024-03-01x12:34:56Z", "2024-03-01T12:34:56+00:00:30", "2024-03-01T12:34:56-05:00:00.5",
     "2024-03-01T12:34:56.Z", "2024-03-01T12:34:56 +00:00", "2024-03-01T24:00:01Z", "2024-03-01T23:59:61Z"],
    ids=["missing", "null", "float-whole", "float", "true", "false", "negative", "garbage", "empty",
         "iso-no-offset", "date-only", "month-13", "array", "object", "digits-string", "beyond-year-9999",
         "any-separator", "offset-seconds", "offset-fraction", "empty-fraction", "space-before-offset",
         "past-end-of-day", "second-61"],
)
def test_ts_rejected(ts: Any) -> None:
    """ts missing, float, bool, negative, unparseable, ISO without offset, or what Python's
    fromisoformat reads but ISO-8601 is not (another separator, an offset with seconds) is rejected."""
    error = rejected(entry(ts=ts))
    assert error.kind == "validate"
    assert "ts" in str(error)


@pytest.mark.parametrize(
    ("member", "value"),
    [("lat", 90), ("lat", -90), ("lat", 90.0), ("lat", 0), ("lon", 180), ("lon", -180), ("lon", -179.999999)],
)
def test_coordinates_bounds_are_inclusive(member: str, value: float) -> None:
    """lat in -90..90 and lon in -180..180, bounds included; ints become floats."""
    fix = decode_entry(entry(**{member: value}))
    assert getattr(fix, member) == value
    assert type(getattr(fix, member)) is float


@pytest.mark.parametrize(
    ("member", "value"),
    [("lat", 90.0000001), ("lat", -90.0000001), ("lon", 180.0000001), ("lon", -180.0000001),
     ("lat", MISSING), ("lon", MISSING), ("lat", None), ("lon", None), ("lat", True), ("lon", False),
     ("lat", "52.5"), ("lon", [13.4]), ("lat", 10**18)],
)
def test_coordinates_rejected(member: str, value: Any) -> None:
    """lat/lon missing, out of range, a bool, a string or an array is rejected, naming the member."""
    error = rejected(entry(**{member: value}))
    assert error.kind == "validate"
    assert member in str(error)


@pytest.mark.parametrize("member", ["lat", "lon", "alt", "speed", "heading"])
def test_huge_exponent_is_rejected(member: str) -> None:
    """1e999 (infinity once parsed; JSON has no NaN/inf) is poison of either kind, never a fix."""
    data = orjson.dumps(VALID)[:-1] + f',"{member}":1e999}}'.encode()
    assert rejected(raw(data)).kind in ("decode", "validate")


@pytest.mark.parametrize("member", ["alt", "speed", "heading", "sats", "io"])
@pytest.mark.parametrize("value", [MISSING, None], ids=["absent", "null"])
def test_optional_members_absent_or_null_are_none(member: str, value: Any) -> None:
    """An optional member that is absent or null becomes None."""
    assert getattr(decode_entry(entry(**{member: value})), "attributes" if member == "io" else member) is None


@pytest.mark.parametrize(
    ("member", "value"),
    [("speed", 0), ("speed", 250.5), ("heading", 0), ("heading", 360), ("heading", 180.25),
     ("alt", -430.5), ("alt", 8848), ("sats", 0), ("sats", 32767)],
)
def test_optional_numbers_accepted(member: str, value: float) -> None:
    """speed ≥ 0, heading 0..360 inclusive, any alt, sats 0..32767 are accepted."""
    assert getattr(decode_entry(entry(**{member: value})), member) == value


@pytest.mark.parametrize(
    ("member", "value"),
    [("speed", -0.1), ("speed", -1), ("speed", "5"), ("speed", True),
     ("heading", -0.1), ("heading", 360.1), ("heading", 361), ("heading", False),
     ("alt", "high"), ("alt", True), ("alt", 1e300),
     ("sats", -1), ("sats", 2.0), ("sats", 7.5), ("sats", 32768), ("sats", "7"), ("sats", True)],
)
def test_optional_numbers_rejected(member: str, value: Any) -> None:
    """Negative speed, heading beyond 0..360, non-numeric or bool values, bad sats are rejected."""
    error = rejected(entry(**{member: value}))
    assert error.kind == "validate"
    assert member in str(error)


@pytest.mark.parametrize("io", [[1, 2], "text", 5, True], ids=["array", "string", "number", "bool"])
def test_io_must_be_an_object(io: Any) -> None:
    """io that is not a JSON object is rejected, naming io."""
    error = rejected(entry(io=io))
    assert error.kind == "validate"
    assert "io" in str(error)


@pytest.mark.parametrize(
    "data",
    [rb'"io": {"a": "x\u0000y"}', rb'"io": {"a\u0000": 1}', rb'"io": {"a": [{"b": "\u0000"}]}'],
    ids=["value", "key", "nested"],
)
def test_io_with_nul_is_rejected(data: bytes) -> None:
    """io containing U+0000 anywhere is rejected: Postgres jsonb cannot store it."""
    payload = orjson.dumps(VALID)[:-1] + b"," + data + b"}"
    error = rejected(raw(payload))
    assert error.kind == "validate"
    assert "io" in str(error)


def test_io_with_escaped_backslash_u0000_text_is_accepted() -> None:
    r"""io whose text merely reads backslash-u0000 (no NUL character) is valid and storable in jsonb."""
    io = {"path": "C:\\u0000\\log", "note": "\\u0000"}
    assert "\x00" not in "".join(io.values())
    assert decode_entry(entry(io=io)).attributes == io
