"""`processor dlq list|show|replay|purge`: the command line of the dead-letter stream.

The work is in ops.dlq_letters (reading), ops.dlq_replay and ops.dlq_purge; here the
arguments are parsed and the results printed.
"""

from __future__ import annotations

import argparse
import sys

from common.config import Settings
from common.errors import ExitCode
from ops import dlq_purge, dlq_replay
from ops.arguments import bounded, position_after, stream_id
from ops.dlq_letters import (
    DLQ_LIST_DEFAULT, DLQ_LIST_MAX, checked_ids, format_letter, format_letter_page, list_letters, show_letter,
)
from ops.errors import UsageError
from ops.terminal import confirmer, emit


def add_commands(commands: argparse._SubParsersAction) -> None:
    dlq = commands.add_parser(
        "dlq",
        help="inspect, re-inject into the input stream, delete dead letters",
        description="Dead letters are entries of DLQ_KEY: the added fields error, error_kind, source_id, "
        "source_stream, failures, consumer and failed_at, then every field of the original entry verbatim.",
    )
    actions = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    show_list = actions.add_parser(
        "list",
        help="list dead letters, oldest first",
        description="List dead letters, oldest first: id, failed_at, error_kind, source_id, the device_id "
        "(when `data` parses) and the error (shortened; --json gives it whole).",
    )
    show_list.add_argument("--limit", type=bounded(1, DLQ_LIST_MAX), default=DLQ_LIST_DEFAULT, metavar="N",
                           help=f"list at most N letters, 1 to {DLQ_LIST_MAX} (default {DLQ_LIST_DEFAULT})")
    show_list.add_argument("--after", type=position_after, metavar="ID",
                           help="start after this letter id (next page); <milliseconds> alone means <milliseconds>-0")
    show_list.add_argument("--json", action="store_true", help="print a JSON object")
    show_list.set_defaults(func=cmd_list)
    show = actions.add_parser(
        "show",
        help="show every field of one dead letter",
        description="Show one dead letter: its added fields, then every original field in order (repeated "
        "names too); `data` pretty-printed when it is JSON. Control characters and bytes that are not UTF-8 "
        "are shown escaped (--json adds their exact bytes in base64).",
    )
    show.add_argument("letter_id", metavar="ID", type=stream_id, help="the letter's id in DLQ_KEY")
    show.add_argument("--json", action="store_true", help="print a JSON object")
    show.set_defaults(func=cmd_show)
    replay = actions.add_parser(
        "replay",
        help="put dead letters back into the input stream",
        description="Re-add each letter's original entry, field for field, to STREAM_KEY as a new "
        "entry and delete the letter, atomically per letter. Named letters are all-or-nothing: if any id is "
        "unknown, or a letter came from a stream other than STREAM_KEY, nothing is replayed (exit 1). --all "
        "replays every letter present when the command starts and leaves those of other streams.",
    )
    _add_letter_selection(replay, "replay")
    replay.add_argument("--json", action="store_true", help="print a JSON object")
    replay.set_defaults(func=cmd_replay, check=_check_replay)
    purge = actions.add_parser(
        "purge",
        help="delete dead letters",
        description="Delete dead letters. Named letters are all-or-nothing: if any id is unknown nothing is "
        "deleted (exit 1). --all deletes every letter present when asked. Asks for confirmation on a "
        "terminal; without a terminal it needs --yes (else exit 2).",
    )
    _add_letter_selection(purge, "delete")
    purge.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    purge.add_argument("--json", action="store_true", help="print a JSON object")
    purge.set_defaults(func=cmd_purge, check=_check_purge)


def _add_letter_selection(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("letter_ids", metavar="ID", nargs="*", type=stream_id, help=f"letter ids to {verb}")
    parser.add_argument("--all", action="store_true", help=f"{verb} every dead letter")


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    page = list_letters(settings, args.limit, args.after)
    emit(page.as_json() if args.json else format_letter_page(page), args.json)
    return ExitCode.OK


def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    letter = show_letter(settings, args.letter_id)
    emit(letter.as_json() if args.json else format_letter(letter), args.json)
    return ExitCode.OK


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    if args.all:
        result = dlq_replay.replay_all(settings)
    else:
        result = dlq_replay.replay(settings, args.letter_ids)
    emit(result.as_json() if args.json else dlq_replay.format_replay(result), args.json)
    problem = result.problem()
    if problem:
        print(f"processor: {problem}", file=sys.stderr)
        return ExitCode.FAILED
    return ExitCode.OK


def cmd_purge(settings: Settings, args: argparse.Namespace) -> int:
    confirm = confirmer(args.yes, sys.stdin, sys.stderr)
    if args.all:
        result = dlq_purge.purge_all(settings, confirm)
    else:
        result = dlq_purge.purge(settings, args.letter_ids, confirm)
    emit(result.as_json() if args.json else dlq_purge.format_purge(result), args.json)
    return ExitCode.OK


def _check_selection(args: argparse.Namespace, verb: str) -> None:
    if bool(args.letter_ids) == args.all:
        raise UsageError(f"dlq {verb}: give one or more letter IDs, or --all (not both)")
    if args.letter_ids:
        checked_ids(args.letter_ids)


def _check_replay(args: argparse.Namespace) -> None:
    """The usage checks of `dlq replay`, made before the configuration is read."""
    _check_selection(args, "replay")


def _check_purge(args: argparse.Namespace) -> None:
    """The usage checks of `dlq purge`, a confirmation that cannot be asked included."""
    _check_selection(args, "purge")
    confirmer(args.yes, sys.stdin, sys.stderr)
