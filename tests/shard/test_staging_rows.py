"""The hand-packed COPY rows stage exactly what psycopg's own dumpers stage, in a real Postgres."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import set_json_dumps

from common.errors import RowRejected
from shard.decode import MAX_REAL, MAX_SMALLINT, MAX_TS_MS, Fix
from shard.staging_rows import COLUMNS, copy_data

_TYPES = {"seq": "int4", "cached_version": "int8", "ts": "timestamptz", "lat": "float8", "lon": "float8",
          "alt": "float4", "speed": "float4", "heading": "float4", "sats": "int2", "device_id": "text",
          "attributes": "jsonb"}
_TABLE = "(seq integer, cached_version bigint, ts timestamptz, lat float8, lon float8, alt real, speed real, " \
         "heading real, sats smallint, device_id text COLLATE \"C\", attributes jsonb)"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _fix(device_id: str, ms: int, **values: object) -> Fix:
    base = {"lat": 52.0, "lon": 4.0, "alt": 1.5, "speed": 10.0, "heading": 90.0, "sats": 7, "attributes": {"ign": 1}}
    base.update(values)
    return Fix(device_id, EPOCH + timedelta(milliseconds=ms), **base)  # type: ignore[arg-type]


EDGES = [
    _fix("plain", 1_700_000_000_123),
    _fix("nulls", 0, alt=None, speed=None, heading=None, sats=None, attributes=None),
    _fix("some-nulls", MAX_TS_MS, speed=None, sats=None),
    _fix("ünïcödé 🚚 \"quoted\", {braces} \\ back", 86_400_000, lat=-90.0, lon=180.0),
    _fix("x" * 64, 946_684_800_000, lat=-0.0, lon=-180.0, alt=-MAX_REAL, speed=MAX_REAL, heading=360.0, sats=MAX_SMALLINT),
    _fix("floats", 946_684_799_999, lat=1e-300, lon=0.1 + 0.2, alt=1e-45, speed=3.4e38, heading=0.0, sats=0),
    _fix("io", 5, attributes={"nested": {"a": [1, 2.5, None, True, "x\u2028y"]}, "big": 2**63 - 1, "neg": -(2**63)}),
]


def _staged(conn: psycopg.Connection, table: str) -> list[tuple[object, ...]]:
    return conn.execute(f"SELECT {', '.join(COLUMNS)} FROM {table} ORDER BY seq").fetchall()


def _both(conn: psycopg.Connection, fixes: list[Fix], versions: dict[str, int | None]) -> None:
    """Stage `fixes` both ways and assert the tables are equal, value for value."""
    conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS ours {_TABLE}; CREATE TEMP TABLE IF NOT EXISTS theirs {_TABLE}")
    conn.execute("TRUNCATE ours, theirs")
    columns = ", ".join(COLUMNS)
    with conn.cursor().copy(f"COPY ours ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(copy_data(fixes, versions))
    with conn.cursor().copy(f"COPY theirs ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types([_TYPES[c] for c in COLUMNS])
        for seq, fix in enumerate(fixes):
            row = {"seq": seq, "cached_version": versions[fix.device_id], **fix._asdict()}
            copy.write_row([row[c] for c in COLUMNS])
    ours, theirs = _staged(conn, "ours"), _staged(conn, "theirs")
    assert len(ours) == len(fixes)
    assert ours == theirs
    # Bit for bit where equality could hide a difference (-0.0 == 0.0; jsonb compared as text).
    assert conn.execute("SELECT count(*) FROM (SELECT * FROM ours EXCEPT SELECT * FROM theirs) d").fetchone() == (0,)
    assert [repr(r) for r in ours] == [repr(r) for r in theirs]


@pytest.fixture
def conn(database_url: str):  # type: ignore[no-untyped-def]
    with psycopg.connect(database_url, autocommit=True, client_encoding="UTF8") as connection:
        set_json_dumps(orjson.dumps, context=connection)
        yield connection


def test_edge_values_stage_as_psycopg_stages_them(conn: psycopg.Connection) -> None:
    versions: dict[str, int | None] = {fix.device_id: None for fix in EDGES}
    versions["plain"] = 2**63 - 1
    versions["io"] = 0
    _both(conn, EDGES, versions)


def test_an_empty_batch_is_a_valid_copy(conn: psycopg.Connection) -> None:
    _both(conn, [], {})


def test_a_row_that_cannot_be_encoded_is_rejected() -> None:
    bad = _fix("d", 1, attributes={"a": {1, 2}})  # a set: not JSON
    with pytest.raises(RowRejected, match="row cannot be staged: TypeError"):
        copy_data([_fix("ok", 1), bad], {"ok": None, "d": None})
    with pytest.raises(RowRejected, match="row cannot be staged: UnicodeEncodeError"):
        copy_data([_fix("\ud800", 1)], {"\ud800": 1})


def _io_text(size: int) -> st.SearchStrategy[str]:
    """What validation lets into `io`: no NUL (jsonb cannot store it), no lone surrogates (JSON cannot carry them)."""
    return st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=size)


_maybe_real = st.none() | st.floats(-MAX_REAL, MAX_REAL, allow_nan=False, width=64)
_fixes = st.builds(
    Fix,
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=64),
    st.integers(0, MAX_TS_MS).map(lambda ms: EPOCH + timedelta(milliseconds=ms))
    | st.datetimes(datetime(1970, 1, 1), datetime(9999, 12, 30), timezones=st.just(timezone.utc)),
    st.floats(-90, 90),
    st.floats(-180, 180),
    _maybe_real,
    st.none() | st.floats(0, MAX_REAL, width=64),
    st.none() | st.floats(0, 360),
    st.none() | st.integers(0, MAX_SMALLINT),
    st.none() | st.dictionaries(_io_text(5), st.integers(-(2**63), 2**63 - 1) | _io_text(20) | st.booleans()),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fixes=st.lists(_fixes, max_size=30), version=st.none() | st.integers(0, 2**63 - 1))
def test_any_fixes_stage_as_psycopg_stages_them(conn: psycopg.Connection, fixes: list[Fix], version: int | None) -> None:
    _both(conn, fixes, {fix.device_id: version for fix in fixes})
