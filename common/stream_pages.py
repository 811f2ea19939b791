"""Reading a stream page by page in bounded memory.

Redis caps a read by entries only (XRANGE, XREADGROUP, XCLAIM), and each entry comes with its
fields: up to the 1 MiB entry limit. A page of 1,000 entries may hold a gigabyte. So a reader
sizes each page from the entries of the page before (`sized_count`), and starts small.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

PAGE_BUDGET_BYTES = 8 << 20
FIRST_PAGE = 8  # the budget at the entry limit: no page can hold much more than it


def entries_bytes(entries: Sequence[tuple[Any, Any]]) -> int:
    """The bytes of the entries' field names and values: fields as a flat [name, value, ...] list (the
    shards' client) or a dict (redis-py's own); a deleted entry's are None."""
    return sum(
        sum(len(name) + len(value) for name, value in fields.items()) if type(fields) is dict else sum(map(len, fields))
        for _, fields in entries
        if fields
    )


def sized_count(entries: Sequence[tuple[Any, Any]], most: int, budget: int = PAGE_BUDGET_BYTES) -> int:
    """How many entries the next read may ask for: as many as `budget` holds at the size of
    `entries`, between 1 and `most`."""
    return max(1, min(most, budget * len(entries) // max(entries_bytes(entries), 1)))


class Pages:
    """One direction of a stream, read page by page from `start` to `end` (ids as XRANGE takes them)."""

    def __init__(
        self, client: redis.Redis, stream: str, start: str, *, end: str | None = None, reverse: bool = False, most: int = 1_000
    ) -> None:
        self.client, self.stream, self.reverse, self.most = client, stream, reverse, most
        self.start = start
        self.end = end if end is not None else "-" if reverse else "+"
        self.count = min(most, FIRST_PAGE)
        self.done = False  # the last page was shorter than asked for: nothing lies beyond it

    def next(self, at_most: int | None = None) -> list[tuple[bytes, Any]]:
        asked = self.count if at_most is None else max(1, min(self.count, at_most))
        if self.reverse:
            page = self.client.xrevrange(self.stream, max=self.start, min=self.end, count=asked)
        else:
            page = self.client.xrange(self.stream, min=self.start, max=self.end, count=asked)
        self.done = len(page) < asked
        if page:
            last = page[-1][0]
            self.start = "(" + (last.decode("ascii") if isinstance(last, bytes) else last)
            self.count = sized_count(page, self.most)
        return page
