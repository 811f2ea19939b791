"""Dead letters as the operator sees them: reading (`processor dlq list|show`) and the rules for letter ids.

A dead letter is an entry of DLQ_KEY: the original entry's fields plus the error fields
(SPEC §5). Replay and purge are in ops.dlq_replay and ops.dlq_purge.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from common.config import Settings
from common.errors import ProcessorError
from common.keys import DATA_FIELD, DLQ_ERROR_FIELDS
from ops.errors import UsageError, redis_client
from ops.terminal import cell, is_utf8, printable, table_lines, text

DLQ_LIST_DEFAULT = 20
MAX_IDS = 10_000  # explicit ids per command, checked and written in one script call
ERROR_COLUMN_CHARS = 60

_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


class UnknownLetters(ProcessorError):
    """Some ids name no dead letter; nothing was changed."""

    def __init__(self, dlq: str, ids: Sequence[str], action: str, extra: str = "") -> None:
        noun = "dead letter" if len(ids) == 1 else "dead letters"
        shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
        super().__init__(f"no {noun} with id {shown} in {dlq}{extra}; nothing was {action}")
        self.ids = list(ids)


def check_entry_id(value: str) -> str:
    """A complete stream id `<ms>-<seq>`; raises ValueError otherwise (argparse turns it into exit 2)."""
    if not _STREAM_ID.match(value):
        raise ValueError(f"not a stream entry id (<milliseconds>-<sequence>, e.g. 1718000000000-0): {value!r}")
    return value


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
    """One dead letter: the original entry's fields plus the error fields (SPEC §5)."""

    id: str
    fields: dict[bytes, bytes]

    def get(self, name: str) -> str | None:
        value = self.fields.get(name.encode())
        return None if value is None else text(value)

    @property
    def original(self) -> dict[bytes, bytes]:
        """The fields as the entry had them in the input stream."""
        return {k: v for k, v in self.fields.items() if k.decode("utf-8", "replace") not in DLQ_ERROR_FIELDS}

    @property
    def data(self) -> object | None:
        """The parsed `data` field, or None when it is missing or not JSON."""
        raw = self.fields.get(DATA_FIELD)
        if raw is None:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None

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
            "failures": int(failures) if failures and failures.isdigit() else failures,
            "consumer": self.get("consumer"),
            "device_id": self.device_id,
            "error": self.get("error"),
        }

    def as_json(self) -> dict[str, object]:
        """Every field as text; values that are not UTF-8 also exactly, base64-encoded."""
        binary = {text(k): base64.b64encode(v).decode() for k, v in self.fields.items() if not is_utf8(v)}
        return {"id": self.id, "fields": {text(k): text(v) for k, v in self.fields.items()},
                "fields_base64": binary, "data": self.data}


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
        entries = client.xrange(settings.dlq_key, min=start, max="+", count=limit + 1)
        length = int(client.xlen(settings.dlq_key))
    letters = [Letter(text(i), dict(f)) for i, f in entries[:limit]]
    return LetterPage(settings.dlq_key, length, letters, len(entries) > limit)


def show_letter(settings: Settings, letter_id: str) -> Letter:
    with redis_client(settings.redis_url) as client:
        found = client.xrange(settings.dlq_key, min=letter_id, max=letter_id)
    if not found:
        raise UnknownLetters(settings.dlq_key, [letter_id], "shown")
    return Letter(letter_id, dict(found[0][1]))


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
    """Error fields first, then the original fields; `data` pretty-printed when it is JSON."""
    lines = [f"dead letter {letter.id}"]
    names = [n for n in DLQ_ERROR_FIELDS if n.encode() in letter.fields]
    width = max(len(n) for n in [*DLQ_ERROR_FIELDS, "data"]) + 2
    for name in names:
        lines.append(f"  {name.ljust(width)}{printable(letter.get(name) or '')}")
    lines.append("original fields:")
    for raw_name, raw_value in letter.original.items():
        name = printable(text(raw_name))
        data = letter.data if raw_name == DATA_FIELD else None
        if data is not None:
            pretty = orjson.dumps(data, option=orjson.OPT_INDENT_2).decode().splitlines()
            lines.append(f"  {name.ljust(width)}(JSON)")
            lines += [f"    {printable(line)}" for line in pretty]
        else:
            lines.append(f"  {name.ljust(width)}{printable(text(raw_value))}")
    if not letter.original:
        lines.append("  (none)")
    return lines
