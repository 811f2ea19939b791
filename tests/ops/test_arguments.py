"""The operator commands' ids and numbers follow one rule (ops/arguments.py): ASCII digits, within
what Redis takes; anything else is a usage error (exit 2) before a server sees it."""

from __future__ import annotations

import pytest
import redis

from common.config import Settings
from common.errors import ExitCode
from ops.arguments import MAX_STREAM_ID_PART
from ops.cli import build_parser
from ops.dlq_letters import DLQ_LIST_MAX, list_letters
from tests.ops.letters import add_letter, fix, run_cli

LARGEST_ID = f"{MAX_STREAM_ID_PART}-{MAX_STREAM_ID_PART}"
BAD_IDS = [
    "99999999999999999999-0",
    f"{MAX_STREAM_ID_PART + 1}-0",
    f"0-{MAX_STREAM_ID_PART + 1}",
    "1-1\n",  # a regular expression's $ matches before a final newline
    "١-0",  # \d, isdigit() and int() take Arabic-Indic digits
    "1-²",
    "1-1x",
    "1",
    "-1-0",
    "1_0-0",
    "0" * 5000 + "-0",
]
# Every place an id is given: `dlq show ID`, `dlq list --after ID`, `dlq replay|purge ID…`.
ID_ARGUMENTS = [
    lambda letter_id: ["dlq", "show", letter_id],
    lambda letter_id: ["dlq", "list", "--after", letter_id],
    lambda letter_id: ["dlq", "replay", letter_id],
    lambda letter_id: ["dlq", "purge", "--yes", "1-0", letter_id],
]


def usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(argv)
    assert caught.value.code == ExitCode.USAGE


@pytest.mark.parametrize("letter_id", BAD_IDS)
@pytest.mark.parametrize("argv", ID_ARGUMENTS)
def test_a_malformed_id_is_a_usage_error(argv, letter_id: str) -> None:  # type: ignore[no-untyped-def]
    if letter_id.isascii() and letter_id.isdigit() and "--after" in argv(letter_id):
        return  # where a listing starts, <milliseconds> alone is a position (below)
    usage_error(argv(letter_id))


@pytest.mark.parametrize("given, start", [("0", "0-0"), ("1718000000000", "1718000000000-0"), ("007", "7-0"),
                                          (str(MAX_STREAM_ID_PART), f"{MAX_STREAM_ID_PART}-0"), ("5-3", "5-3")])
def test_a_listing_starts_after_milliseconds_alone(given: str, start: str) -> None:
    """`dlq list --after 0` (every letter) and `--after <ms>` read as `<ms>-0`, as XRANGE reads them."""
    assert build_parser().parse_args(["dlq", "list", "--after", given]).after == start


@pytest.mark.parametrize("given", [str(MAX_STREAM_ID_PART + 1), "١", "1 ", "-1", "1.5", ""])
def test_a_listing_start_out_of_range_is_a_usage_error(given: str) -> None:
    usage_error(["dlq", "list", "--after", given])


@pytest.mark.parametrize("argv", ID_ARGUMENTS)
def test_ids_up_to_the_largest_are_taken(argv) -> None:  # type: ignore[no-untyped-def]
    for letter_id in ("0-0", "1718000000000-5", LARGEST_ID):
        build_parser().parse_args(argv(letter_id))


@pytest.mark.parametrize("limit", ["0", "-1", str(DLQ_LIST_MAX + 1), "99999999999999999999999", "١٠", "1e3", "5\n"])
def test_a_limit_out_of_range_is_a_usage_error(limit: str) -> None:
    usage_error(["dlq", "list", "--limit", limit])


def test_limits_within_the_bound_are_taken() -> None:
    for limit in (1, DLQ_LIST_MAX):
        assert build_parser().parse_args(["dlq", "list", "--limit", str(limit)]).limit == limit


# Command-line bytes that are not UTF-8 arrive as lone surrogates, which no client can send.
NOT_UTF8 = b"dev\xc3\xff".decode("utf-8", "surrogateescape")


@pytest.mark.parametrize("argv", [["rehydrate", NOT_UTF8], ["claim", "--from", NOT_UTF8]])
def test_text_that_is_not_utf8_is_a_usage_error(argv: list[str]) -> None:
    usage_error(argv)


def test_a_file_path_that_is_not_utf8_is_taken() -> None:
    """A path is bytes to the kernel: any name a file can have is a FILE argument."""
    assert str(build_parser().parse_args(["geofences", "import", f"/tmp/{NOT_UTF8}.json"]).file).endswith(".json")


@pytest.mark.parametrize(
    "argv",
    [
        ["dlq", "show", "99999999999999999999-0"],
        ["dlq", "show", "18446744073709551616-0"],
        ["dlq", "show", "1-1\n"],
        ["dlq", "show", "١-0"],
        ["dlq", "list", "--after", "99999999999999999999-0"],
        ["dlq", "list", "--limit", "99999999999999999999999"],
    ],
)
def test_cli_rejects_what_redis_would_refuse_with_exit_2(redis_env: dict[str, str], argv: list[str]) -> None:
    """The reproduced cases, whole: argparse's exit 2, not Redis' refusal (exit 1)."""
    result = run_cli(redis_env, *argv)
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "error: argument" in result.stderr


def test_list_after_the_largest_id_is_empty(redis_client: redis.Redis, stream_key: str, stream_settings: Settings) -> None:
    """Nothing follows the largest id; Redis refuses to start after it, the page is just empty."""
    add_letter(redis_client, stream_key, {b"data": fix("dev-1")})
    page = list_letters(stream_settings, 10, LARGEST_ID)
    assert (page.letters, page.length, page.more) == ([], 1, False)


def test_a_failures_field_of_other_digits_is_shown_as_written(
    redis_client: redis.Redis, stream_key: str, stream_settings: Settings
) -> None:
    """A letter anyone wrote may hold `failures` of '²': shown as text, not a crash of int()."""
    redis_client.xadd(f"{stream_key}:dlq", {"error": "x", "failures": "²", "data": fix("dev-1")})
    add_letter(redis_client, stream_key, {b"data": fix("dev-2")})
    summaries = [letter.summary() for letter in list_letters(stream_settings, 10).letters]
    assert [summary["failures"] for summary in summaries] == ["²", 5]


def test_a_device_id_starting_with_a_dash_is_explained(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse takes `rehydrate -abc` for an option; the usage error says how to give such an id."""
    usage_error(["rehydrate", "-abc"])
    assert "goes after '--': processor rehydrate -- -abc" in capsys.readouterr().err
    assert build_parser().parse_args(["rehydrate", "--", "-abc"]).device_id == "-abc"


def test_an_empty_consumer_to_claim_from_is_a_usage_error() -> None:
    """`claim --from ''` asked redis-py for the pending entries of consumer '', which it drops: every
    consumer's entries, live ones too, were claimed at idle 0."""
    usage_error(["claim", "--from", ""])
    assert build_parser().parse_args(["claim", "--from", " "]).from_consumer == " "


@pytest.mark.parametrize("argv", [
    ["dlq", "replay"], ["dlq", "replay", "--all", "1-0"], ["dlq", "purge", "--yes"], ["dlq", "purge", "--all"],
    ["dlq", "purge", "1-0"], ["dlq", "replay", *(f"{n}-0" for n in range(1, 10_002))],
])
def test_usage_errors_argparse_cannot_see_come_before_the_configuration(argv: list[str]) -> None:
    """docs/contract.md: a usage error exits 2 even with a bad environment. The selection of letters,
    the id count and a confirmation that cannot be asked (no terminal, no --yes) were checked only
    after the settings, so SHARDS=x made them 78."""
    result = run_cli({"SHARDS": "x"}, *argv)
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert result.stderr.startswith("processor: ") and "configuration" not in result.stderr
