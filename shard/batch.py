"""A batch as it moves through a shard: entries read, decoded, then written and settled.

Everything about an entry is keyed by its stream id, so no two lists have to stay in step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from common.errors import InvalidEntry
from shard.decode import Fix, decode_entry
from shard.stream import DeadLetter, Entry


@dataclass
class Batch:
    """What one read (or claim) returned, sorted by what must happen to each entry."""

    ids: list[bytes]  # every entry, in stream order
    fixes: dict[bytes, Fix] = field(default_factory=dict)  # to store, in stream order
    fields: dict[bytes, dict[bytes, bytes]] = field(default_factory=dict)  # originals, for a dead letter
    dead: list[DeadLetter] = field(default_factory=list)
    gone: list[bytes] = field(default_factory=list)  # deleted or trimmed while pending
    recovered: list[bytes] = field(default_factory=list)  # failed before, stored now
    started: float = field(default_factory=time.monotonic)

    def reject(self, entry_id: bytes, error: str, failures: int) -> None:
        """A row Postgres refused for good: the entry becomes a dead letter instead of a fix."""
        del self.fixes[entry_id]
        self.dead.append(DeadLetter(entry_id, self.fields[entry_id], error, "write", failures))

    @property
    def acked(self) -> list[bytes]:
        """Entries whose effects are committed (or that have nothing left to store)."""
        return [*self.fixes, *self.gone]


def decode_batch(entries: list[Entry], max_failures: int) -> Batch:
    """Decode every entry; poison becomes a dead letter at once, since decoding is deterministic."""
    batch = Batch([entry_id for entry_id, _ in entries])
    for entry_id, fields in entries:
        if not fields:
            batch.gone.append(entry_id)
            continue
        try:
            fix = decode_entry(fields)
        except InvalidEntry as exc:
            batch.dead.append(DeadLetter(entry_id, fields, str(exc), exc.kind, max_failures))
            continue
        batch.fixes[entry_id] = fix
        batch.fields[entry_id] = fields
    return batch
