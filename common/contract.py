"""Rules of the stream contract (SPEC §2) that more than one layer checks.

The shard's decoder checks every entry against them; `processor rehydrate` checks the
device id an operator types, so that it names a device the stream could carry. The
retention horizon is the shards' (which fixes are expired), partition maintenance's and
`processor retention`'s.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

MAX_DEVICE_ID_CHARS = 64
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def device_id_problem(device_id: str) -> str | None:
    """Why `device_id` breaks SPEC §2's rule, or None when it is fine."""
    if not 0 < len(device_id) <= MAX_DEVICE_ID_CHARS:
        return f"must be 1-{MAX_DEVICE_ID_CHARS} characters, got {len(device_id)}"
    # isprintable() (in C) is False for every control character; the pattern decides only then.
    if not device_id.isprintable() and CONTROL_CHARACTERS.search(device_id):
        return "must not contain control characters"
    return None


def retention_horizon(now: datetime, retention_days: int) -> datetime | None:
    """Fixes dated before this are expired (POSITIONS_RETENTION_DAYS); None when everything is kept."""
    return now - timedelta(days=retention_days) if retention_days else None
