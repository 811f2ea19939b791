"""The device-id rule of SPEC §2, as decoding and `processor rehydrate` apply it."""

from __future__ import annotations

import sys

from common.contract import CONTROL_CHARACTERS, MAX_DEVICE_ID_CHARS, device_id_problem


def test_every_character_is_judged_by_the_control_character_rule() -> None:
    """The isprintable() shortcut never lets a control character through, nor refuses another."""
    for code in range(sys.maxunicode + 1):
        if 0xD800 <= code <= 0xDFFF:
            continue  # not a character a decoded JSON string holds
        char = chr(code)
        refused = device_id_problem(f"dev{char}") is not None
        assert refused == bool(CONTROL_CHARACTERS.search(char)), hex(code)


def test_length_limits() -> None:
    assert device_id_problem("") is not None
    assert device_id_problem("x" * MAX_DEVICE_ID_CHARS) is None
    assert device_id_problem("x" * (MAX_DEVICE_ID_CHARS + 1)) is not None
    assert device_id_problem("\u00a0 non-breaking and zero\u200bwidth") is None  # not printable, yet allowed
