"""`processor lag` and `processor dlq list|show|replay|purge` against real Redis."""

from __future__ import annotations

import asyncio
import os
import pty
import subprocess
import sys

import orjson
import pytest
import redis

from common.config import Settings
from common.errors import ExitCode, ProcessorError
from common.lag import Lag, group_lag
from common.stream_pages import PAGE_BUDGET_BYTES, entries_bytes
from common.letters import split_letter
from ops.cli import build_parser
from ops.dlq_letters import UnknownLetters, format_letter, format_letter_page, list_letters, show_letter
from ops.dlq_purge import purge, purge_all
from ops.dlq_replay import replay, replay_all
from ops.lag import format_lag, lag_report
from ops.terminal import Declined
from tests.ops.letters import GROUP, ROOT, add_letter, fix, run_cli

SECRET = "s3cret-pw"


def redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


# --- lag ---------------------------------------------------------------------------------


def test_lag_is_counted_when_redis_reports_nil(redis_client: redis.Redis, stream_key: str, stream_settings: Settings) -> None:
    """After an XDEL beyond last-delivered-id Redis 7 reports lag nil; the report counts it exactly."""
    redis_client.xgroup_create(stream_key, GROUP, id="0", mkstream=True)
    ids = [redis_client.xadd(stream_key, {"data": fix(f"d{i}")}) for i in range(10)]
    redis_client.xreadgroup(GROUP, "c1", {stream_key: ">"}, count=4)
    redis_client.xdel(stream_key, ids[7])
    (group,) = redis_client.xinfo_groups(stream_key)
    assert group["lag"] is None  # what this Redis does; the reason for the fallback
    report = lag_report(stream_settings)
    assert report.lag == Lag(5, True, "counted")
    assert (report.length, report.pending, report.last_delivered_id) == (9, 4, ids[3].decode())


@pytest.mark.parametrize(
    ("delivered", "deleted", "limit", "expected"),
    [
        (20, 22, 1000, Lag(4, True, "counted")),  # the forward count ends first
        (3, 10, 1000, Lag(21, True, "counted")),  # the backward count ends first: XLEN - delivered
        (0, 10, 1000, Lag(24, True, "counted")),  # nothing delivered yet
        (25, 3, 1000, Lag(0, True, "redis")),  # deleted before last-delivered-id: Redis knows
        (10, 15, 4, Lag(2, False, "counted")),  # the limit reached: a lower bound
    ],
)
def test_group_lag_counts_from_both_ends(
    redis_client: redis.Redis, stream_key: str, delivered: int, deleted: int, limit: int, expected: Lag
) -> None:
    """The fallback pages from both ends of last-delivered-id and stops at the shorter side or the limit."""
    redis_client.xgroup_create(stream_key, GROUP, id="0", mkstream=True)
    ids = [redis_client.xadd(stream_key, {"n": i}) for i in range(25)]
    if delivered:
        redis_client.xreadgroup(GROUP, "c1", {stream_key: ">"}, count=delivered)
    redis_client.xdel(stream_key, ids[deleted])
    (group,) = redis_client.xinfo_groups(stream_key)
    assert group_lag(redis_client, stream_key, group, limit=limit, page_size=2) == expected


def test_lag_from_redis(redis_client: redis.Redis, stream_key: str, stream_settings: Settings) -> None:
    """Without deletions the lag is Redis' own figure; consumers with nothing pending are listed too."""
    redis_client.xgroup_create(stream_key, GROUP, id="0", mkstream=True)
    for i in range(3):
        redis_client.xadd(stream_key, {"data": fix(f"d{i}")})
    redis_client.xreadgroup(GROUP, "c1", {stream_key: ">"}, count=1)
    redis_client.xack(stream_key, GROUP, *[p["message_id"] for p in redis_client.xpending_range(stream_key, GROUP, "-", "+", 10)])
    report = lag_report(stream_settings)
    assert (report.lag, report.pending, report.oldest_pending) == (Lag(2, True, "redis"), 0, None)
    assert [(c.name, c.pending) for c in report.consumers] == [("c1", 0)]


@pytest.mark.parametrize("page_size", [1_000, 4])
def test_lag_after_a_trim_of_unread_entries(redis_client: redis.Redis, stream_key: str, page_size: int) -> None:
    """A producer's MAXLEN trim removed entries the group never read: Redis 7.0 goes on counting
    them in its lag (entries-added - entries-read); the lag is what is left to deliver."""
    redis_client.xgroup_create(stream_key, GROUP, id="0", mkstream=True)
    for i in range(5):
        redis_client.xadd(stream_key, {"n": i})
    redis_client.xreadgroup(GROUP, "c1", {stream_key: ">"}, count=5)
    for i in range(30):
        redis_client.xadd(stream_key, {"n": i}, maxlen=10, approximate=False)
    (group,) = redis_client.xinfo_groups(stream_key)
    assert group_lag(redis_client, stream_key, group, page_size=page_size).count == 10
    redis_client.xreadgroup(GROUP, "c1", {stream_key: ">"}, count=100)
    (group,) = redis_client.xinfo_groups(stream_key)
    assert group_lag(redis_client, stream_key, group, page_size=page_size) == Lag(0, True, "redis")


def test_lag_without_stream_or_group(redis_client: redis.Redis, stream_key: str, stream_settings: Settings) -> None:
    """No stream, or a stream without the group: reported as such, every entry counted as lag."""
    missing = lag_report(stream_settings)
    assert (missing.stream_exists, missing.group_exists, missing.length, missing.lag.count) == (False, False, 0, 0)
    assert "does not exist yet" in "\n".join(format_lag(missing))
    redis_client.xadd(stream_key, {"data": fix("d1")})
    redis_client.xadd(f"{stream_key}:dlq", {"data": b"x"})
    no_group = lag_report(stream_settings)
    assert (no_group.stream_exists, no_group.group_exists) == (True, False)
    assert (no_group.lag, no_group.dlq_length, no_group.consumers) == (Lag(1, True, "no-group"), 1, [])
    assert "not created yet" in "\n".join(format_lag(no_group))


def test_pending_per_consumer_and_oldest(redis_client: redis.Redis, stream_key: str, stream_settings: Settings) -> None:
    """Per-consumer pending and idle, and the oldest pending entry's age (from its id) and idle time."""
    now_ms = redis_now_ms(redis_client)
    redis_client.xgroup_create(stream_key, GROUP, id="0", mkstream=True)
    oldest = redis_client.xadd(stream_key, {"data": fix("d1")}, id=f"{now_ms - 60_000}-0")
    redis_client.xadd(stream_key, {"data": fix("d2")}, id=f"{now_ms - 30_000}-0")
    redis_client.xadd(stream_key, {"data": fix("d3")})
    redis_client.xadd(stream_key, {"data": fix("d4")})
    redis_client.xreadgroup(GROUP, "c1", {stream_key: ">"}, count=2)
    redis_client.xreadgroup(GROUP, "c2", {stream_key: ">"}, count=1)
    redis_client.xclaim(stream_key, GROUP, "c1", 0, [oldest], idle=45_000)  # sets its idle time
    report = lag_report(stream_settings)
    assert (report.pending, report.lag) == (3, Lag(1, True, "redis"))
    assert report.oldest_pending is not None
    assert (report.oldest_pending.id, report.oldest_pending.consumer) == (oldest.decode(), "c1")
    assert 60_000 <= report.oldest_pending.age_ms < 70_000
    assert 45_000 <= report.oldest_pending.idle_ms < 55_000
    assert report.oldest_pending.deliveries == 2  # read once, claimed once
    assert {c.name: c.pending for c in report.consumers} == {"c1": 2, "c2": 1}
    assert all(0 <= c.idle_ms < 10_000 for c in report.consumers)


def test_cli_lag_human_and_json(redis_client: redis.Redis, stream_key: str, redis_env: dict[str, str]) -> None:
    """`processor lag` prints a table of consumers; --json parses and matches it."""
    redis_client.xgroup_create(stream_key, GROUP, id="0", mkstream=True)
    ids = [redis_client.xadd(stream_key, {"data": fix(f"d{i}")}) for i in range(4)]
    redis_client.xreadgroup(GROUP, "shard-0", {stream_key: ">"}, count=1)
    redis_client.xdel(stream_key, ids[2])
    human = run_cli(redis_env, "lag")
    assert human.returncode == 0, human.stderr
    assert f"group         {GROUP}: lag 2 (counted" in human.stdout
    assert "CONSUMER  PENDING  IDLE" in human.stdout and "shard-0   1" in human.stdout
    as_json = run_cli(redis_env, "lag", "--json")
    assert as_json.returncode == 0, as_json.stderr
    report = orjson.loads(as_json.stdout)
    assert (report["length"], report["lag"], report["lag_source"], report["pending"]) == (3, 2, "counted", 1)
    assert report["oldest_pending"]["id"] == ids[0].decode()
    assert [c["name"] for c in report["consumers"]] == ["shard-0"]


# --- dlq list / show ---------------------------------------------------------------------


def test_list_oldest_first_with_paging(redis_client: redis.Redis, stream_key: str, stream_settings: Settings) -> None:
    """`dlq list` gives letters oldest first, device_id when data parses, and a cursor for the next page."""
    first = add_letter(redis_client, stream_key, {b"data": fix("dev-1")}, source_id="5-0")
    second = add_letter(redis_client, stream_key, {b"data": b"{not json"}, kind="decode", error="bad JSON")
    third = add_letter(redis_client, stream_key, {b"data": fix("dev-3")})
    page = list_letters(stream_settings, 2)
    assert [letter.id for letter in page.letters] == [first, second] and page.more and page.length == 3
    summary = page.as_json()["letters"]
    assert summary[0] == {  # type: ignore[index]
        "id": first, "failed_at": "2026-03-01T10:00:00.000Z", "error_kind": "validate", "source_id": "5-0",
        "source_stream": stream_key, "failures": 5, "consumer": "host-0", "device_id": "dev-1",
        "error": "lat out of range",
    }
    assert summary[1]["device_id"] is None  # type: ignore[index]
    rest = list_letters(stream_settings, 2, after=page.as_json()["next_after"])  # type: ignore[arg-type]
    assert [letter.id for letter in rest.letters] == [third] and not rest.more
    lines = format_letter_page(page)
    assert lines[0].split() == ["ID", "FAILED_AT", "KIND", "SOURCE_ID", "DEVICE_ID", "ERROR"]
    assert lines[2].split()[:5] == [second, "2026-03-01T10:00:00.000Z", "decode", "1-1", "-"]
    assert lines[-1] == f"(2 of 3 dead letters in {stream_key}:dlq, oldest first; next page: --after {second})"


def test_show_escapes_and_pretty_prints(redis_client: redis.Redis, stream_key: str, stream_settings: Settings) -> None:
    """`dlq show`: JSON data indented, control characters and non-UTF-8 bytes escaped, exact bytes in --json."""
    letter_id = add_letter(
        redis_client, stream_key,
        {b"data": fix("dev-\x1b[2J", io={"din1": 1}), b"raw": b"\xff\xfe\x1b[31m", b"note": "Zürich".encode()},
        error="row rejected:\nline two",
    )
    letter = show_letter(stream_settings, letter_id)
    text = "\n".join(format_letter(letter))
    assert "\x1b" not in text and "\nline two" not in text
    assert "  error          row rejected:\\nline two" in text
    assert '      "device_id": "dev-\\u001b[2J",' in text and '      "io": {' in text
    assert "  raw            \\xff\\xfe\\x1b[31m" in text and "  note           Zürich" in text
    as_json = orjson.loads(orjson.dumps(letter.as_json()))
    assert as_json["original"][1] == ["raw", "\\xff\\xfe\x1b[31m"]
    assert as_json["original_base64"] == [None, ["cmF3", "//4bWzMxbQ=="], None]
    assert as_json["fields_base64"] == {}
    assert as_json["data"]["io"] == {"din1": 1}


def test_cli_show_and_list_json(redis_client: redis.Redis, stream_key: str, redis_env: dict[str, str]) -> None:
    """`dlq show --json` and `dlq list --json` parse; an unknown id exits 1, a malformed one 2."""
    letter_id = add_letter(redis_client, stream_key, {b"data": fix("dev-1"), b"extra": b"x"})
    shown = run_cli(redis_env, "dlq", "show", letter_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert orjson.loads(shown.stdout)["original"][1] == ["extra", "x"]
    listed = run_cli(redis_env, "dlq", "list", "--json", "--limit", "5")
    assert listed.returncode == 0, listed.stderr
    assert [letter["id"] for letter in orjson.loads(listed.stdout)["letters"]] == [letter_id]
    unknown = run_cli(redis_env, "dlq", "show", "1-1")
    assert (unknown.returncode, unknown.stderr) == (1, f"processor: no dead letter with id 1-1 in {stream_key}:dlq; nothing was shown\n")
    malformed = run_cli(redis_env, "dlq", "show", "12")
    assert malformed.returncode == ExitCode.USAGE and "not a stream entry id" in malformed.stderr
    assert run_cli(redis_env, "dlq", "list", "--limit", "0").returncode == ExitCode.USAGE


@pytest.mark.parametrize("command", [("dlq", "show", "LETTER"), ("dlq", "list"), ("lag",)], ids=" ".join)
def test_cli_output_closed_early_is_nobody_s_outage(
    redis_client: redis.Redis, stream_key: str, redis_env: dict[str, str], command: tuple[str, ...]
) -> None:
    """`processor dlq show ID | head -1`: the reader leaves before the output is written. That
    is no server's fault: exit 1 (not all was written), and nothing on stderr, as a pipeline expects."""
    letter_id = add_letter(redis_client, stream_key, {b"data": fix("dev-1", io={"pad": "x" * 300_000})})
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `head` does once it has its line
    try:
        result = run_cli(redis_env, *(letter_id if arg == "LETTER" else arg for arg in command), stdout=write_end)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (ExitCode.FAILED, "")


# --- dlq replay --------------------------------------------------------------------------


def test_replay_restores_exactly_the_original_fields(
    redis_client: redis.Redis, stream_key: str, stream_settings: Settings
) -> None:
    """A replayed letter is a new input entry with exactly its original fields, and the letter is gone."""
    original = {b"data": fix("dev-1"), b"extra": b"\xff binary", b"received_at": b"1718000000123"}
    letter_id = add_letter(redis_client, stream_key, original)
    keep = add_letter(redis_client, stream_key, {b"data": fix("dev-2")})
    result = replay(stream_settings, [letter_id, letter_id])  # a repeated id counts once
    ((replayed_letter, entry_id),) = result.replayed
    assert replayed_letter == letter_id
    ((stored_id, fields),) = redis_client.xrange(stream_key)
    assert (stored_id.decode(), fields) == (entry_id, original)
    assert [i.decode() for i, _ in redis_client.xrange(f"{stream_key}:dlq")] == [keep]


def test_replay_of_a_letter_the_shard_wrote(
    redis_client: redis.Redis, raw_client: redis.Redis, stream_key: str, stream_settings: Settings
) -> None:
    """A letter written by the shard's own dead-letter step replays to the entry as it was first
    added, field for field: a repeated name and a name equal to an added field's included."""
    from shard.dead_letters import DeadLetter
    from shard.stream import ConsumerStream

    original = [b"data", b'{"device_id": "dev-1", "lat": 999}', b"error", b"mine", b"tag", b"a", b"tag", b"b"]

    async def dead_letter_one() -> bytes:
        stream = ConsumerStream(stream_settings, "host-0")
        try:
            await stream.ensure_group()
            source_id = await stream.redis.execute_command("XADD", stream_key, "*", *original)
            ((entry_id, fields),) = await stream.read(">", 10)
            await stream.settle([], [DeadLetter(entry_id, fields, "lat out of range", "validate", 5)])
            return source_id
        finally:
            await stream.close()

    source_id = asyncio.run(dead_letter_one())
    ((letter_id, letter),) = raw_client.xrange(f"{stream_key}:dlq")
    parts = split_letter(letter)
    assert parts.current_format and parts.added[b"source_id"] == source_id and parts.original == original
    result = replay(stream_settings, [letter_id.decode()])
    ((_, entry_id),) = result.replayed
    assert raw_client.xrange(stream_key, min=entry_id, max=entry_id)[0][1] == original
    assert redis_client.xlen(f"{stream_key}:dlq") == 0


def test_replay_is_all_or_nothing(redis_client: redis.Redis, stream_key: str, stream_settings: Settings) -> None:
    """One unknown id, or a letter of another stream, and nothing at all is replayed."""
    good = add_letter(redis_client, stream_key, {b"data": fix("dev-1")})
    foreign = add_letter(redis_client, stream_key, {b"data": fix("dev-2")}, source_stream="other:stream")
    with pytest.raises(UnknownLetters, match=r"no dead letter with id 9-9 in .*; nothing was replayed") as caught:
        replay(stream_settings, [good, "9-9"])
    assert caught.value.ids == ["9-9"]
    with pytest.raises(ProcessorError, match=rf"{foreign} came from stream 'other:stream'.*nothing was replayed"):
        replay(stream_settings, [good, foreign])
    assert redis_client.xlen(stream_key) == 0
    assert redis_client.xlen(f"{stream_key}:dlq") == 2


def test_replay_all_leaves_other_streams_letters(
    redis_client: redis.Redis, stream_key: str, stream_settings: Settings
) -> None:
    """`replay --all` replays every letter of STREAM_KEY, oldest first, and leaves the others with a reason."""
    ids = [add_letter(redis_client, stream_key, {b"data": fix(f"dev-{i}")}) for i in range(3)]
    foreign = add_letter(redis_client, stream_key, {b"data": fix("dev-x")}, source_stream="other:stream")
    result = replay_all(stream_settings)
    assert [letter for letter, _ in result.replayed] == ids
    assert [fields[b"data"] for _, fields in redis_client.xrange(stream_key)] == [fix(f"dev-{i}") for i in range(3)]
    assert result.other_stream == [(foreign, "other:stream")]
    assert "1 dead letter not replayable" in (result.problem() or "")
    assert [i.decode() for i, _ in redis_client.xrange(f"{stream_key}:dlq")] == [foreign]


def test_cli_replay(redis_client: redis.Redis, stream_key: str, redis_env: dict[str, str]) -> None:
    """`dlq replay ID --json` prints the new entry id; an unknown id exits 1 and changes nothing; no ids exit 2."""
    letter_id = add_letter(redis_client, stream_key, {b"data": fix("dev-1")})
    unknown = run_cli(redis_env, "dlq", "replay", letter_id, "7-7")
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1 and "7-7" in unknown.stderr
    assert redis_client.xlen(f"{stream_key}:dlq") == 1
    done = run_cli(redis_env, "dlq", "replay", letter_id, "--json")
    assert done.returncode == 0, done.stderr
    ((entry_id, _),) = redis_client.xrange(stream_key)
    assert orjson.loads(done.stdout)["replayed"] == [{"letter_id": letter_id, "entry_id": entry_id.decode()}]
    assert run_cli(redis_env, "dlq", "replay").returncode == ExitCode.USAGE
    assert run_cli(redis_env, "dlq", "replay", "--all", letter_id).returncode == ExitCode.USAGE
    empty = run_cli(redis_env, "dlq", "replay", "--all")
    assert (empty.returncode, empty.stdout) == (0, f"replayed 0 dead letters into {stream_key}\n")


LARGEST_ID = f"{2**64 - 1}-{2**64 - 1}"


def test_replay_all_ends_at_a_letter_with_the_largest_id(
    redis_client: redis.Redis, stream_key: str, stream_settings: Settings
) -> None:
    """After a letter with the largest id there is, the next page would start past it, which Redis
    refuses: the letters were replayed and the command then failed (exit 1, no result)."""
    first = add_letter(redis_client, stream_key, {b"data": fix("dev-1")})
    add_letter(redis_client, stream_key, {b"data": fix("dev-2")}, letter_id=LARGEST_ID)
    result = replay_all(stream_settings)
    assert [letter for letter, _ in result.replayed] == [first, LARGEST_ID]
    assert redis_client.xlen(f"{stream_key}:dlq") == 0 and redis_client.xlen(stream_key) == 2


# --- dlq purge ---------------------------------------------------------------------------


def test_purge_all_reaches_a_letter_with_the_largest_id(
    redis_client: redis.Redis, stream_key: str, stream_settings: Settings
) -> None:
    """No id follows the largest one: `purge --all` empties the DLQ rather than failing on MINID."""
    add_letter(redis_client, stream_key, {b"data": fix("dev-1")})
    add_letter(redis_client, stream_key, {b"data": fix("dev-2")}, letter_id=LARGEST_ID)
    assert purge_all(stream_settings, lambda _q: True).purged == 2
    assert redis_client.xlen(f"{stream_key}:dlq") == 0


def test_purge_is_all_or_nothing(redis_client: redis.Redis, stream_key: str, stream_settings: Settings) -> None:
    """Purging named letters deletes them; one unknown id deletes nothing; a declined question deletes nothing."""
    a, b, c = (add_letter(redis_client, stream_key, {b"data": fix(f"dev-{i}")}) for i in range(3))
    with pytest.raises(UnknownLetters, match="nothing was deleted"):
        purge(stream_settings, [a, "3-3"], lambda _q: True)
    with pytest.raises(Declined):
        purge(stream_settings, [a], lambda _q: False)
    assert redis_client.xlen(f"{stream_key}:dlq") == 3
    asked: list[str] = []
    result = purge(stream_settings, [a, c], lambda q: asked.append(q) or True)
    assert (result.purged, result.ids) == (2, [a, c])
    assert asked == [f"Delete 2 dead letters from {stream_key}:dlq?"]
    assert [i.decode() for i, _ in redis_client.xrange(f"{stream_key}:dlq")] == [b]


def test_purge_all_keeps_the_stream_key(redis_client: redis.Redis, stream_key: str, stream_settings: Settings) -> None:
    """`purge --all` empties the DLQ up to its newest letter; the key (and a group on it) stays."""
    for i in range(3):
        add_letter(redis_client, stream_key, {b"data": fix(f"dev-{i}")})
    redis_client.xgroup_create(f"{stream_key}:dlq", "alerts", id="0")
    with pytest.raises(Declined):
        purge_all(stream_settings, lambda _q: False)
    assert purge_all(stream_settings, lambda _q: True).purged == 3
    assert redis_client.xlen(f"{stream_key}:dlq") == 0
    assert [g["name"] for g in redis_client.xinfo_groups(f"{stream_key}:dlq")] == [b"alerts"]
    assert purge_all(stream_settings, lambda _q: pytest.fail("asked about nothing")).purged == 0


def test_cli_purge_needs_yes_without_a_terminal(redis_client: redis.Redis, stream_key: str, redis_env: dict[str, str]) -> None:
    """Without a terminal `dlq purge` refuses with exit 2 unless --yes; with --yes --json it deletes."""
    letter_id = add_letter(redis_client, stream_key, {b"data": fix("dev-1")})
    refused = run_cli(redis_env, "dlq", "purge", letter_id)
    assert (refused.returncode, refused.stderr) == (
        ExitCode.USAGE, "processor: refusing to delete without confirmation: stdin is not a terminal; pass --yes\n"
    )
    assert redis_client.xlen(f"{stream_key}:dlq") == 1
    done = run_cli(redis_env, "dlq", "purge", "--all", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {"dlq": f"{stream_key}:dlq", "purged": 1, "ids": None}


def test_cli_purge_refuses_with_stdin_closed(redis_client: redis.Redis, stream_key: str, redis_env: dict[str, str]) -> None:
    """A closed stdin (`0<&-`) is no terminal either: refused with exit 2, not an internal error."""
    add_letter(redis_client, stream_key, {b"data": fix("dev-1")})
    refused = subprocess.run(
        ["sh", "-c", 'exec "$@" 0<&-', "sh", sys.executable, "-m", "ops", "dlq", "purge", "--all"],
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **redis_env},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert (refused.returncode, refused.stderr) == (
        ExitCode.USAGE, "processor: refusing to delete without confirmation: stdin is not a terminal; pass --yes\n"
    )
    assert redis_client.xlen(f"{stream_key}:dlq") == 1


@pytest.mark.parametrize(("answer", "exit_code", "left"), [(b"y\n", 0, 0), (b"n\n", 1, 1)])
def test_cli_purge_asks_on_a_terminal(
    redis_client: redis.Redis, stream_key: str, redis_env: dict[str, str], answer: bytes, exit_code: int, left: int
) -> None:
    """On a terminal `dlq purge` asks first; yes deletes, no exits 1 and keeps the letter."""
    letter_id = add_letter(redis_client, stream_key, {b"data": fix("dev-1")})
    controller, terminal = pty.openpty()
    try:
        os.write(controller, answer)  # typed ahead; the terminal keeps it until read
        done = run_cli(redis_env, "dlq", "purge", letter_id, stdin=terminal)
    finally:
        os.close(terminal)
        os.close(controller)
    assert done.returncode == exit_code, done.stderr
    assert done.stderr.startswith(f"Delete 1 dead letter from {stream_key}:dlq? [y/N] ")
    assert redis_client.xlen(f"{stream_key}:dlq") == left


# --- errors and claim --------------------------------------------------------------------


def test_cli_errors_never_show_passwords(redis_env: dict[str, str]) -> None:
    """Unreachable Redis exits 1 with one line and no password; a bad setting exits 78."""
    unreachable = run_cli({**redis_env, "REDIS_URL": f"redis://:{SECRET}@127.0.0.1:1/0"}, "dlq", "list")
    assert unreachable.returncode == ExitCode.FAILED
    assert unreachable.stderr.startswith("processor: cannot reach Redis at redis://:***@127.0.0.1:1/0")
    assert len(unreachable.stderr.splitlines()) == 1
    assert SECRET not in unreachable.stdout + unreachable.stderr
    bad_config = run_cli({**redis_env, "REDIS_URL": f"ftp://u:{SECRET}@x"}, "lag")
    assert bad_config.returncode == ExitCode.CONFIG and "REDIS_URL" in bad_config.stderr
    assert SECRET not in bad_config.stdout + bad_config.stderr


def test_claim_arguments() -> None:
    """`processor claim` parses --min-idle-ms and --from, and rejects a negative idle time."""
    args = build_parser().parse_args(["claim", "--min-idle-ms", "5000", "--from", "host-3", "--json"])
    assert (args.min_idle_ms, args.from_consumer, args.json) == (5000, "host-3", True)
    defaults = build_parser().parse_args(["claim"])
    assert (defaults.min_idle_ms, defaults.from_consumer) == (None, None)
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["claim", "--min-idle-ms", "-1"])
    assert caught.value.code == ExitCode.USAGE


def test_cli_claim_processes_stuck_entries(redis_client: redis.Redis, stream_key: str, env: dict[str, str]) -> None:
    """`processor claim --from C --min-idle-ms 0 --json` claims C's pending entries and stores or dead-letters them."""
    from supervisor.migrations import apply_migrations

    apply_migrations(env["MIGRATION_DATABASE_URL"])
    redis_client.xgroup_create(stream_key, GROUP, id="0", mkstream=True)
    redis_client.xadd(stream_key, {"data": fix("dev-1")})
    redis_client.xadd(stream_key, {"data": fix("dev-2")})
    redis_client.xadd(stream_key, {"data": b"{not json"})
    redis_client.xreadgroup(GROUP, "gone-0", {stream_key: ">"}, count=10)
    done = run_cli(env, "claim", "--from", "gone-0", "--min-idle-ms", "0", "--json")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {"claimed": 3, "stored": 2, "dead_lettered": 1, "expired": 0, "gone": 0}
    assert '"msg":"entry dead-lettered"' in done.stderr  # the shard's logs go to stderr, not into the JSON
    assert redis_client.xpending(stream_key, GROUP)["pending"] == 0
    assert redis_client.xlen(f"{stream_key}:dlq") == 1
    human = run_cli(env, "claim")
    assert (human.returncode, human.stdout) == (0, "claimed 0, stored 0, dead lettered 0, expired 0, gone 0\n")
    assert "has no consumer" not in human.stderr
    emptied = run_cli(env, "claim", "--from", "gone-0")
    assert emptied.returncode == 0 and "has no consumer" not in emptied.stderr  # known, just nothing left
    typo = run_cli(env, "claim", "--from", "gnoe-0")
    assert (typo.returncode, typo.stdout) == (0, "claimed 0, stored 0, dead lettered 0, expired 0, gone 0\n")
    assert f"processor: group {GROUP} has no consumer gnoe-0 (its consumers: " in typo.stderr
    assert "gone-0" in typo.stderr.split("has no consumer gnoe-0", 1)[1]


def test_output_that_cannot_be_written_is_exit_1_in_one_line(redis_env: dict[str, str]) -> None:
    """`processor lag > /dev/full` and with stdout closed: exit 1 with one line, not 70 with a traceback."""
    env = {**os.environ, **redis_env}
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "ops", "lag"], env=env, stdout=full, stderr=subprocess.PIPE,
                                text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("processor: failed: OSError") and "Traceback" not in result.stderr
    closed = subprocess.run(f"{sys.executable} -m ops lag >&-", shell=True, env=env, stderr=subprocess.PIPE, text=True,
                            timeout=60)
    assert closed.returncode == 1 and "standard output is closed" in closed.stderr


def test_lag_is_counted_in_pages_of_bounded_size(redis_client: redis.Redis, stream_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting reads entries with their fields: pages are sized by bytes, not 1,000 entries of up to 1 MiB."""
    redis_client.xgroup_create(stream_key, GROUP, id="0", mkstream=True)
    ids = [redis_client.xadd(stream_key, {"data": b"x" * 900_000}) for _ in range(40)]
    pages: list[int] = []
    for name in ("xrange", "xrevrange"):
        read = getattr(redis_client, name)
        monkeypatch.setattr(redis_client, name, lambda *a, _read=read, **k: pages.append(entries_bytes(p := _read(*a, **k))) or p)
    try:
        (group,) = redis_client.xinfo_groups(stream_key)
        assert group_lag(redis_client, stream_key, group) == Lag(40, True, "redis")
        redis_client.xdel(stream_key, ids[20])  # Redis can no longer tell the lag: counted
        (group,) = redis_client.xinfo_groups(stream_key)
        assert group_lag(redis_client, stream_key, group) == Lag(39, True, "counted")
        assert pages and max(pages) <= PAGE_BUDGET_BYTES + 900_000
    finally:
        redis_client.delete(stream_key)
