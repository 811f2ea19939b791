"""`processor claim`: the command line of claiming stuck entries now (the work is `ops.claim.claim_now`)."""

from __future__ import annotations

import argparse

from common.config import Settings
from common.errors import ExitCode
from ops.terminal import emit, format_counts


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "claim",
        help="claim stuck entries now and process them",
        description="Claim entries pending in the group longer than --min-idle-ms and process them through "
        "the shards' path (store or dead-letter), then exit.",
    )
    parser.add_argument("--min-idle-ms", type=_non_negative, metavar="N",
                        help="claim entries idle at least N ms (default: CLAIM_THRESHOLD_MS)")
    parser.add_argument("--from", dest="from_consumer", metavar="CONSUMER",
                        help="claim only this consumer's entries (default: every consumer's)")
    parser.add_argument("--json", action="store_true", help="print the counts as a JSON object")
    parser.set_defaults(func=cmd_claim)


def cmd_claim(settings: Settings, args: argparse.Namespace) -> int:
    from ops.claim import claim_now  # loads the shard's pipeline only for this command

    counts = claim_now(settings, args.min_idle_ms, args.from_consumer)
    emit(counts if args.json else [format_counts(counts)], args.json)
    return ExitCode.OK


def _non_negative(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"a whole number of at least 0 expected, got {value!r}")
    return int(value)
