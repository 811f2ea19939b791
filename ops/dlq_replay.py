"""`processor dlq replay`: put dead letters back into the input stream, field for field.

A letter's original entry is what common/letters.py's `split_letter` says it is: every
field of the entry verbatim, in order, repeated names and names equal to an added field's
included. Replay re-adds exactly that flat list to STREAM_KEY as a new entry and deletes
the letter, atomically per letter: a letter is either still in the DLQ or back in the input
stream, never both and never neither. Every check comes before the first write.

Two ways to write, both all-or-nothing over the letters they are given:

- normal letters: one Lua script call re-checks that every letter is still there, then
  adds and deletes. Lua cannot pass more than about 8,000 values to one command (its C
  stack), so only letters of up to SCRIPT_MAX_VALUES original values go this way;
- larger letters: WATCH DLQ_KEY, read and check the letters, then MULTI, XADD (the flat
  list as it is), a guarded XDEL, EXEC. A change of DLQ_KEY after the WATCH (another
  replay or purge, a new letter) discards the transaction and it starts again. Commands
  of a transaction are not rolled back, so the XDEL is done by a small script queued after
  the XADD that deletes only if STREAM_KEY is a stream, i.e. only if the XADD succeeded.

Named ids are all-or-nothing: when any of them is large, the whole set goes through one
transaction. `--all` pages through the DLQ; each page's normal letters go through one
script call, each large letter through its own transaction.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis
from redis.exceptions import WatchError

from common.config import Settings
from common.errors import ProcessorError
from common.letters import SCRIPT_MAX_VALUES, split_letter
from common.redis_client import text
from common.stream_pages import Pages
from ops.dlq_letters import UnknownLetters, checked_ids
from ops.errors import redis_client
from ops.terminal import count

REPLAY_PAGE = 100  # letters per page of `replay --all`: keeps each script call short
WATCH_BUDGET_S = 60.0  # how long a transaction is retried while DLQ_KEY keeps changing

# KEYS[1] the DLQ, KEYS[2] the input stream. ARGV[1] 'all' (all-or-nothing) or 'each', then
# per letter: its id, the number n of original values, those n values. Pass 1 checks that
# every letter is still there; pass 2 (skipped in 'all' mode when one is gone) re-adds the
# original values and deletes the letter. Only the first XADD can fail (STREAM_KEY of
# another type, out of memory), before anything was written. Reply: a flag (1 if pass 2
# ran), then id, status ('ok' | 'gone') and the new entry id (or '') for each letter.
_REPLAY = """
local letters, missing, i = {}, false, 2
while i <= #ARGV do
  local id, n = ARGV[i], tonumber(ARGV[i + 1])
  local present = #redis.call('XRANGE', KEYS[1], id, id) > 0
  if not present then missing = true end
  letters[#letters + 1] = {id, present, i + 2, i + 1 + n}
  i = i + 2 + n
end
local write = not (missing and ARGV[1] == 'all')
local reply = {write and 1 or 0}
for _, letter in ipairs(letters) do
  local id, present, value = letter[1], letter[2], ''
  if write and present then
    value = redis.call('XADD', KEYS[2], '*', unpack(ARGV, letter[3], letter[4]))
    redis.call('XDEL', KEYS[1], id)
  end
  reply[#reply + 1] = id
  reply[#reply + 1] = present and 'ok' or 'gone'
  reply[#reply + 1] = value
end
return reply
"""

# Queued after the XADDs of a transaction. KEYS[1] the DLQ, KEYS[2] the input stream, ARGV
# the letter ids. An XADD fails inside a transaction only when STREAM_KEY holds another
# type (out of memory discards the whole transaction), so STREAM_KEY being a stream means
# every XADD before this succeeded. Reply: letters deleted, or -1 (nothing deleted).
_DELETE_IF_ADDED = """
if redis.call('TYPE', KEYS[2]).ok ~= 'stream' then return -1 end
local deleted = 0
for i = 1, #ARGV do deleted = deleted + redis.call('XDEL', KEYS[1], ARGV[i]) end
return deleted
"""


@dataclass
class ReplayResult:
    stream: str
    replayed: list[tuple[str, str]] = field(default_factory=list)  # (letter id, new entry id)
    other_stream: list[tuple[str, str]] = field(default_factory=list)  # (letter id, its source_stream)
    empty: list[str] = field(default_factory=list)  # letters with no original field left
    gone: list[str] = field(default_factory=list)  # ids that name no letter (any more)

    def add(self, other: ReplayResult) -> None:
        self.replayed += other.replayed
        self.other_stream += other.other_stream
        self.empty += other.empty
        self.gone += other.gone

    def as_json(self) -> dict[str, object]:
        skipped: list[dict[str, object]] = [
            {"letter_id": letter, "reason": "other-stream", "source_stream": source} for letter, source in self.other_stream
        ]
        skipped += [{"letter_id": letter, "reason": "no-original-fields"} for letter in self.empty]
        return {
            "stream": self.stream,
            "replayed": [{"letter_id": letter, "entry_id": entry} for letter, entry in self.replayed],
            "skipped": skipped,
            "gone": self.gone,
        }

    def problem(self) -> str | None:
        """One line about the letters that stayed in the DLQ, if any."""
        parts = [f"{letter} came from stream {source!r}, not {self.stream!r}" for letter, source in self.other_stream]
        parts += [f"{letter} has no original fields" for letter in self.empty]
        if not parts:
            return None
        shown = ", ".join(parts[:5]) + (f" and {len(parts) - 5} more" if len(parts) > 5 else "")
        hint = " (set STREAM_KEY to the letter's source_stream to replay it)" if self.other_stream else ""
        return f"{count(len(parts), 'dead letter', 'dead letters')} not replayable: {shown}{hint}"


@dataclass(frozen=True)
class _Checked:
    """A letter read and found replayable, with its original entry's flat field list."""

    id: str
    original: list[bytes]


def replay(settings: Settings, letter_ids: Sequence[str]) -> ReplayResult:
    """Re-add the named letters' original entries to STREAM_KEY and delete the letters: all or nothing.

    Every letter is checked first (it exists, its source_stream is STREAM_KEY, it has
    original fields), and checked again in the step that writes; if any check fails
    nothing is written and a ProcessorError names the ids.
    """
    ids = checked_ids(letter_ids)
    with redis_client(settings.redis_url) as client:
        result = ReplayResult(settings.stream_key)
        letters = _check(settings, ids, _read(client, settings.dlq_key, ids), result)
        written = False
        if not (result.gone or result.problem()):
            if all(_small(letter) for letter in letters):
                written, result = _run_script(client, settings, letters, "all")
            else:
                written, result = _run_transaction(client, settings, ids)
    if written:
        return result
    if result.gone:
        problem = result.problem()
        extra = f"; also {problem}" if problem else ""
        raise UnknownLetters(settings.dlq_key, result.gone, "replayed", extra)
    raise ProcessorError(f"{result.problem()}; nothing was replayed")


def replay_all(settings: Settings) -> ReplayResult:
    """Replay every letter present when the command starts, oldest first, a page at a time.

    Letters written after the start (a replayed entry that fails again, say) are left for a
    later run, so this always ends. Letters from another stream, or without original
    fields, stay in the DLQ; letters that vanish meanwhile (someone else replayed or purged
    them) are listed as gone.
    """
    result = ReplayResult(settings.stream_key)
    with redis_client(settings.redis_url) as client:
        last = client.xrevrange(settings.dlq_key, count=1)
        if not last:
            return result
        end = text(last[0][0])
        pages = Pages(client, settings.dlq_key, "-", end=end, most=REPLAY_PAGE)  # fewer while letters are large
        while True:
            page = pages.next()
            if not page:
                return result
            ids = [text(entry_id) for entry_id, _ in page]
            letters = _check(settings, ids, [[entry] for entry in page], result)
            small: list[_Checked] = []
            for letter in letters:  # in order: a run of normal letters, then a large one alone
                if _small(letter):
                    small.append(letter)
                    continue
                result.add(_run_script(client, settings, small, "each")[1])
                result.add(_run_transaction(client, settings, [letter.id])[1])
                small = []
            result.add(_run_script(client, settings, small, "each")[1])
            if ids[-1] == end:  # Redis refuses an interval starting after the largest id there is
                return result


def _read(client: redis.Redis, dlq: str, ids: Sequence[str]) -> list[list[tuple[bytes, list[bytes]]]]:
    """Each id's XRANGE reply (an empty list for an unknown id), in one round trip."""
    with client.pipeline(transaction=False) as pipe:
        for letter_id in ids:
            pipe.xrange(dlq, min=letter_id, max=letter_id)
        return pipe.execute()  # type: ignore[no-any-return]


def _check(
    settings: Settings, ids: Sequence[str], found: Sequence[list[tuple[bytes, list[bytes]]]], result: ReplayResult
) -> list[_Checked]:
    """The replayable letters among `ids` (`found` holds each one's XRANGE reply); the others
    are noted in `result`: gone, from another stream, or without original fields."""
    letters = []
    for letter_id, entries in zip(ids, found):
        if not entries:
            result.gone.append(letter_id)
            continue
        parts = split_letter(entries[0][1])
        source = parts.added.get(b"source_stream", b"")
        if source != settings.stream_key.encode():
            result.other_stream.append((letter_id, text(source)))
        elif not parts.original:
            result.empty.append(letter_id)
        else:
            letters.append(_Checked(letter_id, parts.original))
    return letters


def _small(letter: _Checked) -> bool:
    return len(letter.original) <= SCRIPT_MAX_VALUES


def _run_script(client: redis.Redis, settings: Settings, letters: Sequence[_Checked], mode: str) -> tuple[bool, ReplayResult]:
    """Replay checked letters of up to SCRIPT_MAX_VALUES values each in one script call."""
    result = ReplayResult(settings.stream_key)
    if not letters:
        return True, result
    args: list[bytes | str | int] = [mode]
    for letter in letters:
        args += [letter.id, len(letter.original), *letter.original]
    reply = client.register_script(_REPLAY)(keys=[settings.dlq_key, settings.stream_key], args=args)
    written = bool(reply[0])
    for i in range(1, len(reply), 3):
        letter_id, status, entry_id = text(reply[i]), text(reply[i + 1]), text(reply[i + 2])
        if status == "gone":
            result.gone.append(letter_id)
        elif written:
            result.replayed.append((letter_id, entry_id))
    return written, result


def _run_transaction(client: redis.Redis, settings: Settings, ids: Sequence[str]) -> tuple[bool, ReplayResult]:
    """Replay the letters `ids`, of any size, all or nothing, in one WATCH/MULTI/EXEC.

    The letters are read and checked after the WATCH: if DLQ_KEY changes before EXEC,
    nothing is written and it starts again, for up to WATCH_BUDGET_S.
    """
    deadline = time.monotonic() + WATCH_BUDGET_S
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(settings.dlq_key)
                result = ReplayResult(settings.stream_key)
                letters = _check(settings, ids, _read(client, settings.dlq_key, ids), result)
                if result.gone or result.problem():
                    pipe.unwatch()
                    return False, result
                pipe.multi()
                for letter in letters:
                    pipe.execute_command("XADD", settings.stream_key, "*", *letter.original)
                pipe.eval(_DELETE_IF_ADDED, 2, settings.dlq_key, settings.stream_key, *ids)
                replies = pipe.execute()  # raises the XADD's error, if any: then nothing was deleted
            except WatchError:
                if time.monotonic() < deadline:
                    continue
                raise ProcessorError(
                    f"{settings.dlq_key} changed during every attempt for {WATCH_BUDGET_S:.0f} s; "
                    f"{count(len(ids), 'dead letter', 'dead letters')} not replayed: {', '.join(ids[:10])}"
                ) from None
            result.replayed = [(letter.id, text(entry_id)) for letter, entry_id in zip(letters, replies)]
            return True, result


def format_replay(result: ReplayResult) -> list[str]:
    lines = [f"replayed {count(len(result.replayed), 'dead letter', 'dead letters')} into {result.stream}"]
    lines += [f"  {letter} -> {entry}" for letter, entry in result.replayed]
    if result.gone:
        lines.append(f"({count(len(result.gone), 'letter', 'letters')} disappeared meanwhile: "
                     "replayed or purged by someone else)")
    return lines
