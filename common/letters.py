"""The dead-letter format (SPEC §5): what a DLQ entry holds, and how to read one back.

A dead letter's fields are, in this order:

1. the seven added fields, always first and always in this order: `error`,
   `error_kind`, `source_id`, `source_stream`, `failures`, `consumer`, `failed_at`;
2. then every field of the original entry, verbatim and in its order: names and values
   as bytes, repeated names repeated, names that equal an added field's kept as they are.

So the original entry is always "every pair after the seventh"; `dlq replay` re-adds
exactly those. Letters written before this format (the original fields first, the added
fields written over those of the same name) are still read: there the original fields
are those whose names are not added fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Lua passes at most about 8,000 values to one command (LUAI_MAXCSTACK): a script may
# write or replay a letter of up to this many values; larger ones go through WATCH/MULTI.
SCRIPT_MAX_VALUES = 7_000

ADDED_FIELDS = (b"error", b"error_kind", b"source_id", b"source_stream", b"failures", b"consumer", b"failed_at")
ADDED_COUNT = len(ADDED_FIELDS)


def letter_fields(added: Sequence[bytes | str | int], original: Sequence[bytes]) -> list[bytes | str | int]:
    """The flat field list of a letter: the added values (in ADDED_FIELDS order), then the
    original entry's flat [name, value, …] list unchanged."""
    assert len(added) == ADDED_COUNT
    head: list[bytes | str | int] = []
    for name, value in zip(ADDED_FIELDS, added):
        head += [name, value]
    return [*head, *original]


@dataclass(frozen=True)
class LetterParts:
    added: dict[bytes, bytes]  # the added fields by name
    original: list[bytes]  # the original entry's flat [name, value, …] list
    current_format: bool  # False: a letter of the earlier format


def split_letter(fields: Sequence[bytes]) -> LetterParts:
    """A letter's flat field list, split into its added fields and the original entry."""
    names = fields[0 : 2 * ADDED_COUNT : 2]
    if tuple(names) == ADDED_FIELDS:
        added = {fields[i]: fields[i + 1] for i in range(0, 2 * ADDED_COUNT, 2)}
        return LetterParts(added, list(fields[2 * ADDED_COUNT :]), True)
    added, original = {}, []
    for i in range(0, len(fields) - 1, 2):
        if fields[i] in ADDED_FIELDS:
            added[fields[i]] = fields[i + 1]
        else:
            original += [fields[i], fields[i + 1]]
    return LetterParts(added, original, False)
