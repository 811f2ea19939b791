"""The documented limits on one entry, and decoding that survives any input (SPEC §2)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from common.errors import InvalidEntry
from shard.batch import decode_batch
from shard.decode import (
    MAX_DATA_MEMBERS,
    MAX_ENTRY_BYTES,
    MAX_ENTRY_FIELDS,
    MAX_IO_MEMBERS,
    MAX_JSON_DEPTH,
    decode_entry,
)

VALID: dict[str, Any] = {"device_id": "dev-1", "ts": 1_700_000_000_123, "lat": 52.5, "lon": 13.4}
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def data(**changes: Any) -> list[bytes]:
    return [b"data", orjson.dumps({**VALID, **changes})]


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def rejected(fields: list[bytes], not_after: datetime | None = None) -> InvalidEntry:
    with pytest.raises(InvalidEntry) as info:
        decode_entry(fields, not_after)
    return info.value


def test_a_device_id_nested_300_deep_is_validate_poison_and_the_message_is_safe() -> None:
    """The issue's example: orjson reads deeper than it writes; the error message must still be built."""
    raw = b'{"device_id":' + b"[" * 300 + b"1" + b"]" * 300 + b',"ts":1,"lat":1,"lon":1}'
    error = rejected([b"data", raw])
    assert error.kind == "validate" and "device_id" in str(error) and f"limit of {MAX_JSON_DEPTH} levels" in str(error)


def test_io_nesting_is_limited_and_the_limit_is_named() -> None:
    assert decode_entry(data(io={"a": nested(MAX_JSON_DEPTH - 2)})).attributes is not None
    error = rejected(data(io={"a": nested(MAX_JSON_DEPTH - 1)}))
    assert error.kind == "validate" and f"limit of {MAX_JSON_DEPTH} levels" in str(error)


def test_io_nested_far_beyond_what_orjson_writes_is_rejected_without_recursion() -> None:
    raw = b'{"device_id":"d","ts":1,"lat":1,"lon":1,"io":{"a":' + b"[" * 1000 + b"]" * 1000 + b"}}"
    assert "levels" in str(rejected([b"data", raw]))


def test_io_members_are_counted_at_every_level() -> None:
    assert decode_entry(data(io={str(i): i for i in range(MAX_IO_MEMBERS)})).attributes is not None
    error = rejected(data(io={"a": list(range(MAX_IO_MEMBERS))}))
    assert f"limit of {MAX_IO_MEMBERS} members" in str(error)


def test_a_nul_deep_inside_io_is_validate_poison() -> None:
    """jsonb cannot store NUL: found at any depth and in keys, before Postgres would refuse the row."""
    assert "NUL" in str(rejected(data(io={"a": [{"b": ["x\x00y"]}]})))
    assert "NUL" in str(rejected(data(io={"a": {"k\x00": 1}})))


def test_data_members_are_limited() -> None:
    error = rejected(data(**{f"extra{i}": i for i in range(MAX_DATA_MEMBERS)}))
    assert f"limit of {MAX_DATA_MEMBERS}" in str(error)


def test_entry_fields_and_bytes_are_limited_before_parsing() -> None:
    many = [b"data", b"not json"] + [item for i in range(MAX_ENTRY_FIELDS) for item in (b"f%d" % i, b"v")]
    assert f"limit of {MAX_ENTRY_FIELDS}" in str(rejected(many))
    big = [b"data", b"{}", b"blob", b"x" * MAX_ENTRY_BYTES]
    assert f"limit of {MAX_ENTRY_BYTES}" in str(rejected(big))


def test_two_data_fields_are_ambiguous_and_rejected() -> None:
    error = rejected([*data(), *data(lat=1.0)])
    assert error.kind == "validate" and "2 'data' fields" in str(error)


def test_a_fix_beyond_max_future_is_validate_poison() -> None:
    """MAX_FUTURE_S counts from the Processor's clock: a broken tracker clock is caught, fixable, replayable."""
    ahead = NOW + timedelta(seconds=301)
    fields = data(ts=int(ahead.timestamp() * 1000))
    error = rejected(fields, NOW + timedelta(seconds=300))
    assert error.kind == "validate" and str(error).startswith("ts in the future")
    assert decode_entry(fields, NOW + timedelta(seconds=302)).ts == ahead


def test_decode_batch_turns_every_failure_into_one_dead_letter(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception no rule foresaw (a bug only this entry reaches) dead-letters that entry; the others pass."""
    import shard.batch

    real = shard.batch.decode_entry

    def flaky(fields: list[bytes], not_after: datetime | None) -> Any:
        if fields[1] == b"boom":
            raise RecursionError("maximum recursion depth exceeded")
        return real(fields, not_after)

    monkeypatch.setattr(shard.batch, "decode_entry", flaky)
    batch = decode_batch([(b"1-0", data()), (b"2-0", [b"data", b"boom"]), (b"3-0", None)], 5, 300, NOW.timestamp())
    assert list(batch.fixes) == [b"1-0"] and batch.gone == [b"3-0"]
    (letter,) = batch.dead
    assert letter.entry_id == b"2-0" and letter.error_kind == "validate" and "RecursionError" in letter.error
    assert letter.fields == [b"data", b"boom"]


def test_decode_batch_applies_max_future_from_its_clock() -> None:
    future = data(ts=int((NOW + timedelta(hours=1)).timestamp() * 1000))
    batch = decode_batch([(b"1-0", future)], 5, 300, NOW.timestamp())
    assert not batch.fixes and batch.dead[0].error.startswith("ts in the future")
    assert decode_batch([(b"1-0", future)], 5, 7200, NOW.timestamp()).fixes


def test_every_member_of_data_is_within_the_depth_limit_not_only_io() -> None:
    """SPEC §2: beyond a documented limit is validate poison naming it; the limit covers all of `data`."""
    assert decode_entry(data(extra=nested(MAX_JSON_DEPTH - 1))).device_id == "dev-1"  # extra members are ignored
    error = rejected(data(extra=nested(MAX_JSON_DEPTH)))
    assert error.kind == "validate" and f"limit of {MAX_JSON_DEPTH} levels" in str(error) and "extra" in str(error)


@pytest.mark.parametrize("where", [b'"extra":', b'"io":{"a":', b""])
def test_nesting_past_the_parsers_own_limit_is_validate_poison_naming_ours(where: bytes) -> None:
    """orjson refuses beyond 1,024 levels with its own words; that is still our limit, not undecodable data."""
    deep = b"[" * 1100 + b"]" * 1100
    raw = (b'{"device_id":"d","ts":1,"lat":1,"lon":1,' + where + deep + b"}" * (where.count(b"{") + 1)) if where else deep
    error = rejected([b"data", raw])
    assert error.kind == "validate" and f"limit of {MAX_JSON_DEPTH} levels" in str(error), str(error)
