"""`processor claim`: the command line of claiming stuck entries now (the work is `ops.claim.claim_now`)."""

from __future__ import annotations

import argparse
import sys

import redis

from common.config import Settings
from common.errors import ExitCode
from common.redis_client import text as decoded  # ops.arguments has a `text` too
from ops.arguments import bounded, name
from ops.errors import redis_client
from ops.terminal import emit, format_counts, printable

MAX_MIN_IDLE_MS = 100 * 365 * 86_400_000  # 100 years: any entry, and far below what Redis refuses (2**63)


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "claim",
        help="claim stuck entries now and process them",
        description="Claim entries pending in the group longer than --min-idle-ms and process them through "
        "the shards' path (store or dead-letter), then exit.",
    )
    parser.add_argument("--min-idle-ms", type=bounded(0, MAX_MIN_IDLE_MS), metavar="N",
                        help=f"claim entries idle at least N ms, 0 to {MAX_MIN_IDLE_MS} (100 years; "
                        "default: CLAIM_THRESHOLD_MS)")
    parser.add_argument("--from", dest="from_consumer", metavar="CONSUMER", type=name,
                        help="claim only this consumer's entries (default: every consumer's)")
    parser.add_argument("--json", action="store_true", help="print the counts as a JSON object")
    parser.set_defaults(func=cmd_claim)


def cmd_claim(settings: Settings, args: argparse.Namespace) -> int:
    from ops.claim import claim_now  # loads the shard's pipeline only for this command

    counts = claim_now(settings, args.min_idle_ms, args.from_consumer)
    emit(counts if args.json else [format_counts(counts)], args.json)
    if args.from_consumer is not None and not counts["claimed"]:
        _note_if_unknown(settings, args.from_consumer)
    return ExitCode.OK


def _note_if_unknown(settings: Settings, consumer: str) -> None:
    """Nothing claimed from a consumer the group does not know (a typo, say): say so on stderr."""
    with redis_client(settings.redis_url) as client:
        try:
            known = [decoded(c["name"]) for c in client.xinfo_consumers(settings.stream_key, settings.consumer_group)]
        except redis.ResponseError:
            return  # no stream or no group: the claim had nothing to look at either way
    if consumer not in known:
        shown = sorted(known)[:10]
        names = ", ".join(printable(name) for name in shown) or "none"
        if len(known) > len(shown):
            names += f" and {len(known) - len(shown)} more"
        print(f"processor: group {printable(settings.consumer_group)} has no consumer {printable(consumer)} "
              f"(its consumers: {names}); nothing claimed", file=sys.stderr)
