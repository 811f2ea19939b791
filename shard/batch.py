"""A batch as it moves through a shard: entries read, decoded, then written and settled.

Everything about an entry is keyed by its stream id, so no two lists have to stay in step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from common.errors import InvalidEntry
from common.faults import one_line
from shard.dead_letters import DeadLetter
from shard.decode import Fix, decode_entry
from shard.stream import Entry

log = logging.getLogger("processor.shard")


@dataclass
class Batch:
    """What one read (or claim) returned, sorted by what must happen to each entry."""

    ids: list[bytes]  # every entry, in stream order
    fixes: dict[bytes, Fix] = field(default_factory=dict)  # to store, in stream order
    fields: dict[bytes, list[bytes]] = field(default_factory=dict)  # originals, for a dead letter
    dead: list[DeadLetter] = field(default_factory=list)
    gone: list[bytes] = field(default_factory=list)  # deleted or trimmed while pending
    recovered: list[bytes] = field(default_factory=list)  # failed before, stored now
    expired: dict[bytes, Fix] = field(default_factory=dict)  # older than the retention horizon: not stored
    horizon: datetime | None = None  # the horizon they were judged by
    started: float = field(default_factory=time.monotonic)
    size_bytes: int = 0  # of the entries' fields, as read (shard/intake.py bounds a waiting batch by it)

    def absorb(self, later: Batch) -> None:
        """Take in the entries of a batch read after this one, while this one waits to be written
        (shard/intake.py)."""
        self.ids.extend(later.ids)
        self.fixes.update(later.fixes)
        self.fields.update(later.fields)
        self.dead.extend(later.dead)
        self.gone.extend(later.gone)
        self.size_bytes += later.size_bytes

    def expire(self, horizon: datetime) -> None:
        """Fixes dated before `horizon` leave the batch: acknowledged, never stored, no derived state."""
        self.horizon = horizon
        for entry_id, fix in list(self.fixes.items()):
            if fix.ts < horizon:
                self.expired[entry_id] = self.fixes.pop(entry_id)

    def reject(self, entry_id: bytes, error: str, failures: int) -> None:
        """A row Postgres refused for good: the entry becomes a dead letter instead of a fix."""
        del self.fixes[entry_id]
        self.dead.append(DeadLetter(entry_id, self.fields[entry_id], error, "write", failures))

    @property
    def acked(self) -> list[bytes]:
        """Entries whose effects are committed, or that are expired; `gone` ones are acknowledged apart, and counted as lost."""
        return [*self.fixes, *self.expired]


def decode_batch(entries: list[Entry], max_failures: int, max_future_s: float, now: float | None = None) -> Batch:
    """Decode every entry; poison becomes a dead letter at once, since decoding is deterministic.

    Any exception one entry causes is that entry's failure, never the shard's: an
    unexpected one (a bug that only this entry's bytes reach) dead-letters the entry as
    `validate` and is logged with its traceback. `now` (epoch seconds) is the clock that
    MAX_FUTURE_S counts from.
    """
    not_after = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc) + timedelta(seconds=max_future_s)
    batch = Batch([entry_id for entry_id, _ in entries])
    for entry_id, fields in entries:
        if not fields:
            batch.gone.append(entry_id)
            continue
        if isinstance(fields, dict):  # from a client that merges fields into a dict
            fields = [item for pair in fields.items() for item in pair]
        try:
            fix = decode_entry(fields, not_after)
        except InvalidEntry as exc:
            batch.dead.append(DeadLetter(entry_id, fields, str(exc), exc.kind, max_failures))
            continue
        except Exception as exc:
            log.error("entry could not be validated", extra={"source_id": entry_id.decode()}, exc_info=True)
            error = f"entry could not be validated: {type(exc).__name__}: {one_line(exc)}"
            batch.dead.append(DeadLetter(entry_id, fields, error, "validate", max_failures))
            continue
        batch.fixes[entry_id] = fix
        batch.fields[entry_id] = fields
    return batch
