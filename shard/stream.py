"""The shard's side of Redis: the consumer group, reads, ACKs and dead letters."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from redis.exceptions import ResponseError

from common.config import Settings
from common.faults import stream_or_group_gone
from common.keys import failures_key, lost_key
from common.redis_client import async_client, keep_field_pairs
from shard.dead_letters import WRITTEN, DeadLetter, DeadLetters

# An entry's fields as Redis sent them, a flat [name, value, …] list (names may repeat);
# None when the entry was deleted or trimmed while it sat in the pending list.
Entry = tuple[bytes, list[bytes] | None]

log = logging.getLogger("processor.stream")

READ_BLOCK_MS = 2_000

# Pending entries whose stream entry is gone: ACKed, and counted in the group's lost counter by the
# number XACK really removed, so a retried call (or a claimer that got there first) never
# counts one twice. Returns that number.
_ACK_GONE = """
local removed = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
if removed > 0 then redis.call('INCRBY', KEYS[2], removed) end
return removed
"""
SOCKET_TIMEOUT_S = 10.0
ACK_GONE_CHUNK = 1_000  # ids per script call (Lua's unpack has a limit)
HEALTH_CHECK_S = 5


class ConsumerStream:
    """One consumer of the group: everything a shard says to Redis."""

    def __init__(self, settings: Settings, consumer: str) -> None:
        self.stream = settings.stream_key
        self.group = settings.consumer_group
        self.dlq = settings.dlq_key
        self.failures = failures_key(settings.stream_key, settings.consumer_group)
        self.lost = lost_key(settings.stream_key, settings.consumer_group)
        self.consumer = consumer
        self.redis = async_client(settings.redis_url, SOCKET_TIMEOUT_S, consumer, health_check_s=HEALTH_CHECK_S)
        keep_field_pairs(self.redis)
        self.letters = DeadLetters(self.redis, self.stream, self.group, self.dlq, self.failures, consumer)
        self._ack_gone = self.redis.register_script(_ACK_GONE)

    async def ensure_group(self) -> None:
        """Create the group (and the stream) from id 0 unless another shard already did."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, after: bytes | str, count: int, may_block: bool = True) -> list[Entry]:
        """Own pending entries after `after` (an id), or new ones when `after` is '>' (waiting
        up to READ_BLOCK_MS for the first, if `may_block`)."""
        block = READ_BLOCK_MS if may_block and after in (">", b">") else None
        try:
            reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: after}, count=count, block=block)
        except ResponseError as exc:
            if not stream_or_group_gone(exc):
                raise
            # The stream or the group was deleted (or Redis lost its data): start over from id 0.
            log.warning("stream or consumer group missing; creating it again", extra={"stream": self.stream, "group": self.group})
            await self.ensure_group()
            return []
        if not reply:
            return []
        return reply[0][1]

    async def settle(
        self,
        acked: Sequence[bytes],
        dead: Sequence[DeadLetter],
        recovered: Sequence[bytes] = (),
        on_written: Callable[[int], None] = lambda count: None,
    ) -> set[bytes]:
        """ACK what was committed and dead-letter the poison, in one round trip; returns the entry ids
        whose letters were written (a letter is not, for an entry no longer pending: another
        consumer dead-lettered or acknowledged it; nor for one lettered at an earlier reading).

        `recovered` are acked entries that had failed before: their failure counts go.
        `on_written` is told of letters as soon as they are written (and acknowledged): one
        too large for the script is written on its own, and a shard killed between two of
        them must have counted the first, which is never delivered again.
        """
        small, large = self.letters.split(dead)
        async with self.redis.pipeline(transaction=False) as pipe:
            if acked:
                pipe.xack(self.stream, self.group, *acked)
            if recovered:
                pipe.hdel(self.failures, *recovered)
            await self.letters.queue(pipe, small)
            results = await pipe.execute()
        outcomes = results[int(bool(acked)) + int(bool(recovered)) :]
        written = {letter[0] for letter, done in zip(small, outcomes) if done == WRITTEN}  # type: ignore[misc]
        if written:
            on_written(len(written))
        for entry_id, poison, fields in large:
            if await self.letters.write_large(entry_id, poison, fields) == WRITTEN:
                written.add(entry_id)
                on_written(1)
        return written

    async def ack_gone(self, gone: Sequence[bytes]) -> int:
        """ACK pending entries that were deleted from the stream; returns how many were still pending (now counted lost)."""
        removed = 0
        for start in range(0, len(gone), ACK_GONE_CHUNK):
            chunk = gone[start : start + ACK_GONE_CHUNK]
            removed += int(await self._ack_gone(keys=[self.stream, self.lost], args=[self.group, *chunk]))
        return removed

    async def close(self) -> None:
        await self.redis.aclose()
