"""Failure counts of entries whose rows Postgres rejected (SPEC §5), counted exactly.

A count is sent to Redis again when its reply was lost (common/retry.py), and by then
Redis may already have counted it. So each count carries the token of the write attempt
that failed: the hash `<STREAM_KEY>:failures` maps an entry id to "count:token", and a
call whose token is the entry's last one returns the stored count without adding one.
One failure per entry per attempt, however often the call is sent.

The field stays the entry id, so the dead-letter script and the settle step HDEL it as
before. A value without a token (written by an earlier version, or by hand) is a plain
count and is continued.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import redis.asyncio

# Failure counts expire eventually, so an entry that failed, crashed its shard and then
# succeeded leaves no counter behind for ever.
FAILURES_TTL_S = 7 * 86_400

# KEYS[1] the failures hash; ARGV[1] the attempt's token, ARGV[2] the TTL, ARGV[3…] entry ids.
_COUNT = """
local counts = {}
for i = 3, #ARGV do
  local value = redis.call('HGET', KEYS[1], ARGV[i])
  local count, token = 0, false
  if value then
    local sep = string.find(value, ':', 1, true)
    if sep then
      count = tonumber(string.sub(value, 1, sep - 1)) or 0
      token = string.sub(value, sep + 1)
    else
      count = tonumber(value) or 0
    end
  end
  if token ~= ARGV[1] then
    count = count + 1
    redis.call('HSET', KEYS[1], ARGV[i], string.format('%d:%s', count, ARGV[1]))
  end
  counts[#counts + 1] = count
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return counts
"""


def new_attempt() -> str:
    """A token for one write attempt: unique across shards, instances and restarts."""
    return secrets.token_hex(8)


class FailureCounts:
    """The failures hash `key` (common.keys.failures_key) of one stream, through `client`."""

    def __init__(self, client: redis.asyncio.Redis, key: str) -> None:
        self.key = key
        self._script = client.register_script(_COUNT)

    async def count(self, entry_ids: Sequence[bytes], attempt: str) -> list[int]:
        """Record one failure of each entry in write attempt `attempt` (a `new_attempt()` token,
        the same for every retry of this call); returns each entry's count so far."""
        if not entry_ids:
            return []
        counts = await self._script(keys=[self.key], args=[attempt, FAILURES_TTL_S, *entry_ids])
        return [int(count) for count in counts]
