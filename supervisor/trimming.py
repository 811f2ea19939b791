"""Stream trimming that respects every reader (SPEC §5 "Stream trimming").

Where: the maintenance process of every instance (supervisor/maintenance.py) runs the
`stream` duty every TRIM_EVERY_S: one trimming pass, then one look for lost entries
(supervisor/losses.py).

The trim point. An entry may go only when every consumer group on the stream is done with
it: the group has read it (its id is at or below the group's last-delivered-id) and no
longer holds it pending. So each group needs every entry from the smaller of its oldest
pending id (XPENDING's summary) and its first unread entry (the first entry after its
last-delivered-id); a group that has read and acknowledged everything needs nothing. The
safe id is the smallest id any group needs, or the stream's newest id when none needs
anything (the newest entry is always kept). Without our own group there is no safe id: our
shards have not processed anything yet. A pending id whose entry was deleted holds the trim
point only until its consumer acknowledges it (our shards count it lost and ACK it).

Retention. "Kept STREAM_RETENTION_MS after it was acknowledged" needs the time each id
became safe. Each pass appends (Redis' clock, safe id) to the stream `<STREAM_KEY>:trim:history`
when the safe id moved, and trims STREAM_KEY to the newest safe id recorded at least
STREAM_RETENTION_MS ago (never past the safe id of this very pass): every entry below it was
done by every group at that recorded moment. An entry is therefore removed between
STREAM_RETENTION_MS and STREAM_RETENTION_MS + TRIM_EVERY_S after its last group finished
with it (later if no pass ran meanwhile); history older than the record used is trimmed, so
it holds about STREAM_RETENTION_MS / TRIM_EVERY_S small entries at most. `0`: trims to this
pass's safe id; `off`: computes and reports, never trims.

Atomicity. The computation, the history and the XTRIM run in one Lua script (_TRIM), which
Redis executes alone: no group can read, acknowledge, be created or be moved back between
the moment the safe id is computed and the trim, and two instances' passes run one after
the other. XTRIM MINID only ever removes entries below its id, so a pass that computes an
older safe id (a new group created at 0, say) trims nothing more, and no instance can trim
past what is unsafe at the moment its own script runs.

Approximate, then exact. `MINID ~ id LIMIT n` frees only whole nodes of Redis' radix tree
whose every entry is below the id, never one at or above it, and LIMIT bounds the work of one
call to TRIM_LIMIT_ENTRIES entries, so a pass never blocks Redis for long, even when a group
that was hours behind catches up at once or trimming is first switched on over a long stream;
the rest goes at the next passes (TRIM_LIMIT_ENTRIES / TRIM_EVERY_S entries a second at most).
Exact trimming allows no LIMIT, so it follows only once the approximate call removed less than
its limit: what is left below the id then lies in the one node that holds the id (at most
`stream-node-max-entries`, 100 by default), and the exact call removes just that. Otherwise a
quiet stream would keep up to a node of entries long past their retention (`0`: "at once").

Holding back. A group whose oldest needed entry is older than the retention horizon holds
the stream back: `blocked` is by how much (0 while within retention, or with `off`). The
maintenance logs when a group starts or stops holding the stream back by HOLDBACK_LOG_MS or
more; `processor lag` and /metrics show every group's figure (`compute_trim_point` is the
one computation, fed by the script's own snapshot or by `read_stream_state`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from common.config import Settings
from common.faults import stream_or_group_gone
from common.keys import lettered_key, trim_history_key, trim_last_key
from common.lag import group_lag
from common.redis_client import sync_client, text
from common.status import MaintenanceState, StatusBoard
from supervisor.losses import LossWatch
from supervisor.lua import PRELUDE
from supervisor.maintenance import Duty

log = logging.getLogger("processor.maintenance")

TRIM_EVERY_S = 2.0
TRIM_LIMIT_ENTRIES = 100_000  # removed by one pass at most
HOLDBACK_LOG_MS = 60_000  # a group this far past the retention horizon is logged as holding the stream back
REDIS_TIMEOUT_S = 10.0

# KEYS: stream, history, last-trim hash, lettered (common/keys.py). ARGV: retention ms or 'off', our group, LIMIT, instance.
# Returns {now ms, safe id or '', target or '', removed, length, last id, rows}; a row per group:
# {name, last-delivered-id, pending, oldest pending id or '', first unread id or '', entries-read or -1, lag or -1}.
_TRIM = PRELUDE + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'no-stream'} end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local last_id = to_table(redis.call('XINFO', 'STREAM', KEYS[1]))['last-generated-id']
local safe, ours, rows = last_id, false, {}
for _, flat in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local g = to_table(flat)
  local oldest_pending, first_unread = '', ''
  if g['pending'] > 0 then oldest_pending = redis.call('XPENDING', KEYS[1], g['name'])[2] end
  local after = redis.call('XRANGE', KEYS[1], '(' .. g['last-delivered-id'], '+', 'COUNT', 1)
  if #after > 0 then first_unread = after[1][1] end
  for _, needed in ipairs({oldest_pending, first_unread}) do
    if needed ~= '' and id_lt(needed, safe) then safe = needed end
  end
  if g['name'] == ARGV[2] then ours = true end
  rows[#rows + 1] = {g['name'], g['last-delivered-id'], g['pending'], oldest_pending, first_unread,
                     g['entries-read'] or -1, g['lag'] or -1}
end
local target, removed = false, 0
if not ours then safe = false end
if safe and ARGV[1] ~= 'off' then
  local retention = tonumber(ARGV[1])
  if retention == 0 then
    target = safe
  else
    local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
    if #newest == 0 or newest[1][2][2] ~= safe then redis.call('XADD', KEYS[2], '*', 'safe', safe) end
    local aged = redis.call('XREVRANGE', KEYS[2], string.format('%d', now - retention), '-', 'COUNT', 1)
    if #aged > 0 then
      target = aged[1][2][2]
      if id_lt(safe, target) then target = safe end
      redis.call('XTRIM', KEYS[2], 'MINID', aged[1][1])
    end
  end
  if target then
    removed = redis.call('XTRIM', KEYS[1], 'MINID', '~', target, 'LIMIT', ARGV[3])
    if removed < tonumber(ARGV[3]) then removed = removed + redis.call('XTRIM', KEYS[1], 'MINID', target) end
  end
end
if safe then
  redis.call('HSET', KEYS[3], 'at', now, 'safe', safe, 'target', target or '', 'removed', removed, 'instance', ARGV[4])
  redis.call('HINCRBY', KEYS[3], 'removed_total', removed)
end
-- Entries below the stream's first can never be read again: their letters need no memory.
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #first > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. string.match(first[1][1], '^%d+'))
else
  redis.call('DEL', KEYS[4])
end
return {now, safe or '', target or '', removed, redis.call('XLEN', KEYS[1]), last_id, rows}
"""


@dataclass(frozen=True)
class GroupState:
    """One consumer group as Redis describes it."""

    name: str
    last_delivered_id: str
    pending: int
    oldest_pending_id: str | None
    first_unread_id: str | None
    entries_read: int | None
    lag: int | None  # entries not yet delivered to the group; None when Redis cannot tell

    @property
    def needs_from(self) -> str | None:
        """The oldest entry the group has not read or still holds pending; None when it is done."""
        needed = [i for i in (self.oldest_pending_id, self.first_unread_id) if i]
        return min(needed, key=id_key) if needed else None


@dataclass(frozen=True)
class GroupHold:
    """How far one group holds the stream back."""

    group: str
    needs_from: str | None
    oldest_needed_age_ms: int  # age (from its id) of the oldest entry the group needs; 0 when none
    blocked_ms: int  # how far that entry lies beyond the retention horizon; 0 within it or when trimming is off
    unread: int | None
    pending: int

    def as_json(self) -> dict[str, object]:
        return {
            "group": self.group, "needs_from": self.needs_from, "oldest_needed_age_ms": self.oldest_needed_age_ms,
            "blocked_ms": self.blocked_ms, "unread": self.unread, "pending": self.pending,
        }


@dataclass(frozen=True)
class TrimPoint:
    """Where the stream may be trimmed now, and who decides it."""

    safe_id: str | None  # entries below it may go; None: nothing may (no stream, or our group missing)
    holder: str | None  # the group whose oldest needed entry is the safe id; None when no group needs one
    groups: tuple[GroupHold, ...] = field(default=())

    def holding_back(self, min_ms: int = 1) -> list[GroupHold]:
        """Groups that keep entries past the retention horizon by at least `min_ms`, worst first."""
        return sorted((g for g in self.groups if g.blocked_ms >= min_ms), key=lambda g: -g.blocked_ms)


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def id_ms(entry_id: str) -> int:
    return id_key(entry_id)[0]


def compute_trim_point(
    groups: list[GroupState], our_group: str, last_id: str | None, now_ms: int, retention_ms: int | None
) -> TrimPoint:
    """The safe id (as the trimming script computes it) and how far each group holds it back. Pure."""
    holds = []
    for group in groups:
        needs = group.needs_from
        age = max(now_ms - id_ms(needs), 0) if needs else 0
        blocked = max(age - retention_ms, 0) if needs and retention_ms is not None else 0
        unread = group.lag if group.first_unread_id else 0
        holds.append(GroupHold(group.name, needs, age, blocked, unread, group.pending))
    if last_id is None or our_group not in {g.name for g in groups}:
        return TrimPoint(None, None, tuple(holds))
    needing = [g for g in holds if g.needs_from]
    if not needing:
        return TrimPoint(last_id, None, tuple(holds))
    holder = min(needing, key=lambda g: id_key(g.needs_from or ""))
    safe = min(holder.needs_from or last_id, last_id, key=id_key)
    return TrimPoint(safe, holder.group, tuple(holds))


def group_from_row(row: list[Any]) -> GroupState:
    name, last_delivered, pending, oldest, first_unread, entries_read, lag = row
    return GroupState(
        text(name), text(last_delivered), int(pending), text(oldest) or None, text(first_unread) or None,
        None if int(entries_read) < 0 else int(entries_read), None if int(lag) < 0 else int(lag),
    )


class StreamDuty:
    """The maintenance duty: trim once, look for lost entries once, report both."""

    def __init__(self, settings: Settings, board: StatusBoard, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.board = board
        self.redis = client or sync_client(settings.redis_url, REDIS_TIMEOUT_S, "processor-maintenance")
        self.trim_script = self.redis.register_script(_TRIM)
        self.losses = LossWatch(settings, self.redis)
        self.holding: set[str] = set()
        self.waiting_for_group = False
        self.last: TrimPoint | None = None
        self.lost = board.read_maintenance().lost  # the slot's count survives our restarts

    def run(self) -> None:
        self.trim()
        self.lost += self.losses.check()
        self.board.write_maintenance(MaintenanceState(self.lost, time.monotonic()))

    def trim(self) -> TrimPoint | None:
        """One trimming pass (the _TRIM script), then the log lines its outcome calls for."""
        settings = self.settings
        retention = "off" if settings.stream_retention_ms is None else str(settings.stream_retention_ms)
        stream = settings.stream_key
        keys = [stream, trim_history_key(stream), trim_last_key(stream), lettered_key(stream)]
        reply = self.trim_script(keys=keys, args=[retention, settings.consumer_group, TRIM_LIMIT_ENTRIES, settings.instance_id])
        if reply[0] in (b"no-stream", "no-stream"):
            return None
        now_ms, safe, target, removed, length, last_id, rows = reply
        groups = [group_from_row(row) for row in rows]
        point = compute_trim_point(groups, settings.consumer_group, text(last_id), int(now_ms), settings.stream_retention_ms)
        if (point.safe_id or "") != text(safe):
            log.error("trim point computed twice, differently (a bug)", extra={"script": text(safe), "python": point.safe_id})
        self.last = point
        self.report(point, int(removed), text(target), int(length))
        return point

    def report(self, point: TrimPoint, removed: int, target: str, length: int) -> None:
        if point.safe_id is None:
            if not self.waiting_for_group:
                log.info("not trimming: the consumer group does not exist yet", extra={"group": self.settings.consumer_group})
            self.waiting_for_group = True
            return
        self.waiting_for_group = False
        if removed:
            log.debug("stream trimmed", extra={"removed": removed, "below": target, "length": length, "holder": point.holder})
        holding = {g.group: g for g in point.holding_back(HOLDBACK_LOG_MS)}
        for name in sorted(holding.keys() - self.holding):
            hold = holding[name]
            log.warning(
                "consumer group holds the stream back: entries it has not read or acknowledged cannot be trimmed",
                extra={"group": name, "needs_from": hold.needs_from, "oldest_needed_age_s": round(hold.oldest_needed_age_ms / 1000),
                       "beyond_retention_s": round(hold.blocked_ms / 1000), "unread": hold.unread, "pending": hold.pending,
                       "stream_length": length},
            )
        for name in sorted(self.holding - holding.keys()):
            log.info("consumer group no longer holds the stream back", extra={"group": name, "stream_length": length})
        self.holding = set(holding)

    def close(self) -> None:
        self.redis.close()


def stream_duty(settings: Settings, board: StatusBoard) -> Duty:
    """The stream duty of the maintenance process."""
    duty = StreamDuty(settings, board)
    return Duty("stream", TRIM_EVERY_S, duty.run, duty.close)


@dataclass(frozen=True)
class StreamState:
    """The stream's trimming as `processor lag` and /metrics show it (read without a script: a snapshot per call)."""

    length: int
    first_id: str | None
    oldest_entry_age_ms: int
    point: TrimPoint
    next_target: str | None  # what a pass now would trim below; None when it would not trim
    last_trim: dict[str, str]
    retention_ms: int | None

    def as_json(self) -> dict[str, object]:
        return {
            "retention_ms": self.retention_ms, "length": self.length, "first_id": self.first_id,
            "oldest_entry_age_ms": self.oldest_entry_age_ms, "safe_id": self.point.safe_id, "holder": self.point.holder,
            "next_trim_below": self.next_target, "last_trim": self.last_trim or None,
            "groups": [g.as_json() for g in self.point.groups],
        }


def read_stream_state(client: redis.Redis, settings: Settings, looks: int = 3) -> StreamState | None:
    """Everything `processor lag` and the stream gauges show of trimming; None when the stream does not exist.

    The look takes several commands: a stream or group deleted meanwhile is looked at again.
    """
    for _ in range(looks):
        if not client.exists(settings.stream_key):
            return None
        try:
            return _look(client, settings)
        except redis.ResponseError as exc:
            if not stream_or_group_gone(exc):
                raise
    return None


def _look(client: redis.Redis, settings: Settings) -> StreamState:
    stream = settings.stream_key
    seconds, micros = client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    info = client.xinfo_stream(stream)
    groups = []
    for g in client.xinfo_groups(stream):
        name, last_delivered = text(g["name"]), text(g["last-delivered-id"])
        oldest = client.xpending(stream, g["name"])["min"] if g["pending"] else None  # the name as Redis has it
        after = client.xrange(stream, min=f"({last_delivered}", max="+", count=1)
        unread = group_lag(client, stream, g).count if after else 0
        groups.append(GroupState(
            name, last_delivered, int(g["pending"]), text(oldest) if oldest else None, text(after[0][0]) if after else None,
            g.get("entries-read"), unread,
        ))
    point = compute_trim_point(groups, settings.consumer_group, text(info["last-generated-id"]), now_ms, settings.stream_retention_ms)
    first = info.get("first-entry")
    first_id = text(first[0]) if first else None
    return StreamState(
        int(info["length"]), first_id, max(now_ms - id_ms(first_id), 0) if first_id else 0, point,
        _next_target(client, settings, point, now_ms),
        {text(k): text(v) for k, v in client.hgetall(trim_last_key(stream)).items()}, settings.stream_retention_ms,
    )


def _next_target(client: redis.Redis, settings: Settings, point: TrimPoint, now_ms: int) -> str | None:
    """What the _TRIM script would trim below now (without recording anything)."""
    retention = settings.stream_retention_ms
    if point.safe_id is None or retention is None:
        return None
    if retention == 0:
        return point.safe_id
    aged = client.xrevrange(trim_history_key(settings.stream_key), max=str(now_ms - retention), min="-", count=1)
    if not aged:
        return None
    fields = aged[0][1]  # a dict, or a flat [name, value, …] list from a client with keep_field_pairs (the CLI's)
    recorded = text(dict(zip(fields[::2], fields[1::2]))[b"safe"] if isinstance(fields, list) else fields[b"safe"])
    return min(recorded, point.safe_id, key=id_key)
