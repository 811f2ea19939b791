"""How many entries a read asks for: BATCH_SIZE, fewer while entries are large.

Redis caps a read (XREADGROUP, or a claim) by entries only. With entries up to the 1 MiB
limit, a batch of 500 held 500 MiB, and a shard holds a few at once (one being read, one
queued, two being written). So each read asks for as many entries as READ_BUDGET_BYTES
holds at the size of the entries the read before it returned, and the first read for as
many as the budget holds at the limit. A stream that turns from small entries to large
ones can still fill one read (BATCH_SIZE entries); the read after it is small again.
"""

from __future__ import annotations

from shard.decode import MAX_ENTRY_BYTES
from shard.stream import Entry

READ_BUDGET_BYTES = 8 << 20


class ReadSize:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = max(1, min(limit, READ_BUDGET_BYTES // MAX_ENTRY_BYTES))

    def saw(self, entries: list[Entry]) -> None:
        """Size the next read from what this one returned (nothing: as before)."""
        if not entries:
            return
        size = sum(len(item) for _, fields in entries if fields for item in fields)
        self.count = max(1, min(self.limit, READ_BUDGET_BYTES * len(entries) // max(size, 1)))
