"""`processor dlq replay`: put dead letters back into the input stream with their original fields.

Redis is changed only through a Lua script, so each step is atomic: a letter is either
still in the DLQ or back in the input stream with its original fields, never both and
never neither. With explicit ids it is all-or-nothing: every id is checked inside the
script before anything is written, so one unknown id changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import redis

from common.config import Settings
from common.errors import ProcessorError
from common.keys import DLQ_ERROR_FIELDS
from ops.dlq_letters import UnknownLetters, checked_ids
from ops.errors import redis_client
from ops.terminal import count, text

REPLAY_PAGE = 100  # letters per script call of `replay --all`: keeps each call short

# KEYS[1] the DLQ, KEYS[2] the input stream. ARGV[1] 'all' (all-or-nothing) or 'each',
# ARGV[2] how many error-field names follow, then those names, then the letter ids.
# Pass 1 reads every letter and checks it; pass 2 (skipped in 'all' mode when any check
# failed) re-adds the original fields and deletes the letter. Reply: a flag (1 if pass 2
# ran), then id, status ('ok' | 'gone' | 'source' | 'empty'), value (the new entry id, or
# the letter's source_stream) for each letter.
_REPLAY = """
local strip = {}
local n = tonumber(ARGV[2])
for i = 3, 2 + n do strip[ARGV[i]] = true end
local checked, originals, seen, problem = {}, {}, {}, false
for i = 3 + n, #ARGV do
  local id = ARGV[i]
  if not seen[id] then
    seen[id] = true
    local status, value = 'ok', ''
    local found = redis.call('XRANGE', KEYS[1], id, id)
    if #found == 0 then
      status = 'gone'
    else
      local fields, keep, source = found[1][2], {}, ''
      for j = 1, #fields, 2 do
        if fields[j] == 'source_stream' then source = fields[j + 1] end
        if not strip[fields[j]] then
          keep[#keep + 1] = fields[j]
          keep[#keep + 1] = fields[j + 1]
        end
      end
      if source ~= KEYS[2] then
        status, value = 'source', source
      elseif #keep == 0 then
        status = 'empty'
      else
        originals[id] = keep
      end
    end
    if status ~= 'ok' then problem = true end
    checked[#checked + 1] = {id, status, value}
  end
end
local write = not (problem and ARGV[1] == 'all')
local reply = {write and 1 or 0}
for _, item in ipairs(checked) do
  local id, status, value = item[1], item[2], item[3]
  if write and status == 'ok' then
    value = redis.call('XADD', KEYS[2], '*', unpack(originals[id]))
    redis.call('XDEL', KEYS[1], id)
  end
  reply[#reply + 1] = id
  reply[#reply + 1] = status
  reply[#reply + 1] = value
end
return reply
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


def replay(settings: Settings, letter_ids: Sequence[str]) -> ReplayResult:
    """Re-add the named letters' original fields to STREAM_KEY and delete the letters: all or nothing.

    In one script call every letter is checked first (it exists, and its source_stream is
    STREAM_KEY); if any check fails nothing is written and a ProcessorError names the ids.
    """
    ids = checked_ids(letter_ids)
    with redis_client(settings.redis_url) as client:
        written, result = _run_replay(client, settings, ids, "all")
    if written:
        return result
    if result.gone:
        problem = result.problem()
        extra = f"; also {problem}" if problem else ""
        raise UnknownLetters(settings.dlq_key, result.gone, "replayed", extra)
    raise ProcessorError(f"{result.problem()}; nothing was replayed")


def replay_all(settings: Settings) -> ReplayResult:
    """Replay every letter present when the command starts, oldest first, a page per script call.

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
        start = "-"
        while True:
            page = client.xrange(settings.dlq_key, min=start, max=end, count=REPLAY_PAGE)
            if not page:
                return result
            ids = [text(entry_id) for entry_id, _ in page]
            result.add(_run_replay(client, settings, ids, "each")[1])
            start = f"({ids[-1]}"


def _run_replay(client: redis.Redis, settings: Settings, ids: Sequence[str], mode: str) -> tuple[bool, ReplayResult]:
    script = client.register_script(_REPLAY)
    reply = script(keys=[settings.dlq_key, settings.stream_key], args=[mode, len(DLQ_ERROR_FIELDS), *DLQ_ERROR_FIELDS, *ids])
    result = ReplayResult(settings.stream_key)
    written = bool(reply[0])
    for i in range(1, len(reply), 3):
        letter, status, value = text(reply[i]), text(reply[i + 1]), text(reply[i + 2])
        if status == "ok" and written:
            result.replayed.append((letter, value))
        elif status == "source":
            result.other_stream.append((letter, value))
        elif status == "empty":
            result.empty.append(letter)
        elif status == "gone":
            result.gone.append(letter)
    return written, result


def format_replay(result: ReplayResult) -> list[str]:
    lines = [f"replayed {count(len(result.replayed), 'dead letter', 'dead letters')} into {result.stream}"]
    lines += [f"  {letter} -> {entry}" for letter, entry in result.replayed]
    if result.gone:
        lines.append(f"({count(len(result.gone), 'letter', 'letters')} disappeared meanwhile: "
                     "replayed or purged by someone else)")
    return lines
