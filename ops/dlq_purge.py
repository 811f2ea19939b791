"""`processor dlq purge`: delete dead letters, after confirmation.

With explicit ids it is all-or-nothing, in one Lua script: one unknown id and nothing is
deleted. `--all` deletes every letter up to the newest one present when asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.config import Settings
from common.redis_client import text
from ops.dlq_letters import UnknownLetters, checked_ids
from ops.errors import redis_client
from ops.terminal import Confirm, Declined, count

# KEYS[1] the DLQ; ARGV the letter ids. All or nothing: if any id is missing, the reply is
# {0, missing ids...} and nothing is deleted; else {number deleted}.
_PURGE = """
local missing = {0}
for i = 1, #ARGV do
  if #redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i]) == 0 then missing[#missing + 1] = ARGV[i] end
end
if #missing > 1 then return missing end
local deleted = 0
for i = 1, #ARGV do deleted = deleted + redis.call('XDEL', KEYS[1], ARGV[i]) end
return {deleted}
"""


@dataclass(frozen=True)
class PurgeResult:
    dlq: str
    purged: int
    ids: list[str] | None  # None for --all

    def as_json(self) -> dict[str, object]:
        return {"dlq": self.dlq, "purged": self.purged, "ids": self.ids}


def purge(settings: Settings, letter_ids: Sequence[str], confirm: Confirm) -> PurgeResult:
    """Delete the named letters, all or nothing: one unknown id and nothing is deleted."""
    ids = checked_ids(letter_ids)
    with redis_client(settings.redis_url) as client:
        missing = [i for i in ids if not client.xrange(settings.dlq_key, min=i, max=i)]
        if missing:  # before asking; the script checks again
            raise UnknownLetters(settings.dlq_key, missing, "deleted")
        if not confirm(f"Delete {count(len(ids), 'dead letter', 'dead letters')} from {settings.dlq_key}?"):
            raise Declined("not confirmed; nothing was deleted")
        reply = client.register_script(_PURGE)(keys=[settings.dlq_key], args=ids)
    if len(reply) > 1:
        raise UnknownLetters(settings.dlq_key, [text(i) for i in reply[1:]], "deleted")
    return PurgeResult(settings.dlq_key, int(reply[0]), ids)


def purge_all(settings: Settings, confirm: Confirm) -> PurgeResult:
    """Delete every letter up to the newest one present when asked; later letters stay.

    XTRIM MINID keeps the stream key (and any consumer group on it) while emptying it.
    """
    with redis_client(settings.redis_url) as client:
        length = int(client.xlen(settings.dlq_key))
        last = client.xrevrange(settings.dlq_key, count=1)
        if not last:
            return PurgeResult(settings.dlq_key, 0, None)
        end = text(last[0][0])
        question = f"Delete all {count(length, 'dead letter', 'dead letters')} from {settings.dlq_key} (up to {end})?"
        if not confirm(question):
            raise Declined("not confirmed; nothing was deleted")
        after = _next_id(end)
        if after is None:  # the largest id there is: no letter can come after it
            purged = int(client.xtrim(settings.dlq_key, maxlen=0, approximate=False))
        else:
            purged = int(client.xtrim(settings.dlq_key, minid=after, approximate=False))
    return PurgeResult(settings.dlq_key, purged, None)


def format_purge(result: PurgeResult) -> list[str]:
    return [f"deleted {count(result.purged, 'dead letter', 'dead letters')} from {result.dlq}"]


def _next_id(entry_id: str) -> str | None:
    """The smallest id after `entry_id`; None after the largest (both parts 2**64 - 1)."""
    ms, seq = (int(part) for part in entry_id.split("-"))
    if seq < 2**64 - 1:
        return f"{ms}-{seq + 1}"
    return f"{ms + 1}-0" if ms < 2**64 - 1 else None
