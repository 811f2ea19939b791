"""decode_entry's msgspec fast path changes nothing: for any entry it gives the Fix, or the
InvalidEntry (kind and message), that the reference path (decode_entry_slow: orjson and the
rules in Python) gives.

Data is written as JSON text member by member, so that it can hold what a serializer never
writes: duplicate members (in data and in io), escaped names, numbers spelled every way
(-0, 1E+2, 25-digit integers and mantissas, beyond int64 and uint64, 1e999), bools and
strings where numbers go, NUL escaped, lone surrogates, raw bytes. Fixes are compared by
repr as well as by ==, so that 0.0 against -0.0, 1 against 1.0 or True, and a dict's member
order all count as differences.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import HealthCheck, event, example, given, strategies as st
from hypothesis import settings as examples

from common.errors import InvalidEntry
from scripts.toolkit.fleet import Fleet
from shard.decode import MAX_IO_MEMBERS, MAX_REAL, MAX_SMALLINT, MAX_TS_MS, ExactJson, decode_entry, decode_entry_slow
from shard.decode import _UNUSUAL, _decode_fast
from tests.shard.test_hostile_entries import entries as hostile_entries, raw_data as hostile_data

NOW = datetime.now(timezone.utc)
NOT_AFTER = NOW + timedelta(seconds=300)
NOW_MS = int(time.time() * 1000)
# Every limit's value and its neighbours, and spellings a parser may read differently.
EDGE_NUMBERS = [
    "-0", "0", "-0.0", "0e0", "-0E-0", "90", "-90", "91", "90.0", "90.0000001", "-90.00000000000001",
    "180", "-180", "181", "180.0", "-180.00000000000003", "360", "361", "360.0", "360.00000000000006",
    "-1", "-1e-320", "4.9e-324", repr(MAX_REAL), "3.4028234663852888e38", "-3.4028234663852886e38",
    "-3.4028234663852888e38", "1e38", "1e39", "1e999", "-1e999", "9223372036854775807", "9223372036854775808",
    "-9223372036854775808", "-9223372036854775809", "18446744073709551615", "18446744073709551616",
    str(MAX_SMALLINT), str(MAX_SMALLINT + 1), str(MAX_TS_MS), str(MAX_TS_MS + 1), str(NOW_MS), f"{NOW_MS}.0",
    str(NOW_MS + 300_000), str(NOW_MS + 3_600_000), "1E+2", "1e2", "2.0", "1" + "0" * 30,
    "NaN", "Infinity", "-Infinity", "01", "+1", ".5", "1.", "0x10", "1_000",
]
EDGE_OTHERS = ["true", "false", "null", '""', '"5"', "[]", "[1]", "{}", '{"a":1}']
MEMBERS = ["device_id", "ts", "lat", "lon", "alt", "speed", "heading", "sats", "io"]


def outcome(decoder, fields: object, not_after: datetime | None) -> tuple[str, str, str]:
    """('fix', repr, '') or ('poison', kind, message); any other exception propagates."""
    try:
        fix = decoder(fields, not_after)
    except InvalidEntry as exc:
        return ("poison", exc.kind, str(exc))
    return ("fix", repr(fix), "")


def assert_same(fields: object, not_after: datetime | None = NOT_AFTER) -> str:
    """The outcome, and which path took it (for --hypothesis-show-statistics)."""
    fast, slow = outcome(decode_entry, fields, not_after), outcome(decode_entry_slow, fields, not_after)
    assert fast == slow
    if fast[0] == "fix":
        assert decode_entry(fields, not_after) == decode_entry_slow(fields, not_after)
    return f"{fast[0]}, {'fast' if took_fast_path(fields) else 'slow'} path"


def assert_fast_path(raw: bytes) -> None:
    """The fast path itself takes `raw` (no fallback to the slow path) and gives the reference's Fix."""
    try:
        fix = _decode_fast(raw)
    except _UNUSUAL as exc:
        pytest.fail(f"the fast path left it to the slow path ({type(exc).__name__}: {exc}): {raw[:200]!r}")
    reference = decode_entry_slow([b"data", raw])
    assert fix == reference
    assert repr(fix) == repr(reference)


def took_fast_path(fields: object) -> bool:
    flat = [item for pair in fields.items() for item in pair] if isinstance(fields, dict) else fields
    if not (len(flat) == 2 and flat[0] == b"data"):
        return False
    try:
        _decode_fast(flat[1])
    except _UNUSUAL:
        return False
    return True


def text(value: object) -> str:
    return json.dumps(value)  # NaN, Infinity and integers of any size too


def digits(draw: st.DrawFn, most: int) -> str:
    return draw(st.text("0123456789", min_size=1, max_size=most))


@st.composite
def number_text(draw: st.DrawFn) -> str:
    """A JSON number as a producer may spell it, now and then not quite JSON."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return text(draw(st.floats()))
    if kind == 1:
        return str(draw(st.integers(min_value=-(2**70), max_value=2**70)))
    if kind == 2:
        return draw(st.sampled_from(EDGE_NUMBERS))
    sign = draw(st.sampled_from(["", "-"]))
    whole = digits(draw, 25).lstrip("0") or "0"
    fraction = "." + digits(draw, 25) if draw(st.booleans()) else ""
    exponent = draw(st.sampled_from(["", "e", "E"]))
    if exponent:
        exponent += draw(st.sampled_from(["", "+", "-"])) + digits(draw, 3)
    return sign + whole + fraction + exponent


string_text = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=12).map(text),  # controls, NUL, lone surrogates escaped
    st.text(max_size=12).map(lambda s: orjson.dumps(s).decode()),  # raw UTF-8
    st.sampled_from(['"\\ud800"', '"\\udc00x"', '"a\\u0000"', '"\\\\u0000"', '"a\x01"', '"é"', '"\\u00e9"', '""']),
    st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01T00:00:00", "2026-01-01T00:00:00.5+14:00",
                     "9999-12-30T23:59:59.999Z", "9999-12-31T00:00:00Z", "1970-01-01T00:00:00Z",
                     "1969-12-31T23:59:59.999Z", "0001-01-01T00:00:00-14:00", "2024-03-01", "20260101T000000Z",
                     "2026-01-01T00:00:00Z" + "0" * 60]).map(text),
)
scalar_text = st.one_of(number_text(), string_text, st.sampled_from(["true", "false", "null"]))


def object_text(members: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{name}:{value}" for name, value in members) + "}"


def io_text(max_leaves: int = 12) -> st.SearchStrategy[str]:
    """io as text: mostly flat objects (the fast path's), sometimes nested, with duplicate keys."""
    key = st.one_of(st.sampled_from(['"ign"', '"batt_mv"', '"odo_km"', '"a"', '"\\u0000"', '"k\\u0000"', '"é"']), string_text)
    flat = st.lists(st.tuples(key, scalar_text), max_size=8).map(object_text)
    nested = st.recursive(
        scalar_text,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4).map(lambda items: "[" + ",".join(items) + "]"),
            st.lists(st.tuples(key, inner), max_size=4).map(object_text),
        ),
        max_leaves=max_leaves,
    )
    return st.one_of(flat, flat, nested, st.just("{}"), st.just("null"))


@st.composite
def data_text(draw: st.DrawFn) -> bytes:
    """A data document: the nine members (some wrong, missing, repeated or renamed), maybe extra ones."""
    fleet_fix = Fleet(3, seed=draw(st.integers(0, 3))).fixes(1)
    base = {name: orjson.dumps(value).decode() for name, value in next(fleet_fix).items()}
    altered = draw(st.lists(st.sampled_from(MEMBERS), max_size=draw(st.integers(0, 3)), unique=True))
    members = []
    for name in MEMBERS:
        value = base[name]
        if name in altered:
            choice = draw(st.integers(0, 4))
            if choice == 0:
                continue  # missing
            if choice <= 2:
                value = draw(io_text() if name == "io" else scalar_text)
            else:
                value = draw(st.one_of(number_text(), io_text()) if name in ("io", "ts") else number_text())
        quoted = text(name) if draw(st.integers(0, 20)) else '"' + "".join(f"\\u{ord(c):04x}" for c in name) + '"'
        members.append((quoted, value))
    if draw(st.integers(0, 4)) == 0:  # a member again, or one unknown
        members.insert(draw(st.integers(0, len(members))), (text(draw(st.sampled_from(MEMBERS + ["extra"]))), draw(scalar_text)))
    if draw(st.integers(0, 10)) == 0:
        members += [(text(f"x{i}"), "1") for i in range(draw(st.integers(1, 70)))]
    document = object_text(draw(st.permutations(members)) if draw(st.booleans()) else members)
    spacing = draw(st.sampled_from(["", " ", "\n\t", "\ufeff", "\x00"]))
    return (spacing + document + spacing.strip("\ufeff")).encode("utf-8", "surrogatepass")


def test_fleet_entries_are_identical_fixes() -> None:
    """What tcp-ingestion sends, io included, decodes to equal fixes (floats, datetimes, dicts)."""
    for fix in Fleet(50).fixes(500):
        for raw in (orjson.dumps(fix), json.dumps(fix, indent=1).encode()):
            assert_same([b"data", raw])
            assert_fast_path(raw)


def test_every_member_with_every_edge_value() -> None:
    """Each member of a fleet fix in turn holds each edge value: with and without MAX_FUTURE_S."""
    fix = {name: orjson.dumps(value).decode() for name, value in next(Fleet(1).fixes(1)).items()}
    for name in MEMBERS:
        for value in EDGE_NUMBERS + EDGE_OTHERS:
            raw = object_text([(text(member), value if member == name else fix[member]) for member in MEMBERS])
            for not_after in (None, NOT_AFTER):
                assert_same([b"data", raw.encode()], not_after)


@given(data_text(), st.sampled_from([NOT_AFTER, None, datetime(2026, 1, 1, tzinfo=timezone.utc)]))
@examples(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@example(b'{"device_id":"d","ts":1,"lat":1,"lon":1,"io":{"a":1,"b":2,"a":3}}', None)
@example(b'{"device_id":"d","ts":1,"lat":1,"lon":1,"io":{"a":1},"io":{"b":2}}', None)
@example(b'{"device_id":"d","ts":1,"lat":1,"lon":1,"io":20000e304,"io":{"b":2}}', None)  # orjson refuses the first
@example(b'{"device_id":"d","ts":1,"lat":1,"lon":1,"alt":100000000000000000000000000000}', None)
@example(b'{"device_id":"d","ts":1,"lat":1,"lon":1,"io":{"a":100000000000000000000000000000}}', None)
@example(b'{"device_id":"d","ts":1,"lat":-0,"lon":-0.0,"io":{"a":-0,"b":-0.0}}', None)
@example(b'{"device_id":"d","ts":1,"lat":1,"lon":1,"io":{"a":"\xff"}}', None)
@example(b'{"device_id":"d","ts":1,"lat":1,"lon":1,"io":{"a":' + b"[" * 2000 + b"]" * 2000 + b"}}", None)
def test_data_documents(raw: bytes, not_after: datetime | None) -> None:
    """Generated documents, valid and poison alike: the same Fix or the same kind and message."""
    event(assert_same([b"data", raw], not_after))


@given(hostile_data)
@examples(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_hostile_data(raw: bytes) -> None:
    """The hostile-entry tests' data (deep, wide, NaN, surrogates, invalid UTF-8, NUL)."""
    event(assert_same([b"data", raw]))


@given(hostile_entries())
@examples(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_hostile_entries(flat: list[bytes]) -> None:
    """Whole entries: no data, two, many fields, binary names; as the flat list and as a dict."""
    event(assert_same(flat))
    assert_same(dict(zip(flat[::2], flat[1::2])))


@pytest.mark.parametrize(("size", "fast"), [(MAX_IO_MEMBERS, True), (MAX_IO_MEMBERS + 1, False)])
def test_flat_io_at_and_over_the_member_limit(size: int, fast: bool) -> None:
    """At the limit the fast path takes the entry; one member over, it leaves it to the slow path."""
    io = {f"k{i}": i for i in range(size)}
    raw = orjson.dumps({"device_id": "d", "ts": 1, "lat": 1, "lon": 1, "io": io})
    assert_same([b"data", raw])
    if fast:
        assert_fast_path(raw)
    else:
        assert not took_fast_path([b"data", raw])


@pytest.mark.parametrize(
    "io",
    [b'{"iccid":89014103211118510720}', b'{"d":0.12345678901234567890123}', b'{"tiny":1e-400}', b'{"n":-9223372036854775809}',
     b'{"deep":{"x":[1.00000000000000001]}}', b'{"iccid":"89014103211118510720"}'],
)
def test_io_a_float64_would_round_is_kept_as_sent_by_both_paths(io: bytes) -> None:
    raw = b'{"device_id":"d","ts":1,"lat":1,"lon":1,"io":' + io + b"}"
    fast, slow = decode_entry([b"data", raw]), decode_entry_slow([b"data", raw])
    assert fast == slow and type(fast.attributes) is ExactJson and fast.attributes == io


def test_io_of_ordinary_numbers_stays_parsed() -> None:
    """The common entry pays for no second look: its `io` goes to Postgres as orjson writes it."""
    raw = b'{"device_id":"d","ts":1,"lat":1,"lon":1,"io":{"ign":1,"batt_mv":14002,"odo_km":19771.925,"t":1.5e-3}}'
    assert decode_entry([b"data", raw]).attributes == {"ign": 1, "batt_mv": 14002, "odo_km": 19771.925, "t": 1.5e-3}
