"""Reading a stream in bounded memory: each read sized by the bytes of the one before.

Redis caps a read by entries only (XRANGE, XREADGROUP, XCLAIM), and each entry comes with its
fields: up to the 1 MiB entry limit. A batch of 500 held 500 MiB, and a page of 1,000 a
gigabyte. So every reader asks for as many entries as PAGE_BUDGET_BYTES holds at the size of
the entries its last read returned (`ReadSize`), and first for as many as it holds at the
limit. A stream that turns from small entries to large ones can still fill one read; the read
after it is small again.
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


class ReadSize:
    """How many entries the next read asks for: at most `limit`, fewer while entries are large."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = min(limit, FIRST_PAGE)

    def saw(self, entries: Sequence[tuple[Any, Any]]) -> int:
        """Size the next read from what this one returned (nothing: as before); returns its bytes."""
        size = entries_bytes(entries)
        if entries:
            self.count = max(1, min(self.limit, PAGE_BUDGET_BYTES * len(entries) // max(size, 1)))
        return size


class Pages:
    """One direction of a stream, read page by page from `start` to `end` (ids as XRANGE takes them)."""

    def __init__(
        self, client: redis.Redis, stream: str, start: str, *, end: str | None = None, reverse: bool = False, most: int = 1_000
    ) -> None:
        self.client, self.stream, self.reverse = client, stream, reverse
        self.start = start
        self.end = end if end is not None else "-" if reverse else "+"
        self.size = ReadSize(most)
        self.done = False  # the last page was shorter than asked for: nothing lies beyond it

    def next(self, at_most: int | None = None) -> list[tuple[bytes, Any]]:
        asked = self.size.count if at_most is None else max(1, min(self.size.count, at_most))
        if self.reverse:
            page = self.client.xrevrange(self.stream, max=self.start, min=self.end, count=asked)
        else:
            page = self.client.xrange(self.stream, min=self.start, max=self.end, count=asked)
        self.done = len(page) < asked
        if page:
            last = page[-1][0]
            self.start = "(" + (last.decode("ascii") if isinstance(last, bytes) else last)
            self.size.saw(page)
        return page
