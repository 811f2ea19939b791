"""What a poison entry's error says: the member, the rule it broke, and a short preview of the value."""

from __future__ import annotations

import orjson

from common.errors import InvalidEntry


def invalid(member: str, rule: str, value: object = ...) -> InvalidEntry:
    shown = "" if value is ... else f", got {preview(value)}"
    return InvalidEntry("validate", f"{member} {rule}{shown}")


def preview(value: object) -> str:
    """At most 80 characters of a value, for an error message; never fails."""
    try:
        text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, ValueError):  # nested deeper than orjson writes
        return f"{json_type(value)} nested too deep to show"
    return text if len(text) <= 80 else text[:77] + "..."


def json_type(value: object) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )
