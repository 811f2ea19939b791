"""A fix's `ts` (SPEC §2): integer epoch milliseconds, or an ISO-8601 date-time with an offset."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from shard.poison import invalid

MAX_TS_TEXT_CHARS = 64
# 9999-12-30T23:59:59.999Z: a day short of Python's last datetime, so that rendering a
# stored time in any time zone (Postgres JSON, logs) cannot overflow.
MAX_TS_MS = 253_402_214_399_999

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MAX_TS = EPOCH + timedelta(milliseconds=MAX_TS_MS)


def timestamp(ts: object) -> datetime:
    if type(ts) is int:
        if not 0 <= ts <= MAX_TS_MS:
            raise invalid("ts", f"epoch milliseconds must be between 0 and {MAX_TS_MS}", ts)
        return EPOCH + timedelta(milliseconds=ts)
    if type(ts) is str:
        if len(ts) > MAX_TS_TEXT_CHARS:
            raise invalid("ts", f"is longer than {MAX_TS_TEXT_CHARS} characters")
        try:
            utc = _iso_instant(ts)
        except OverflowError:
            utc = _MAX_TS + timedelta(days=1)  # beyond what a datetime holds: out of range below
        if not EPOCH <= utc <= _MAX_TS:
            raise invalid("ts", "must be between 1970-01-01 and 9999-12-30 UTC", ts)
        return utc
    if ts is None:
        raise invalid("ts", "is required")
    raise invalid("ts", "must be integer epoch milliseconds or an ISO-8601 string", ts)


# ISO-8601 date-times with an offset, as RFC 3339 profiles them (separator T, t or a space;
# offset Z, z, ±hh:mm, ±hhmm or ±hh), calendar or week dates, basic or extended. Checked
# before `datetime.fromisoformat`, which reads more than ISO-8601: any character between
# date and time, offsets with seconds (a fix moved by an amount no offset can say), a
# fraction without digits. It refuses two ISO forms, read here: second 60 (a leap second,
# the next second, as Postgres reads it) and 24:00 (the end of a day, the next day's 00:00).
_ISO_DATE_TIME = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2}|\d{8}|\d{4}-W\d{2}-\d|\d{4}W\d{3})[Tt ]"
    r"(?P<hour>\d{2})(?::?(?P<minute>\d{2})(?::?(?P<second>\d{2})(?P<fraction>[.,]\d+)?)?)?"
    r"(?P<offset>[Zz]|[+-]\d{2}(?::?\d{2})?)?",
    re.ASCII,
)


def _iso_instant(text: str) -> datetime:
    """The instant an ISO-8601 date-time with an offset names, in UTC; raises InvalidEntry."""
    match = _ISO_DATE_TIME.fullmatch(text)
    if match is None:
        raise invalid("ts", "is not an ISO-8601 timestamp", text)
    if match["offset"] is None:
        raise invalid("ts", "ISO-8601 timestamp must carry an offset (Z or +hh:mm)", text)
    date, hour, minute, second, fraction = match.group("date", "hour", "minute", "second", "fraction")
    extra = timedelta(0)
    if hour == "24" and int(minute or 0) == int(second or 0) == 0 and not (fraction or "0").strip(".,0"):
        hour, extra = "00", timedelta(days=1)
    if second == "60":
        second, extra = "59", timedelta(seconds=1)
    offset = match["offset"].upper()
    canonical = f"{date}T{hour}:{minute or '00'}:{second or '00'}{(fraction or '').replace(',', '.')}{offset}"
    try:
        parsed = datetime.fromisoformat(canonical)
    except ValueError:
        raise invalid("ts", "is not an ISO-8601 timestamp", text) from None
    return parsed.astimezone(timezone.utc) + extra
