"""A batch as it moves through a shard: entries read, decoded, then written and settled."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import InvalidEntry
from shard.decode import Fix, decode_entry
from shard.stream import DeadLetter, Entry


@dataclass
class Batch:
    """What one read returned, sorted by what must happen to each entry."""

    ids: list[bytes]
    fixes: list[Fix] = field(default_factory=list)
    fix_ids: list[bytes] = field(default_factory=list)
    fields: dict[bytes, dict[bytes, bytes]] = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)
    gone: list[bytes] = field(default_factory=list)

    recovered: list[bytes] = field(default_factory=list)  # failed before, stored now

    def reject(self, rejected: dict[int, tuple[str, int]]) -> None:
        """Move rows that Postgres refused for good from the fixes to the dead letters."""
        for position, (error, failures) in sorted(rejected.items(), reverse=True):
            entry_id = self.fix_ids.pop(position)
            self.fixes.pop(position)
            self.dead.append(DeadLetter(entry_id, self.fields[entry_id], error, "write", failures))

    @property
    def acked(self) -> list[bytes]:
        return self.fix_ids + self.gone


def decode_batch(entries: list[Entry], max_failures: int) -> Batch:
    """Decode every entry; poison becomes a dead letter at once, since decoding is deterministic."""
    batch = Batch([entry_id for entry_id, _ in entries])
    for entry_id, fields in entries:
        if not fields:
            batch.gone.append(entry_id)  # deleted or trimmed while pending: nothing left to store
            continue
        try:
            batch.fixes.append(decode_entry(fields))
        except InvalidEntry as exc:
            batch.dead.append(DeadLetter(entry_id, fields, str(exc), exc.kind, max_failures))
            continue
        batch.fix_ids.append(entry_id)
        batch.fields[entry_id] = fields
    return batch
