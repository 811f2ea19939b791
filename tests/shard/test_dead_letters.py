"""Dead letters against a real Redis: verbatim, written before the ACK, exactly once, any size."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio.client
import redis.exceptions

from common.config import Settings
from common.faults import Outcome, classify
from common.letters import ADDED_FIELDS, split_letter
from common.redis_client import keep_field_pairs
from shard.dead_letters import SCRIPT_MAX_VALUES, DeadLetter
from shard.stream import ConsumerStream


@pytest.fixture
def raw_client(redis_client: redis.Redis) -> redis.Redis:
    keep_field_pairs(redis_client)
    return redis_client


def pending_entry(client: redis.Redis, stream: str, fields: list[bytes]) -> bytes:
    """XADD with the flat field list (names may repeat) and read it as consumer t-0."""
    client.xgroup_create(stream, "processor", id="0", mkstream=True)
    entry_id = client.execute_command("XADD", stream, "*", *fields)
    client.xreadgroup("processor", "t-0", {stream: ">"})
    return entry_id


def settle(settings: Settings, letters: list[DeadLetter], consumer: str = "t-0") -> int:
    async def go() -> int:
        stream = ConsumerStream(settings, consumer)
        try:
            return len(await stream.settle([], letters))
        finally:
            await stream.close()

    return asyncio.run(go())


HOSTILE = [
    b"data", b"{not json",
    b"error", b"the producer's own error field",
    b"error", b"and a repeated one",
    b"consumer", b"not ours",
    b"\xff\xfe", b"\x00\xff binary",
    b"empty", b"",
]


def test_a_letter_keeps_every_original_field_verbatim(raw_client: redis.Redis, stream_key: str, settings: Settings) -> None:
    """Colliding names, repeated names, binary names and values: all after the seven added fields, unchanged."""
    entry_id = pending_entry(raw_client, stream_key, HOSTILE)
    assert settle(settings, [DeadLetter(entry_id, HOSTILE, "not JSON", "decode", 5)]) == 1
    ((_, fields),) = raw_client.xrange(f"{stream_key}:dlq")
    parts = split_letter(fields)
    assert parts.current_format and parts.original == HOSTILE
    assert tuple(fields[0:14:2]) == ADDED_FIELDS
    assert parts.added[b"source_id"] == entry_id and parts.added[b"error_kind"] == b"decode"
    assert raw_client.xpending(stream_key, "processor")["pending"] == 0


def test_a_letter_that_cannot_be_written_leaves_the_entry_pending(raw_client: redis.Redis, stream_key: str, settings: Settings) -> None:
    """DLQ_KEY holding another type: the script fails before any write; no ACK, no loss; fixed, it goes through once."""
    entry_id = pending_entry(raw_client, stream_key, [b"data", b"x"])
    raw_client.set(f"{stream_key}:dlq", b"not a stream")
    letter = DeadLetter(entry_id, [b"data", b"x"], "not JSON", "decode", 5)
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE") as caught:
        settle(settings, [letter])
    assert classify(caught.value) is Outcome.REFUSED, "exit 78, as the contract says, not a panic and a crash loop"
    assert raw_client.xpending(stream_key, "processor")["pending"] == 1
    raw_client.delete(f"{stream_key}:dlq")
    assert settle(settings, [letter]) == 1
    assert settle(settings, [letter]) == 0, "not pending any more: no second letter"
    assert raw_client.xlen(f"{stream_key}:dlq") == 1


def test_an_entry_with_thousands_of_fields_becomes_one_verbatim_letter(raw_client: redis.Redis, stream_key: str, settings: Settings) -> None:
    """Beyond what a Lua call can carry (about 8,000 values): written through WATCH/MULTI, still once."""
    fields = [b"data", b"not json"] + [item for i in range(4_000) for item in (b"f%d" % i, b"v%d" % i)]
    assert len(fields) > SCRIPT_MAX_VALUES
    entry_id = pending_entry(raw_client, stream_key, fields)
    letter = DeadLetter(entry_id, fields, "entry has 4001 fields", "validate", 5)
    assert settle(settings, [letter]) == 1
    assert settle(settings, [letter]) == 0
    ((_, stored),) = raw_client.xrange(f"{stream_key}:dlq")
    assert split_letter(stored).original == fields
    assert raw_client.xpending(stream_key, "processor")["pending"] == 0


def test_a_large_letter_into_a_dlq_of_the_wrong_type_loses_nothing(raw_client: redis.Redis, stream_key: str, settings: Settings) -> None:
    fields = [b"data", b"x"] + [item for i in range(4_000) for item in (b"f%d" % i, b"v")]
    entry_id = pending_entry(raw_client, stream_key, fields)
    raw_client.set(f"{stream_key}:dlq", b"not a stream")
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE") as caught:
        settle(settings, [DeadLetter(entry_id, fields, "too many fields", "validate", 5)])
    assert classify(caught.value) is Outcome.REFUSED
    assert raw_client.xpending(stream_key, "processor")["pending"] == 1


def test_of_two_consumers_holding_the_same_poison_only_one_writes_its_letter(
    raw_client: redis.Redis, stream_key: str, settings: Settings
) -> None:
    """The claimer wrote the letter; the consumer it claimed from finds it lettered and writes none."""
    entry_id = pending_entry(raw_client, stream_key, [b"data", b"x"])
    raw_client.xclaim(stream_key, "processor", "t-1", 0, [entry_id])
    letter = DeadLetter(entry_id, [b"data", b"x"], "not JSON", "decode", 5)
    assert settle(settings, [letter], consumer="t-1") == 1
    assert settle(settings, [letter]) == 0
    assert raw_client.xlen(f"{stream_key}:dlq") == 1


@pytest.mark.parametrize("size", ["script", "watch"])
def test_poison_of_a_consumer_deleted_from_the_group_still_gets_its_letter(
    raw_client: redis.Redis, stream_key: str, settings: Settings, size: str
) -> None:
    """XGROUP DELCONSUMER drops the consumer's pending entries: the poison among them is in the
    stream still, has no letter, and nobody else will ever see it, so its letter is written."""
    fields = [b"data", b"x"] if size == "script" else [b"data", b"x"] + [b"f%d" % i for i in range(2 * SCRIPT_MAX_VALUES)]
    entry_id = pending_entry(raw_client, stream_key, fields)
    raw_client.xgroup_delconsumer(stream_key, "processor", "t-0")
    assert settle(settings, [DeadLetter(entry_id, fields, "not JSON", "decode", 5)]) == 1
    assert raw_client.xlen(f"{stream_key}:dlq") == 1


def test_a_rejected_row_no_longer_pending_gets_no_letter(raw_client: redis.Redis, stream_key: str, settings: Settings) -> None:
    """A row Postgres rejected may have been stored since by a consumer that claimed it and ACKed."""
    entry_id = pending_entry(raw_client, stream_key, [b"data", b"{}"])
    raw_client.xack(stream_key, "processor", entry_id)
    assert settle(settings, [DeadLetter(entry_id, [b"data", b"{}"], "CheckViolation: ...", "write", 5)]) == 0
    assert raw_client.xlen(f"{stream_key}:dlq") == 0


@pytest.mark.parametrize("size", ["script", "watch"])
def test_an_entry_whose_stream_is_gone_gets_no_letter(raw_client: redis.Redis, stream_key: str, settings: Settings, size: str) -> None:
    """Deleted while its batch was in flight (or Redis restarted without its data): the entry is
    gone, so no letter, and no NOGROUP error (a shard panic)."""
    fields = [b"data", b"x"] if size == "script" else [b"data", b"x"] + [b"f%d" % i for i in range(2 * SCRIPT_MAX_VALUES)]
    entry_id = pending_entry(raw_client, stream_key, fields)
    raw_client.delete(stream_key)
    assert settle(settings, [DeadLetter(entry_id, fields, "not JSON", "decode", 5)]) == 0
    assert raw_client.xlen(f"{stream_key}:dlq") == 0


@pytest.mark.parametrize("size", ["script", "watch"])
def test_poison_whose_group_is_gone_gets_one_letter_however_often_it_is_read(
    raw_client: redis.Redis, stream_key: str, settings: Settings, size: str
) -> None:
    """The group destroyed under a batch in flight: the poison still in the stream gets its letter
    (no NOGROUP error), and read again by the group created anew, no second one."""
    fields = [b"data", b"x"] if size == "script" else [b"data", b"x"] + [b"f%d" % i for i in range(2 * SCRIPT_MAX_VALUES)]
    entry_id = pending_entry(raw_client, stream_key, fields)
    raw_client.xgroup_destroy(stream_key, "processor")
    letter = DeadLetter(entry_id, fields, "not JSON", "decode", 5)
    assert settle(settings, [letter]) == 1
    raw_client.xgroup_create(stream_key, "processor", id="0")
    raw_client.xreadgroup("processor", "t-0", {stream_key: ">"})
    assert settle(settings, [letter]) == 0
    assert raw_client.xlen(f"{stream_key}:dlq") == 1
    assert raw_client.xpending(stream_key, "processor")["pending"] == 0


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("reset", ["setid", "destroy"])
def test_an_entry_read_again_after_its_group_was_reset_gets_no_second_letter(
    raw_client: redis.Redis, stream_key: str, settings: Settings, size: str, reset: str
) -> None:
    """XGROUP SETID 0 (or the group destroyed and created anew) delivers a dead-lettered entry again:
    it is acknowledged, and its one letter stays the only one (SPEC §5: exactly one DLQ entry)."""
    fields = [b"data", b"x"] + ([item for i in range(4_000) for item in (b"f%d" % i, b"v")] if size == "large" else [])
    entry_id = pending_entry(raw_client, stream_key, fields)
    letter = DeadLetter(entry_id, fields, "not JSON", "decode", 5)
    assert settle(settings, [letter]) == 1
    if reset == "setid":
        raw_client.xgroup_setid(stream_key, "processor", "0")
    else:
        raw_client.xgroup_destroy(stream_key, "processor")
        raw_client.xgroup_create(stream_key, "processor", id="0")
    raw_client.xreadgroup("processor", "t-0", {stream_key: ">"})
    assert raw_client.xpending(stream_key, "processor")["pending"] == 1
    assert settle(settings, [letter]) == 0
    assert raw_client.xlen(f"{stream_key}:dlq") == 1
    assert raw_client.xpending(stream_key, "processor")["pending"] == 0, "acknowledged all the same"
    raw_client.xtrim(stream_key, maxlen=0)
    assert raw_client.zcard(f"{stream_key}:lettered") == 1


def test_letters_are_counted_as_they_are_written(raw_client: redis.Redis, stream_key: str, settings: Settings) -> None:
    """Letters too large for the script are written (and their entries acknowledged) one by one: each
    is reported at once, so a shard killed between two of them has counted the first (it is never
    delivered again; counted after the whole settle, it was missing from the counter for good)."""
    large = [b"data", b"x"] + [item for i in range(SCRIPT_MAX_VALUES) for item in (b"f%d" % i, b"v")]
    ids = [pending_entry(raw_client, stream_key, [b"data", b"small"])]
    ids += [raw_client.execute_command("XADD", stream_key, "*", *large) for _ in range(3)]
    raw_client.xreadgroup("processor", "t-0", {stream_key: ">"})
    letters = [DeadLetter(ids[0], [b"data", b"small"], "not JSON", "decode", 5)]
    letters += [DeadLetter(entry_id, large, "too many fields", "validate", 5) for entry_id in ids[1:]]
    told: list[tuple[int, int]] = []

    async def go() -> set[bytes]:
        stream = ConsumerStream(settings, "t-0")
        try:
            return await stream.settle([], letters, (), lambda count: told.append((count, raw_client.xlen(f"{stream_key}:dlq"))))
        finally:
            await stream.close()

    assert asyncio.run(go()) == set(ids)
    assert told == [(1, 1), (1, 2), (1, 3), (1, 4)], "each report right after its letter"


def test_a_script_flushed_from_redis_under_a_settle_changes_nothing(
    raw_client: redis.Redis, stream_key: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SCRIPT FLUSH between redis-py's check of a pipeline's scripts and its run: letters go out with
    the script's text, so the settle writes and counts its letter all the same (it failed the
    pipeline, and the shard panicked)."""
    entry_id = pending_entry(raw_client, stream_key, [b"data", b"x"])
    checked = redis.asyncio.client.Pipeline.load_scripts

    async def checked_then_flushed(pipe: redis.asyncio.client.Pipeline) -> None:
        await checked(pipe)
        raw_client.script_flush()

    monkeypatch.setattr(redis.asyncio.client.Pipeline, "load_scripts", checked_then_flushed)
    raw_client.script_flush()
    assert settle(settings, [DeadLetter(entry_id, [b"data", b"x"], "not JSON", "decode", 5)]) == 1
    assert raw_client.xlen(f"{stream_key}:dlq") == 1
    assert raw_client.xpending(stream_key, "processor")["pending"] == 0
