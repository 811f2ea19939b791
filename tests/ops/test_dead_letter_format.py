"""`processor dlq list|show|replay` and the dead-letter format of common/letters.py, against real Redis.

A letter keeps every original field verbatim: names equal to the added fields' (`error`,
`failures`, `consumer`), repeated names, names and values that are not UTF-8, empty values,
thousands of fields. `dlq replay` restores the original entry field for field; letters of
the earlier format are still read and replayed.
"""

from __future__ import annotations

import base64

import orjson
import pytest
import redis

from common.config import Settings
from common.errors import ProcessorError
from common.letters import split_letter
from ops import dlq_replay
from ops.dlq_letters import UnknownLetters, format_letter, format_letter_page, list_letters, show_letter
from ops.dlq_replay import replay, replay_all
from tests.ops.letters import FAILED_AT, add_earlier_letter, add_letter, fix, run_cli

# An original entry no dict can hold: names of added fields, a repeated name, bytes that
# are not UTF-8 in a name and in a value, an empty value, and two `data` fields.
HOSTILE = [
    b"data", fix("dev-1"),
    b"error", b"the producer's own error field",
    b"failures", b"0",
    b"tag", b"first",
    b"consumer", b"someone else",
    b"tag", b"second",
    b"\xff\xfename", b"\x00\xffvalue",
    b"empty", b"",
    b"data", fix("dev-2"),
]


def many_fields(count: int) -> list[bytes]:
    """An original entry of `count` fields; every 100th repeats the name `dup`."""
    flat = [b"data", fix("dev-big")]
    for i in range(1, count):
        flat += [b"dup" if i % 100 == 0 else f"f{i:05d}".encode(), f"v{i}".encode()]
    return flat


def entry(raw_client: redis.Redis, key: str, entry_id: str) -> list[bytes]:
    """The fields of one entry exactly as Redis holds them."""
    ((_, fields),) = raw_client.xrange(key, min=entry_id, max=entry_id)
    return fields  # type: ignore[no-any-return]


def dlq_ids(client: redis.Redis, stream_key: str) -> list[str]:
    return [entry_id.decode() for entry_id, _ in client.xrange(f"{stream_key}:dlq")]


# --- show and list -----------------------------------------------------------------------


def test_show_gives_the_added_fields_then_every_original_field(
    redis_client: redis.Redis, stream_key: str, stream_settings: Settings
) -> None:
    """`dlq show` lists the added fields, then the original ones in order: collisions, repeats,
    binary and empty values included; each `data` pretty-printed."""
    letter_id = add_letter(redis_client, stream_key, HOSTILE, error="entry has 2 'data' fields")
    letter = show_letter(stream_settings, letter_id)
    assert letter.get("error") == "entry has 2 'data' fields" and letter.get("consumer") == "host-0"
    assert letter.original == list(zip(HOSTILE[0::2], HOSTILE[1::2]))
    lines = format_letter(letter)
    assert lines[:9] == [
        f"dead letter {letter_id}",
        "  error          entry has 2 'data' fields",
        "  error_kind     validate",
        "  source_id      1-1",
        f"  source_stream  {stream_key}",
        "  failures       5",
        "  consumer       host-0",
        f"  failed_at      {FAILED_AT}",
        "original fields (9, in order):",
    ]
    originals = [line for line in lines[9:] if not line.startswith("    ")]  # without the JSON's lines
    assert originals == [
        "  data           (JSON)",
        "  error          the producer's own error field",
        "  failures       0",
        "  tag            first",
        "  consumer       someone else",
        "  tag            second",
        "  \\xff\\xfename   \\x00\\xffvalue",
        "  empty          ",
        "  data           (JSON)",
    ]
    assert '      "device_id": "dev-1",' in lines and '      "device_id": "dev-2",' in lines


def test_show_json_keeps_order_repeats_and_exact_bytes(
    redis_client: redis.Redis, stream_key: str, redis_env: dict[str, str]
) -> None:
    """`dlq show --json`: `fields` are the added fields, `original` the ordered pairs, and
    `original_base64` gives the exact bytes of every pair that is not UTF-8."""
    letter_id = add_letter(redis_client, stream_key, HOSTILE)
    shown = run_cli(redis_env, "dlq", "show", letter_id, "--json")
    assert shown.returncode == 0, shown.stderr
    document = orjson.loads(shown.stdout)
    assert document == {
        "id": letter_id,
        "format": "current",
        "fields": {
            "error": "lat out of range", "error_kind": "validate", "source_id": "1-1", "source_stream": stream_key,
            "failures": "5", "consumer": "host-0", "failed_at": FAILED_AT,
        },
        "fields_base64": {},
        "original": [
            ["data", fix("dev-1").decode()], ["error", "the producer's own error field"], ["failures", "0"],
            ["tag", "first"], ["consumer", "someone else"], ["tag", "second"],
            ["\\xff\\xfename", "\x00\\xffvalue"], ["empty", ""], ["data", fix("dev-2").decode()],
        ],
        "original_base64": [None, None, None, None, None, None, ["//5uYW1l", "AP92YWx1ZQ=="], None, None],
        "data": orjson.loads(fix("dev-1")),
    }
    exact = [
        item
        for (name, value), binary in zip(document["original"], document["original_base64"])
        for item in ([base64.b64decode(b) for b in binary] if binary else [name.encode(), value.encode()])
    ]
    assert exact == HOSTILE  # what an operator's script can rebuild from the document


def test_list_takes_the_device_from_the_first_data_field(
    redis_client: redis.Redis, stream_key: str, stream_settings: Settings
) -> None:
    """`dlq list` keeps its columns: the error is the added one, device_id the first `data`'s."""
    letter_id = add_letter(redis_client, stream_key, HOSTILE, error="entry has 2 'data' fields")
    page = list_letters(stream_settings, 5)
    ((summary,),) = [page.as_json()["letters"]]  # type: ignore[misc]
    assert summary == {
        "id": letter_id, "failed_at": FAILED_AT, "error_kind": "validate", "source_id": "1-1",
        "source_stream": stream_key, "failures": 5, "consumer": "host-0", "device_id": "dev-1",
        "error": "entry has 2 'data' fields",
    }
    assert format_letter_page(page)[1].split()[:5] == [letter_id, FAILED_AT, "validate", "1-1", "dev-1"]


def test_a_letter_of_the_earlier_format_is_read_and_replayed(
    redis_client: redis.Redis, raw_client: redis.Redis, stream_key: str, stream_settings: Settings
) -> None:
    """Earlier letters (original first, added fields written over same-named ones) are still
    shown, listed and replayed: their original fields are those not named like an added one."""
    letter_id = add_earlier_letter(
        redis_client, stream_key, {b"data": fix("dev-old"), b"error": b"lost", b"extra": b"\xff"}, error="bad lat"
    )
    letter = show_letter(stream_settings, letter_id)
    assert (letter.get("error"), letter.device_id) == ("bad lat", "dev-old")
    assert letter.original == [(b"data", fix("dev-old")), (b"extra", b"\xff")]
    assert letter.as_json()["format"] == "earlier"
    assert "a letter of the earlier format" in format_letter(letter)[8]
    ((_, entry_id),) = replay(stream_settings, [letter_id]).replayed
    assert entry(raw_client, stream_key, entry_id) == [b"data", fix("dev-old"), b"extra", b"\xff"]
    assert redis_client.xlen(f"{stream_key}:dlq") == 0


# --- replay ------------------------------------------------------------------------------


def test_replay_restores_the_original_entry_field_for_field(
    redis_client: redis.Redis, raw_client: redis.Redis, stream_key: str, stream_settings: Settings
) -> None:
    """Collisions, repeats, binary names and values and empty values come back as they were."""
    letter_id = add_letter(redis_client, stream_key, HOSTILE)
    ((replayed, entry_id),) = replay(stream_settings, [letter_id]).replayed
    assert replayed == letter_id
    assert entry(raw_client, stream_key, entry_id) == HOSTILE
    assert redis_client.xlen(f"{stream_key}:dlq") == 0


@pytest.mark.parametrize("fields", [3_500, 4_000], ids=["script-7000-values", "transaction-8000-values"])
def test_replay_of_a_letter_with_thousands_of_fields(
    redis_client: redis.Redis, raw_client: redis.Redis, stream_key: str, stream_settings: Settings, fields: int
) -> None:
    """A letter at the script's limit, and one beyond Lua's (about 8,000 values), both replay exactly."""
    original = many_fields(fields)
    letter_id = add_letter(redis_client, stream_key, original)
    ((_, entry_id),) = replay(stream_settings, [letter_id]).replayed
    assert entry(raw_client, stream_key, entry_id) == original
    assert redis_client.xlen(f"{stream_key}:dlq") == 0


def test_named_letters_with_a_large_one_are_all_or_nothing(
    redis_client: redis.Redis, raw_client: redis.Redis, stream_key: str, stream_settings: Settings
) -> None:
    """Named ids that include a large letter go through one transaction: an unknown id or a
    letter of another stream and nothing is replayed; otherwise all are, in order."""
    big = many_fields(4_000)
    small = add_letter(redis_client, stream_key, HOSTILE)
    large = add_letter(redis_client, stream_key, big)
    foreign = add_letter(redis_client, stream_key, [b"data", fix("dev-x")], source_stream="other:stream")
    with pytest.raises(UnknownLetters, match="9-9"):
        replay(stream_settings, [small, large, "9-9"])
    with pytest.raises(ProcessorError, match=rf"{foreign} came from stream 'other:stream'.*nothing was replayed"):
        replay(stream_settings, [small, large, foreign])
    assert redis_client.xlen(stream_key) == 0 and dlq_ids(redis_client, stream_key) == [small, large, foreign]
    result = replay(stream_settings, [small, large])
    assert [letter for letter, _ in result.replayed] == [small, large]
    assert [fields for _, fields in raw_client.xrange(stream_key)] == [HOSTILE, big]
    assert dlq_ids(redis_client, stream_key) == [foreign]


def test_replay_all_mixes_the_script_and_the_transaction_in_order(
    redis_client: redis.Redis, raw_client: redis.Redis, stream_key: str, stream_settings: Settings
) -> None:
    """`replay --all` replays normal and large letters oldest first, each exactly."""
    originals = [HOSTILE, many_fields(4_000), [b"data", fix("dev-3")], many_fields(4_001), [b"data", fix("dev-5")]]
    ids = [add_letter(redis_client, stream_key, original) for original in originals]
    result = replay_all(stream_settings)
    assert [letter for letter, _ in result.replayed] == ids and result.problem() is None
    assert [fields for _, fields in raw_client.xrange(stream_key)] == originals
    assert redis_client.xlen(f"{stream_key}:dlq") == 0


@pytest.mark.parametrize("script_max_values", [dlq_replay.SCRIPT_MAX_VALUES, 0], ids=["script", "transaction"])
def test_a_failed_add_deletes_no_letter(
    redis_client: redis.Redis, stream_key: str, stream_settings: Settings, monkeypatch: pytest.MonkeyPatch,
    script_max_values: int,
) -> None:
    """When STREAM_KEY cannot take the entry (it holds a string), the letters stay, on either path."""
    monkeypatch.setattr(dlq_replay, "SCRIPT_MAX_VALUES", script_max_values)
    ids = [add_letter(redis_client, stream_key, HOSTILE), add_letter(redis_client, stream_key, [b"data", fix("d")])]
    redis_client.set(stream_key, "not a stream")
    with pytest.raises(ProcessorError, match="WRONGTYPE"):
        replay(stream_settings, ids)
    with pytest.raises(ProcessorError, match="WRONGTYPE"):
        replay_all(stream_settings)
    assert dlq_ids(redis_client, stream_key) == ids and redis_client.get(stream_key) == b"not a stream"


def test_a_transaction_starts_again_when_the_dlq_changes(
    redis_client: redis.Redis, raw_client: redis.Redis, stream_key: str, stream_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A letter added while a large letter is being replayed discards that attempt; the next one
    replays it once, and the new letter stays."""
    big = many_fields(4_000)
    letter_id = add_letter(redis_client, stream_key, big)
    read, calls, added = dlq_replay._read, [], []

    def read_then_add_a_letter(client: redis.Redis, dlq: str, ids: list[str]) -> object:
        found = read(client, dlq, ids)
        calls.append(ids)
        if len(calls) == 2:  # the transaction's first read: a shard dead-letters another entry
            added.append(add_letter(redis_client, stream_key, [b"data", fix("dev-new")]))
        return found

    monkeypatch.setattr(dlq_replay, "_read", read_then_add_a_letter)
    ((_, entry_id),) = replay(stream_settings, [letter_id]).replayed
    assert len(calls) == 3  # the first read, the discarded attempt, the one that wrote
    assert [fields for _, fields in raw_client.xrange(stream_key)] == [big]
    assert entry(raw_client, stream_key, entry_id) == big and dlq_ids(redis_client, stream_key) == added


def test_a_letter_purged_during_its_transaction_is_not_replayed(
    redis_client: redis.Redis, stream_key: str, stream_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone else deleting the letter between the first read and the transaction: the retry
    finds it gone and nothing is written."""
    letter_id = add_letter(redis_client, stream_key, many_fields(4_000))
    read, calls = dlq_replay._read, []

    def read_then_purge(client: redis.Redis, dlq: str, ids: list[str]) -> object:
        found = read(client, dlq, ids)
        calls.append(ids)
        if len(calls) == 2:  # the transaction's first read: the letter goes before its EXEC
            redis_client.xdel(dlq, letter_id)
        return found

    monkeypatch.setattr(dlq_replay, "_read", read_then_purge)
    with pytest.raises(UnknownLetters, match=letter_id):
        replay(stream_settings, [letter_id])
    assert len(calls) == 3 and redis_client.xlen(stream_key) == 0


def test_split_letter_agrees_with_what_replay_restores(
    redis_client: redis.Redis, raw_client: redis.Redis, stream_key: str, stream_settings: Settings
) -> None:
    """`dlq show --json`'s `original` is exactly what `dlq replay` re-adds, for both formats."""
    ids = [
        add_letter(redis_client, stream_key, HOSTILE),
        add_earlier_letter(redis_client, stream_key, {b"data": fix("dev-1"), b"failures": b"9", b"x": b"y"}),
    ]
    expected = [split_letter(entry(raw_client, f"{stream_key}:dlq", i)).original for i in ids]
    shown = [[item for pair in show_letter(stream_settings, i).original for item in pair] for i in ids]
    assert shown == expected
    replay_all(stream_settings)
    assert [fields for _, fields in raw_client.xrange(stream_key)] == expected


def test_show_of_a_letter_with_json_too_deep_to_print_shows_it_raw(raw_client, stream_key, stream_settings) -> None:  # type: ignore[no-untyped-def]
    """A hostile letter (JSON nested deeper than orjson writes) is shown as text, never a crash."""
    from ops.dlq_letters import format_letter, show_letter

    deep = b'{"device_id":' + b"[" * 300 + b"1" + b"]" * 300 + b"}"
    letter_id = add_letter(raw_client, stream_key, [b"data", deep])
    letter = show_letter(stream_settings, letter_id)
    assert letter.data is None and letter.device_id is None
    assert any("[[[[" in line for line in format_letter(letter))
    assert letter.as_json()["data"] is None
