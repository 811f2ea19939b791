"""How many entries a read asks for: BATCH_SIZE, fewer while entries are large.

Redis caps a read (XREADGROUP, or a claim) by entries only. With entries up to the 1 MiB
limit, a batch of 500 held 500 MiB, and a shard holds a few at once (one being read, one
queued, two being written). So each read asks for as many entries as 8 MiB holds at the
size of the entries the read before it returned, and the first read for as many as the
budget holds at the limit (common/stream_pages.py). A stream that turns from small entries to large
ones can still fill one read (BATCH_SIZE entries); the read after it is small again.
"""

from __future__ import annotations

from common.stream_pages import FIRST_PAGE, sized_count
from shard.stream import Entry


class ReadSize:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = min(limit, FIRST_PAGE)

    def saw(self, entries: list[Entry]) -> None:
        """Size the next read from what this one returned (nothing: as before)."""
        if entries:
            self.count = sized_count(entries, self.limit)
