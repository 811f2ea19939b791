"""Claiming: entries stuck in other consumers' pending lists come to us and are processed.

Two rules. A consumer whose liveness key has expired is dead: its entries are claimed at
once (checked every LIVENESS_CHECK_S), except within a TTL of a Redis stall or outage that
let our own key lapse too (live consumers could not refresh theirs either). Any consumer's
entry idle longer than CLAIM_THRESHOLD_MS is claimed at the pass every CLAIM_INTERVAL_MS
(XPENDING IDLE, then XCLAIM: XAUTOCLAIM's work, see _AUTOCLAIM), so a live but slow consumer is
never robbed before the threshold. XCLAIM resets
an entry's idle time atomically, so instances claiming at once never take the same entry.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from common.config import Settings
from common.faults import unless_gone
from common.keys import liveness_key, lost_key
from common.redis_client import text
from common.stream_pages import ReadSize
from common.timing import LIVENESS_TTL_S
from shard.stream import ConsumerStream, Entry

log = logging.getLogger("processor.claim")

SHARED_LOGGED_S = 60.0  # a consumer name used by two processes is logged again this often

# A dead consumer's entry must be idle this long, so two claimers racing for it cannot
# both win (the first claim resets the idle time to zero).
DEAD_CLAIM_MIN_IDLE_MS = 1_000
# A consumer idle this many claim thresholds, dead and holding nothing, leaves the group.
FORGET_AFTER_THRESHOLDS = 10

# Atomic: only a consumer that is dead (no liveness key) and holds nothing is deleted, so
# no pending entry is ever dropped with it.
_FORGET_CONSUMER = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# XCLAIM drops a pending entry whose stream entry was deleted from the pending list and
# returns nothing for it, as it does for one that another claimer took first. So, in the same
# atomic step, the ids that are pending, idle enough and no longer in the stream are the
# ones this XCLAIM removes: returned as gone and counted in the group's lost counter, exactly once.
# ARGV of both scripts: group, consumer, min idle ms, ...; KEYS: stream, lost counter.
_CLAIM_IDS = """
local function claim(ids)
  local gone, claimed = {}, {}
  for _, id in ipairs(ids) do
    if #redis.call('XRANGE', KEYS[1], id, id) == 0
        and #redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], id, id, 1) == 1 then
      gone[#gone + 1] = id
    end
  end
  for first = 1, #ids, 1000 do
    local page = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], unpack(ids, first, math.min(first + 999, #ids)))
    for _, entry in ipairs(page) do claimed[#claimed + 1] = entry end
  end
  if #gone > 0 then redis.call('INCRBY', KEYS[2], #gone) end
  return claimed, gone
end
"""
# ARGV: ..., ids… (copied one by one: unpack stops at Lua's stack, ~8,000 values, and a page is BATCH_SIZE)
_CLAIM = _CLAIM_IDS + """
local ids = {}
for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
local claimed, gone = claim(ids)
return {claimed, gone}
"""

# XAUTOCLAIM's work, without its Redis 7.0 habit of dropping every deleted entry it passes from
# the pending list, however briefly pending: a live shard's in-flight entries, XDELed by someone
# while their batch was written, were counted lost (stored all the same), and poison among them
# lost its dead letter. Here only entries idle past the threshold are looked at, and claimed as
# _CLAIM does. The cursor is exclusive, '0-0' once a page came back short. (An XPENDING with
# IDLE walks the pending list until it has a page: a few shards' batches, not the stream.)
# ARGV: ..., start ('-' or '(' id), count.
_AUTOCLAIM = _CLAIM_IDS + """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], ARGV[4], '+', ARGV[5])
local ids = {}
for _, p in ipairs(pending) do ids[#ids + 1] = p[1] end
local claimed, gone = claim(ids)
local cursor = '0-0'
if #pending == tonumber(ARGV[5]) and pending[#pending][1] ~= '18446744073709551615-18446744073709551615' then
  cursor = '(' .. pending[#pending][1]  -- an interval past the largest id there is, Redis refuses
end
return {cursor, claimed, gone}
"""


class Claimer:
    """Claims for one consumer (ours) and yields the claimed entries in pages."""

    def __init__(
        self, settings: Settings, stream: ConsumerStream, on_lost: Callable[[list[bytes], str], None] = lambda ids, how: None
    ) -> None:
        self.settings = settings
        self.stream = stream
        self.redis = stream.redis
        self.page = ReadSize(settings.batch_size)
        self.gone = 0  # claimed ids whose entries had been deleted or trimmed (counted lost)
        self.on_lost = on_lost
        self.lost_key = lost_key(stream.stream, stream.group)
        self.clock = time.monotonic
        self._refreshed_at: float | None = None  # our last liveness refresh
        # What our liveness key holds: this life's own mark, so that another process refreshing
        # the same key (a second instance with our INSTANCE_ID) shows (`keep_alive`).
        self._mark = os.urandom(8).hex().encode()
        self._shared_logged_at = -math.inf
        self._refreshing_since = -math.inf  # refreshed without a lapse since
        self._forget = self.redis.register_script(_FORGET_CONSUMER)
        self._claim = self.redis.register_script(_CLAIM)
        self._autoclaim = self.redis.register_script(_AUTOCLAIM)

    async def keep_alive(self) -> None:
        """Refresh our liveness key; called from the event loop, so a hung shard stops refreshing."""
        before = await self.redis.set(self._alive(self.stream.consumer), self._mark, ex=LIVENESS_TTL_S, get=True)
        now = self.clock()
        if before not in (None, self._mark) and self._refreshed_at is not None:
            # Not our first refresh (then the key may still be our previous life's): someone
            # else wrote it since our last one. Both consume as the same consumer: nothing is
            # lost or stored twice, but each may take the other's in-flight entries for its own.
            self._warn_shared(now)
        if self._refreshed_at is not None and now - self._refreshed_at > LIVENESS_TTL_S:
            # Our own key lapsed: Redis stalled or was out, and every live consumer's key may
            # have lapsed with it. Until they have had a TTL to refresh, none counts as dead.
            self._refreshing_since = now
        self._refreshed_at = now

    def _warn_shared(self, now: float) -> None:
        if now - self._shared_logged_at >= SHARED_LOGGED_S:
            self._shared_logged_at = now
            log.error(
                "another process uses this consumer name: two instances with the same INSTANCE_ID?",
                extra={"consumer": self.stream.consumer},
            )

    def _liveness_trusted(self) -> bool:
        """Whether an expired liveness key means a dead consumer, rather than one Redis kept from refreshing."""
        if self._refreshed_at is None:
            return True  # this claimer keeps no key (`processor claim`); the instance just started
        now = self.clock()
        return now - self._refreshed_at <= LIVENESS_TTL_S and now - self._refreshing_since >= LIVENESS_TTL_S

    async def retire(self) -> None:
        """On a clean stop: what we leave pending may be claimed at once."""
        await self.redis.delete(self._alive(self.stream.consumer))

    async def from_dead(self) -> AsyncIterator[list[Entry]]:
        """Every pending entry of consumers whose liveness key expired."""
        for consumer in await self._consumers():
            raw, name = consumer["name"], text(consumer["name"])  # Redis is given back the bytes it sent
            if raw == self._own or not consumer["pending"]:
                continue
            if await self.redis.exists(self._alive(raw)) or not self._liveness_trusted():
                continue
            log.warning("consumer is dead; claiming its entries", extra={"dead_consumer": name, "pending": consumer["pending"]})
            async for entries in self.pending_of(raw, DEAD_CLAIM_MIN_IDLE_MS):
                yield entries

    async def pending_of(self, consumer: str | bytes, min_idle_ms: int) -> AsyncIterator[list[Entry]]:
        """One consumer's pending entries idle at least `min_idle_ms`, claimed page by page."""
        while True:
            pending = await unless_gone(self.redis.xpending_range(
                self.stream.stream, self.stream.group, "-", "+", self.page.count, consumername=consumer, idle=min_idle_ms
            ), [])
            if not pending:
                return
            ids = [p["message_id"] for p in pending]
            keys = [self.stream.stream, self.lost_key]
            reply = await unless_gone(self._claim(keys=keys, args=[self.stream.group, self.stream.consumer, min_idle_ms, *ids]), None)
            if reply is None:
                return
            entries, gone = reply
            entries = [(entry_id, fields) for entry_id, fields in entries]
            self.page.saw(entries)
            self._count_gone(gone)
            if entries:  # an empty page still made progress: those ids left the consumer's list
                yield entries

    async def idle_entries(self, min_idle_ms: int | None = None) -> AsyncIterator[list[Entry]]:
        """Entries idle past CLAIM_THRESHOLD_MS (or `min_idle_ms`) in any pending list, page by page."""
        cursor: bytes | str = "-"
        threshold = self.settings.claim_threshold_ms if min_idle_ms is None else min_idle_ms
        while True:
            keys = [self.stream.stream, self.lost_key]
            args = [self.stream.group, self.stream.consumer, threshold, cursor, self.page.count]
            reply = await unless_gone(self._autoclaim(keys=keys, args=args), None)
            if reply is None:
                return
            cursor, entries, deleted = reply
            entries = [(entry_id, fields) for entry_id, fields in entries]
            self.page.saw(entries)
            # XCLAIM dropped the deleted ones from the pending list; nothing is left to store.
            self._count_gone(deleted)
            if entries:
                yield entries
            if text(cursor) == "0-0":  # a page can be empty while the cursor still moves on
                return

    async def forget_idle_consumers(self) -> list[str]:
        """Remove long-idle, dead consumers that hold nothing; never one with pending entries."""
        limit_ms = self.settings.claim_threshold_ms * FORGET_AFTER_THRESHOLDS
        forgotten = []
        for consumer in await self._consumers():
            raw = consumer["name"]
            if raw == self._own or consumer["pending"] or consumer["idle"] < limit_ms:
                continue
            keys = [self.stream.stream, self._alive(raw)]
            if await self._forget(keys=keys, args=[self.stream.group, raw]):
                forgotten.append(text(raw))
        if forgotten:
            log.info("idle consumers removed from the group", extra={"consumers": forgotten})
        return forgotten

    async def _consumers(self) -> list[dict[str, Any]]:
        """The group's consumers; none while the stream or the group is gone (deleted, or Redis
        restarted without its data), which the reader creates again at its next read."""
        return await unless_gone(self.redis.xinfo_consumers(self.stream.stream, self.stream.group), [])

    def _alive(self, consumer: str | bytes) -> bytes:
        return liveness_key(self.stream.stream, consumer)

    @property
    def _own(self) -> bytes:
        return self.stream.consumer.encode()

    def _count_gone(self, gone: list[bytes]) -> None:
        """Claimed ids whose entries were deleted or trimmed: counted in Redis by the script, here and in the log."""
        if gone:
            self.gone += len(gone)
            self.on_lost(gone, "deleted while pending (claimed)")


