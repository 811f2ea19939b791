"""The argparse types of the operator commands' ids and numbers: one rule for all of them.

A value that breaks the rule is a usage error (exit 2) before anything reaches a server;
else Redis would refuse it (exit 1) or take it in some way nobody asked for.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

# ASCII only: str.isdigit(), int() and a regular expression's \d also take other scripts' digits (١).
_DIGITS = re.compile(r"[0-9]+")
_STREAM_ID = re.compile(r"([0-9]+)-([0-9]+)")
MAX_STREAM_ID_PART = 2**64 - 1  # Redis keeps both parts of a stream id as unsigned 64-bit numbers


def whole_number(text: str, high: int) -> int | None:
    """`text` as a number from 0 to `high`, or None when it is anything else."""
    # The length first, with room for some leading zeros: int() of thousands of digits is
    # slow, and refused beyond 4300 (a ValueError that argparse would word as its own).
    if len(text) > len(str(high)) + 20 or not _DIGITS.fullmatch(text):
        return None
    number = int(text)
    return number if number <= high else None


def bounded(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high`."""

    def parse(value: str) -> int:
        number = whole_number(value, high)
        if number is None or number < low:
            raise argparse.ArgumentTypeError(f"a whole number from {low} to {high} expected, got {value!r}")
        return number

    return parse


def text(value: str) -> str:
    """An argparse type: text that a server can be sent.

    Bytes of the command line that are not UTF-8 reach Python as lone surrogates
    (surrogateescape), which no client can encode; a file path may hold them, a name may not.
    """
    try:
        value.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"not valid UTF-8: {value!r}") from None
    return value


def name(value: str) -> str:
    """An argparse type: a non-empty `text` (an empty consumer name reads as "no name" to redis-py,
    which then asks for every consumer's entries)."""
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return text(value)


def position_after(value: str) -> str:
    """An argparse type: where a listing starts, after a complete id or after `<ms>` alone
    (as `<ms>-0`, the way XRANGE reads it; `--after 0` is every entry but 0-0, which Redis never issues)."""
    if whole_number(value, MAX_STREAM_ID_PART) is not None:
        return f"{int(value)}-0"
    try:
        return stream_id(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"not a stream entry id (<milliseconds>-<sequence> or <milliseconds>, each at most {MAX_STREAM_ID_PART}, "
            f"e.g. 1718000000000-0): {value!r}"
        ) from None


def stream_id(value: str) -> str:
    """An argparse type: a complete stream entry id `<ms>-<seq>`."""
    match = _STREAM_ID.fullmatch(value)
    if match is None or any(whole_number(part, MAX_STREAM_ID_PART) is None for part in match.groups()):
        raise argparse.ArgumentTypeError(
            f"not a stream entry id (<milliseconds>-<sequence>, each at most {MAX_STREAM_ID_PART}, "
            f"e.g. 1718000000000-0): {value!r}"
        )
    return value
