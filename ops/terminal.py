"""Text for the operator's terminal (tables, durations, counts, escaped data) and the confirmation prompt."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TextIO

import orjson

from common.errors import ProcessorError
from ops.errors import UsageError

CELL_CHARS = 40

Confirm = Callable[[str], bool]


# --- output ---------------------------------------------------------------------------


def emit(output: object, as_json: bool) -> None:
    """Print `output` as one JSON document, or (a list of lines) as text."""
    if as_json:
        print(orjson.dumps(output).decode())
    else:
        assert isinstance(output, list)
        print("\n".join(output))


def table_lines(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Rows as left-aligned columns two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def format_counts(counts: dict[str, object]) -> str:
    """`claimed 3, stored 2, dead lettered 1, gone 0` from a dict of counts."""
    return ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in counts.items())


def format_ms(ms: int) -> str:
    """A duration for people: 850ms, 12.3s, 4m05s, 2h03m, 3d04h."""
    if ms < 1_000:
        return f"{ms}ms"
    seconds = ms / 1_000
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def count(n: int, one: str, many: str) -> str:
    """`1 entry`, `2 entries`."""
    return f"{n} {one if n == 1 else many}"


# --- data from Redis ------------------------------------------------------------------


def is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def printable(value: str) -> str:
    """Control and other unprintable characters escaped, so data cannot drive the terminal."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in value)


def cell(value: str | None, width: int = CELL_CHARS) -> str:
    """A table cell: escaped, shortened to `width` with an ellipsis, `-` when empty."""
    if value is None or value == "":
        return "-"
    value = printable(value)
    return value if len(value) <= width else value[: width - 1] + "…"


# --- confirmation ---------------------------------------------------------------------


class ConfirmationRequired(UsageError):
    """A destructive command without --yes, and no terminal to ask on (exit 2)."""


class Declined(ProcessorError):
    """The operator answered no (exit 1)."""


def confirmer(assume_yes: bool, stdin: TextIO | None, stderr: TextIO | None, verb: str = "delete") -> Confirm:
    """Ask on the terminal; --yes skips the question; without a terminal and --yes, refuse (exit 2).

    A closed stdin (Python then has None) is no terminal; nor is a closed stderr, where the
    question could not be shown."""
    if assume_yes:
        return lambda _question: True
    if stdin is None or stderr is None or not is_terminal(stdin):
        raise ConfirmationRequired(f"refusing to {verb} without confirmation: stdin is not a terminal; pass --yes")

    def ask(question: str) -> bool:
        stderr.write(f"{question} [y/N] ")
        stderr.flush()
        return stdin.readline().strip().lower() in ("y", "yes")

    return ask


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is a terminal; a closed one is not."""
    try:
        return stream.isatty()
    except ValueError:  # closed
        return False
