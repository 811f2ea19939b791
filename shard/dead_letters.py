"""Writing dead letters (SPEC §5): each poison entry ends as exactly one letter, never lost.

The letter is written before the ACK, in one atomic step: a Lua script checks that the
entry is still pending in the group (so of two consumers that both hold it, one writes),
adds the letter, then ACKs. It also notes the entry in `<STREAM_KEY>:lettered`
(common/keys.py): read again after its group was reset or created anew, the entry is
only acknowledged, as its letter exists. If the XADD fails (DLQ_KEY holds another type, Redis is out
of memory) the script stops before any write: the entry stays pending, and the error goes
to the error boundary (an outage is retried; a refusal exits 78).

Lua cannot pass more than about 8,000 values to one command, so a letter of an entry
with thousands of fields goes another way: WATCH the DLQ, check the entry is pending,
then MULTI, XADD, XACK, EXEC. An error queued in the transaction (out of memory) discards
it whole. The one gap: a consumer that claimed and ACKed the same entry between the
check and EXEC leaves a second letter; that takes thousands of fields and a claim within
the same few milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import redis.asyncio
from redis.exceptions import ResponseError, WatchError

from common.faults import unless_gone
from common.keys import lettered_key
from common.letters import SCRIPT_MAX_VALUES, letter_fields


WRITTEN, NOT_PENDING, LETTERED_BEFORE = 1, 0, 2  # what a letter's writing came to

# A group that is gone (the stream deleted, or Redis restarted without its data) holds nothing
# pending: NOGROUP reads as "not pending", and any other error is the script's reply.
# Poison that is not pending any more, yet has no letter and is still in the stream, gets its
# letter all the same (ARGV[3] '1': poison, which nobody can ever store): its consumer was
# deleted from the group (XGROUP DELCONSUMER), which drops pending entries without a trace.
# A row Postgres rejected ('0') may have been stored since by a consumer that claimed it.
# KEYS: stream, DLQ, failures, lettered. ARGV: group, entry id, poison, the letter's fields…
_DEAD_LETTER = """
local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if type(pending) == 'table' and pending.err then
  if string.sub(pending.err, 1, 7) ~= 'NOGROUP' then return pending end
  pending = {}
end
local noted = ARGV[2] .. ' ' .. ARGV[1]
local lettered = redis.call('ZSCORE', KEYS[4], noted)
if #pending == 0 and (ARGV[3] ~= '1' or lettered or #redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2]) == 0) then
  redis.call('HDEL', KEYS[3], ARGV[2])
  return 0
end
if not lettered then redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4)) end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
if lettered then return 2 end
redis.call('ZADD', KEYS[4], tonumber(string.match(ARGV[2], '^%d+')), noted)
return 1
"""


@dataclass(frozen=True)
class DeadLetter:
    entry_id: bytes
    fields: list[bytes]  # the original entry's flat [name, value, …] list, verbatim
    error: str
    error_kind: str  # "decode", "validate" or "write"
    failures: int

    @property
    def poison(self) -> bool:
        """The entry itself is at fault: nobody can ever store it (a "write" letter's row could be)."""
        return self.error_kind != "write"


class DeadLetters:
    """Writes the letters of one consumer; `stream`, `dlq` and `failures` are key names."""

    def __init__(self, client: redis.asyncio.Redis, stream: str, group: str, dlq: str, failures: str, consumer: str) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.dlq = dlq
        self.failures = failures
        self.lettered = lettered_key(stream)
        self.consumer = consumer

    def fields(self, letter: DeadLetter, failed_at: str) -> list[bytes | str | int]:
        added = (letter.error, letter.error_kind, letter.entry_id, self.stream, letter.failures, self.consumer, failed_at)
        return letter_fields(added, letter.fields)

    def split(self, letters: Sequence[DeadLetter]) -> tuple[list[list[bytes | str | int]], list[tuple[bytes, bool, list[bytes | str | int]]]]:
        """Each letter's fields: small ones for the script ([entry id, poison flag, fields…]), and
        large ones as (entry id, poison, fields)."""
        if not letters:
            return [], []
        failed_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        small, large = [], []
        for letter in letters:
            fields = self.fields(letter, failed_at)
            if len(fields) <= SCRIPT_MAX_VALUES:
                small.append([letter.entry_id, "1" if letter.poison else "0", *fields])
            else:
                large.append((letter.entry_id, letter.poison, fields))
        return small, large

    async def queue(self, pipe: redis.asyncio.client.Pipeline, small: list[list[bytes | str | int]]) -> None:
        """Queue the script calls of the small letters on `pipe` (one reply each: 1 written, 0 not pending).

        As EVAL with the script's text, not EVALSHA: a script flushed from Redis' cache between
        redis-py's check of a pipeline's scripts and its run failed the pipeline after some of its
        letters were written, and the retry could not count those (they were lettered by then).
        """
        keys = [self.stream, self.dlq, self.failures, self.lettered]
        for entry_id, poison, *fields in small:
            pipe.eval(_DEAD_LETTER, len(keys), *keys, self.group, entry_id, poison, *fields)

    async def write_large(self, entry_id: bytes, poison: bool, fields: list[bytes | str | int]) -> int:
        """One letter too large for the script; returns what the script would (WRITTEN, ...)."""
        noted = entry_id + b" " + self.group.encode()
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self.dlq, self.lettered)
                    lettered = await pipe.zscore(self.lettered, noted) is not None
                    if not await self._pending(pipe, entry_id) and (
                        not poison or lettered or not await pipe.xrange(self.stream, min=entry_id, max=entry_id)
                    ):
                        await pipe.unwatch()
                        await self.client.hdel(self.failures, entry_id)
                        return NOT_PENDING
                    kind = await pipe.type(self.dlq)
                    if kind not in (b"stream", b"none"):
                        raise ResponseError(f"WRONGTYPE DLQ_KEY {self.dlq} holds a {kind.decode()}, not a stream")
                    pipe.multi()
                    if not lettered:
                        pipe.execute_command("XADD", self.dlq, "*", *fields)
                        pipe.zadd(self.lettered, {noted: int(entry_id.split(b"-", 1)[0])})
                    pipe.xack(self.stream, self.group, entry_id)
                    pipe.hdel(self.failures, entry_id)
                    await pipe.execute()
                    return LETTERED_BEFORE if lettered else WRITTEN
                except WatchError:
                    continue  # another letter was added meanwhile: check again

    async def _pending(self, pipe: redis.asyncio.client.Pipeline, entry_id: bytes) -> bool:
        """Whether the entry is still pending in the group; not when the group is gone."""
        return bool(await unless_gone(pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1), []))
