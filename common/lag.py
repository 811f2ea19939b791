"""The consumer group's lag: entries of the stream not yet delivered to any consumer.

The supervisor's /metrics and `processor lag` both report it, so it is computed here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from common.stream_pages import Pages

# Counting undelivered entries when Redis cannot report the lag: the most entries a page asks for
# (fewer while entries are large: common/stream_pages.py), and how many we read at most before
# settling for a lower bound.
LAG_COUNT_PAGE = 1_000
LAG_COUNT_LIMIT = 200_000


@dataclass(frozen=True)
class Lag:
    """Entries in the stream after the group's last-delivered-id (not yet delivered to anyone)."""

    count: int
    exact: bool  # False: `count` is a lower bound (counting stopped at LAG_COUNT_LIMIT)
    source: str  # "redis" (XINFO GROUPS), "counted" (Redis said nil), "no-group"


def group_lag(
    client: redis.Redis, stream: str, group: dict[str, Any], limit: int = LAG_COUNT_LIMIT, page_size: int = LAG_COUNT_PAGE
) -> Lag:
    """The group's lag from XINFO GROUPS (checked: `_checked`), or counted when Redis reports it as nil.

    Redis (7.0+) returns a nil lag when it cannot derive it from its counters: after XDEL or
    XTRIM left a deleted id beyond the group's last-delivered-id, `entries-added` still
    counts the deleted entries, so `entries-added - entries-read` would overstate the lag
    (and `entries-read` itself may be nil); we therefore do not use that arithmetic. Instead
    we count the entries after last-delivered-id with XRANGE, and at the same time the
    entries up to it with XREVRANGE, page by page; whichever side ends first gives the
    answer (directly, or as XLEN minus the delivered part). So the work is bounded by the
    smaller side, never by the whole stream, and by `limit` entries in all; past that the
    forward count is reported as a lower bound. Entries added while counting may be counted
    too: the number is a snapshot, like Redis' own.
    """
    last_delivered = _entry_id(group["last-delivered-id"])
    if group.get("lag") is not None:
        return _checked(client, stream, last_delivered, int(group["lag"]), page_size)
    length = int(client.xlen(stream))
    after, upto = 0, 0
    forward = Pages(client, stream, f"({last_delivered}", most=page_size)
    backward = Pages(client, stream, last_delivered, reverse=True, most=page_size)
    while after + upto < limit:
        after += len(forward.next())
        if forward.done:
            return Lag(after, True, "counted")
        upto += len(backward.next())
        if backward.done:
            return Lag(max(length - upto, 0), True, "counted")
    return Lag(after, False, "counted")


def _checked(client: redis.Redis, stream: str, last_delivered: str, reported: int, page_size: int) -> Lag:
    """Redis' lag, corrected where it overstates.

    Redis 7.0 reports `entries-added - entries-read` even after a trim (MAXLEN, MINID) removed
    entries no consumer had read: those stay in its lag for ever, though nothing is left to
    deliver. It never understates, so a small lag is checked by reading what lies after
    last-delivered-id (up to a page's worth), and a larger one is capped by what the stream holds.
    """
    if reported == 0:
        return Lag(0, True, "redis")
    wanted = min(reported, page_size)
    pages = Pages(client, stream, f"({last_delivered}", most=wanted)
    seen = 0
    while seen < wanted:
        seen += len(pages.next(at_most=wanted - seen))
        if pages.done:
            return Lag(seen, True, "redis")
    return Lag(min(reported, int(client.xlen(stream))), True, "redis")


def _entry_id(value: bytes | str) -> str:
    """A stream entry id (always ASCII digits and a dash) as text."""
    return value.decode("ascii") if isinstance(value, bytes) else value
