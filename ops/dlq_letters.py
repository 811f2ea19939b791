"""Dead letters as the operator sees them: reading (`processor dlq list|show`) and the rules for letter ids.

A dead letter is an entry of DLQ_KEY: the added (error) fields, then the original entry's
fields verbatim (SPEC §5; the format is common/letters.py's). Letters are read as flat field
lists (ops.errors' client keeps repeated names). Replay and purge are in ops.dlq_replay and
ops.dlq_purge.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import orjson

from common.config import Settings
from common.errors import ProcessorError
from common.keys import DATA_FIELD, DLQ_ERROR_FIELDS
from common.letters import LetterParts, split_letter
from common.redis_client import text
from ops.arguments import MAX_STREAM_ID_PART, whole_number
from ops.errors import UsageError, redis_client
from ops.terminal import cell, is_utf8, printable, table_lines

DLQ_LIST_DEFAULT = 20
DLQ_LIST_MAX = 100_000  # read in one XRANGE and held in memory; more pages on with --after
MAX_IDS = 10_000  # explicit ids per command, checked and written in one script call
ERROR_COLUMN_CHARS = 60


class UnknownLetters(ProcessorError):
    """Some ids name no dead letter; nothing was changed."""

    def __init__(self, dlq: str, ids: Sequence[str], action: str, extra: str = "") -> None:
        noun = "dead letter" if len(ids) == 1 else "dead letters"
        shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
        super().__init__(f"no {noun} with id {shown} in {dlq}{extra}; nothing was {action}")
        self.ids = list(ids)


def checked_ids(ids: Sequence[str]) -> list[str]:
    """The ids without repeats; at most MAX_IDS, as one script call checks and writes them all."""
    unique = list(dict.fromkeys(ids))
    if not unique:
        raise UsageError("no dead-letter ids given")
    if len(unique) > MAX_IDS:
        raise UsageError(f"at most {MAX_IDS} ids at once; use --all or several runs")
    return unique


@dataclass(frozen=True)
class Letter:
    """One dead letter (SPEC §5): its added fields, and the original entry's fields verbatim.

    `fields` is the letter as Redis holds it, a flat [name, value, …] list; common/letters.py
    says which of them are the added fields and which the original entry's (names may repeat,
    and may equal an added field's).
    """

    id: str
    fields: list[bytes]

    @cached_property
    def parts(self) -> LetterParts:
        return split_letter(self.fields)

    @property
    def added(self) -> dict[bytes, bytes]:
        return self.parts.added

    @property
    def original(self) -> list[tuple[bytes, bytes]]:
        """The original entry's fields in order, as (name, value) pairs: the entry `dlq replay` re-adds."""
        flat = self.parts.original
        return list(zip(flat[0::2], flat[1::2]))

    def get(self, name: str) -> str | None:
        """An added field as text (None when the letter lacks it)."""
        value = self.added.get(name.encode())
        return None if value is None else text(value)

    @property
    def data(self) -> object | None:
        """The first original `data` field parsed, or None when there is none or it is not JSON."""
        raw = next((value for name, value in self.original if name == DATA_FIELD), None)
        return None if raw is None else parsed(raw)

    @property
    def device_id(self) -> str | None:
        data = self.data
        device_id = data.get("device_id") if isinstance(data, dict) else None
        return device_id if isinstance(device_id, str) else None

    def summary(self) -> dict[str, object]:
        failures = self.get("failures")
        return {
            "id": self.id,
            "failed_at": self.get("failed_at"),
            "error_kind": self.get("error_kind"),
            "source_id": self.get("source_id"),
            "source_stream": self.get("source_stream"),
            "failures": _count(failures),
            "consumer": self.get("consumer"),
            "device_id": self.device_id,
            "error": self.get("error"),
        }

    def as_json(self) -> dict[str, object]:
        """The added fields by name, the original fields as ordered pairs; all as text, and
        what is not UTF-8 also exactly, in base64 (docs/contract.md, `dlq show`)."""
        binary = {text(k): _base64(v) for k, v in self.added.items() if not is_utf8(v)}
        exact = [None if is_utf8(k) and is_utf8(v) else [_base64(k), _base64(v)] for k, v in self.original]
        return {
            "id": self.id,
            "format": "current" if self.parts.current_format else "earlier",
            "fields": {text(k): text(v) for k, v in self.added.items()},
            "fields_base64": binary,
            "original": [[text(k), text(v)] for k, v in self.original],
            "original_base64": exact,
            "data": self.data,
        }


def parsed(raw: bytes) -> object | None:
    """A field's value as JSON, or None when it is not JSON or too deep to print again
    (orjson reads deeper than it writes: such a letter is shown as raw text)."""
    try:
        value = orjson.loads(raw)
        orjson.dumps(value)
    except (orjson.JSONDecodeError, TypeError):
        return None
    return value


def _is_last_id(entry_id: str) -> bool:
    return all(int(part) == MAX_STREAM_ID_PART for part in entry_id.split("-"))


def _count(value: str | None) -> int | str | None:
    """A letter's `failures` as a number, or as written when it is not one (a letter anyone may have added)."""
    number = None if value is None else whole_number(value, MAX_STREAM_ID_PART)
    return value if number is None else number


def _base64(value: bytes) -> str:
    return base64.b64encode(value).decode()


@dataclass(frozen=True)
class LetterPage:
    dlq: str
    length: int
    letters: list[Letter]
    more: bool  # letters follow the last one listed

    def as_json(self) -> dict[str, object]:
        return {
            "dlq": self.dlq,
            "length": self.length,
            "letters": [letter.summary() for letter in self.letters],
            "next_after": self.letters[-1].id if self.more else None,
        }


def list_letters(settings: Settings, limit: int, after: str | None = None) -> LetterPage:
    """Up to `limit` dead letters, oldest first, after the id `after` (exclusive) if given."""
    with redis_client(settings.redis_url) as client:
        start = f"({after}" if after else "-"
        entries = []  # after the largest id: nothing can follow it, and Redis refuses to start there
        if not (after and _is_last_id(after)):
            entries = client.xrange(settings.dlq_key, min=start, max="+", count=limit + 1)
        length = int(client.xlen(settings.dlq_key))
    letters = [Letter(text(i), f) for i, f in entries[:limit]]
    return LetterPage(settings.dlq_key, length, letters, len(entries) > limit)


def show_letter(settings: Settings, letter_id: str) -> Letter:
    with redis_client(settings.redis_url) as client:
        found = client.xrange(settings.dlq_key, min=letter_id, max=letter_id)
    if not found:
        raise UnknownLetters(settings.dlq_key, [letter_id], "shown")
    return Letter(letter_id, found[0][1])


def format_letter_page(page: LetterPage) -> list[str]:
    if not page.letters:
        return [f"{page.dlq}: no dead letters" + (" after that id" if page.length else "")]
    table = [("ID", "FAILED_AT", "KIND", "SOURCE_ID", "DEVICE_ID", "ERROR")]
    for letter in page.letters:
        table.append((
            letter.id,
            cell(letter.get("failed_at")),
            cell(letter.get("error_kind")),
            cell(letter.get("source_id")),
            cell(letter.device_id),
            cell(letter.get("error"), ERROR_COLUMN_CHARS),
        ))
    shown = f"{len(page.letters)} of {page.length} dead letters in {page.dlq}, oldest first"
    more = f"; next page: --after {page.letters[-1].id}" if page.more else ""
    return [*table_lines(table), f"({shown}{more})"]


def format_letter(letter: Letter) -> list[str]:
    """The added fields, then every original field in order (repeats and names equal to an
    added field's included); a `data` field that is JSON pretty-printed."""
    lines = [f"dead letter {letter.id}"]
    width = max(len(n) for n in [*DLQ_ERROR_FIELDS, "data"]) + 2
    for name in DLQ_ERROR_FIELDS:
        value = letter.get(name)
        if value is not None:
            lines.append(f"  {_label(name, width)}{printable(value)}")
    heading = f"original fields ({len(letter.original)}, in order)"
    if not letter.parts.current_format:
        heading += "; a letter of the earlier format, where a field named like an added one was overwritten"
    lines.append(f"{heading}:")
    for raw_name, raw_value in letter.original:
        label = _label(printable(text(raw_name)), width)
        data = parsed(raw_value) if raw_name == DATA_FIELD else None
        if data is not None:
            pretty = orjson.dumps(data, option=orjson.OPT_INDENT_2).decode().splitlines()
            lines.append(f"  {label}(JSON)")
            lines += [f"    {printable(line)}" for line in pretty]
        else:
            lines.append(f"  {label}{printable(text(raw_value))}")
    if not letter.original:
        lines.append("  (none)")
    return lines


def _label(name: str, width: int) -> str:
    """A field name padded to `width`, and at least one space after a longer one."""
    return name.ljust(width - 1) + " "
