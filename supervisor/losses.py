"""Entries trimmed or deleted before they were ever delivered to our group (SPEC §5).

A producer's `XADD … MAXLEN`, an operator's XTRIM or XDEL can remove entries our group has
not read yet. Their ids never reach a shard, but Redis 7 keeps two counters that betray them:
the stream's `entries-added` (A: every entry ever added) and the group's `entries-read`
(R: the entries it was delivered, counted by Redis one by one). With P the entries now in
the stream after the group's last-delivered-id (counted, see below),

    d = A - R - P

is the number of entries added that were neither delivered to the group nor are still
waiting for it: removed before delivery. Our own trimming never changes d (it only removes
entries every group is done with); neither does an XDEL of a delivered entry (a pending one
is the shards' case, supervisor-side it changes nothing). Each pass compares d with the d of
the previous pass, kept in the group's `<STREAM_KEY>:group:<group>:lost-watch` (a group without
one starts from `<STREAM_KEY>:lost:watch`, the key of earlier releases, so an upgrade counts
nothing twice), and counts the growth as lost: in `<STREAM_KEY>:group:<group>:lost` (all
instances) and in this instance's `processor_entries_lost_total
{shard="maintenance"}`. The comparison, the update of the watch and the INCRBY are one Lua
script, so when several instances look at once each loss is counted by exactly one of them.

How exact it is, as far as Redis allows:

- P is exact: the whole stream when its first entry lies after the group's position (a trim
  went past it), else the entries after that position, counted by XRANGE up to
  COUNT_LIMIT; beyond that (a backlog) this pass skips and a later one catches up.
- R is what Redis keeps. It is nil for a group that has not read yet, and after an XDEL
  left a hole ahead of the group until the group has read the stream's newest entry; a pass
  then derives it where Redis itself would (the group at the newest entry: A; nothing read
  and no hole: A minus the stream's length), and otherwise falls back to what Redis still
  shows: a hole beyond the group's position (`max-deleted-entry-id`) or a first entry beyond
  it (a trim) that the previous pass had not seen counts as one lost entry (a lower bound,
  logged `exact: false`), and the rest is counted once R is back, if Redis kept it in step.
- When Redis re-derives R from the stream (it does so once the group reads past a hole), d
  falls back to the true count after the group's position; losses that happened and were
  passed over between two passes in that window are not seen. So the count is exact for
  trims (MAXLEN, MINID), the usual case, and a lower bound for XDELs of undelivered entries.
- The group created again, or moved back (its position or R went down): the watch starts
  over without counting. The very first look (no watch yet) counts a d above zero: those
  entries were lost before our group read them, though perhaps before this release watched.

The log names the range the lost ids lie in: after the group's position at the previous
pass, and before the stream's first entry (a trim) or up to the largest deleted id (a
deletion, also one beyond a trim in the same pass).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis

from common.config import Settings
from common.keys import legacy_loss_watch_key, loss_watch_key, lost_key
from supervisor.lua import PRELUDE

log = logging.getLogger("processor.maintenance")

COUNT_LIMIT = 10_000  # entries after the group's position counted by one pass at most

# KEYS: stream, watch hash, lost counter, the watch of earlier releases (all groups' one key).
# ARGV: group, count limit.
# Returns {state, lost now, exact (1/0), previous position, position, first id, max deleted id, d or -1}.
_WATCH = PRELUDE + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'no-stream'} end
local info = to_table(redis.call('XINFO', 'STREAM', KEYS[1]))
local group = false
for _, flat in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local g = to_table(flat)
  if g['name'] == ARGV[1] then group = g end
end
if not group then return {'no-group'} end
local added, length, maxdel = info['entries-added'], info['length'], info['max-deleted-entry-id']
local first = info['first-entry'] and info['first-entry'][1] or ''
local pos, read = group['last-delivered-id'], group['entries-read']
if not read then
  -- Redis' own estimate (as it derives the group's counter on its next read), where it is exact.
  local last, unfragmented = info['last-generated-id'], maxdel == '0-0' or id_lt(maxdel, first)
  if added == 0 then read = 0
  elseif pos == last or (length == 0 and not id_lt(last, pos)) then read = added
  elseif unfragmented and first ~= '' and id_lt(pos, first) then read = added - length
  elseif unfragmented and pos == first then read = added - length + 1
  end
end
local after = false
if length == 0 then after = 0
elseif id_lt(pos, first) then after = length
else
  local limit = tonumber(ARGV[2])
  local n = #redis.call('XRANGE', KEYS[1], '(' .. pos, '+', 'COUNT', limit + 1)
  if n <= limit then after = n end
end
local d = (read and after) and (added - read - after) or false
local w = to_table(redis.call('HGETALL', KEYS[2]))
if not w['pos'] then w = to_table(redis.call('HGETALL', KEYS[4])) end
local state, lost, exact, base = 'counted', 0, 1, d
if not w['pos'] then
  state = 'baseline'
  if d and d > 0 then lost = d end
elseif id_lt(pos, w['pos']) or (read and w['read'] ~= '' and read < tonumber(w['read'])) then
  state = 'reset'
elseif d then
  if w['d'] ~= '' and d > tonumber(w['d']) then lost = d - tonumber(w['d']) end
else
  if maxdel ~= w['maxdel'] and id_lt(pos, maxdel) then lost, exact = lost + 1, 0 end
  if first ~= '' and first ~= w['first'] and id_lt(pos, first) then lost, exact = lost + 1, 0 end
  base = false
  if w['d'] ~= '' then base = tonumber(w['d']) + lost end
end
redis.call('HSET', KEYS[2], 'pos', pos, 'read', read or '', 'd', base or '', 'maxdel', maxdel, 'first', first)
if lost > 0 then redis.call('INCRBY', KEYS[3], lost) end
return {state, lost, exact, w['pos'] or '', pos, first, maxdel, d or -1}
"""


@dataclass(frozen=True)
class Watch:
    """One pass's finding."""

    state: str  # counted, baseline, reset, no-stream, no-group
    lost: int = 0
    exact: bool = True
    previous_position: str = ""
    position: str = ""
    first_id: str = ""
    max_deleted_id: str = ""
    unaccounted: int | None = None  # d: entries added, never delivered, not in the stream (None: Redis cannot tell now)


class LossWatch:
    """Runs the _WATCH script once per pass and logs what it found."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.script = client.register_script(_WATCH)

    def check(self) -> int:
        """One look; returns how many entries this instance counted as lost now."""
        stream = self.settings.stream_key
        group = self.settings.consumer_group
        keys = [stream, loss_watch_key(stream, group), lost_key(stream, group), legacy_loss_watch_key(stream)]
        reply = self.script(keys=keys, args=[group, COUNT_LIMIT])
        watch = parse(reply)
        if watch.state == "reset":
            log.info("consumer group created again or moved back; loss watch starts over", extra={"group": self.settings.consumer_group})
        if watch.lost:
            log.warning(
                "entries lost: trimmed or deleted from the stream before they were delivered to the group",
                extra={"lost": watch.lost, "exact": watch.exact, "group": self.settings.consumer_group,
                       "first_look": watch.state == "baseline", **lost_range(watch)},
            )
        return watch.lost


def parse(reply: list[Any]) -> Watch:
    values = [v.decode() if isinstance(v, bytes) else v for v in reply]
    if len(values) == 1:
        return Watch(values[0])
    state, lost, exact, previous, position, first, maxdel, unaccounted = values
    return Watch(state, int(lost), bool(exact), previous, position, first, maxdel, None if unaccounted < 0 else int(unaccounted))


def lost_range(watch: Watch) -> dict[str, str]:
    """Where the lost ids lie, as far as Redis tells: after one id, and before (a trim) or up to (a deletion) another."""
    after = watch.previous_position or watch.position
    trimmed = bool(watch.first_id) and _after(watch.first_id, after)
    # A deletion beyond the first entry, besides a trim, lies past the trim's range.
    if trimmed and not (watch.max_deleted_id and _after(watch.max_deleted_id, watch.first_id)):
        return {"ids_after": after, "ids_before": watch.first_id}
    upto = max((watch.max_deleted_id, watch.position), key=_key)
    if not watch.previous_position:  # the first look: no earlier position to start from
        return {"ids_up_to": upto}
    return {"ids_after": after, "ids_up_to": upto}


def _after(a: str, b: str) -> bool:
    return _key(a) > _key(b)


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms or 0), int(seq or 0)
