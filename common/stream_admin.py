"""Operator commands on the input stream and the dead-letter stream (SPEC §5, §7).

`processor lag` and `processor dlq list|show|replay|purge`. The CLI parses arguments and
prints; the work (and the text it prints) is done here. Every failure is a ProcessorError
with a one-line message that never shows a password.

Replay and purge change Redis only through Lua scripts, so each step is atomic: a letter is
either still in the DLQ or (for replay) back in the input stream with its original fields,
never both and never neither. With explicit ids both are all-or-nothing: every id is
checked inside the script before anything is written, so one unknown id changes nothing.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson
import redis

from common.config import Settings, redact_url
from common.errors import ExitCode, ProcessorError
from common.keys import DATA_FIELD, DLQ_ERROR_FIELDS
from common.logs import scrub

REDIS_TIMEOUT_S = 10.0
CLIENT_NAME = "processor-cli"

# Counting undelivered entries when Redis cannot report the lag: page size, and how many
# entries we read at most before settling for a lower bound (each page carries the fields).
LAG_COUNT_PAGE = 1_000
LAG_COUNT_LIMIT = 200_000

DLQ_LIST_DEFAULT = 20
REPLAY_PAGE = 100  # letters per script call of `replay --all`: keeps each call short
MAX_IDS = 10_000  # explicit ids per command, checked and written in one script call
ERROR_COLUMN_CHARS = 60
CELL_CHARS = 40

_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


class UsageError(ProcessorError):
    """The command line asks for something that cannot be done as asked (exit 2)."""

    exit_code = ExitCode.USAGE


class UnknownLetters(ProcessorError):
    """Some ids name no dead letter; nothing was changed."""

    def __init__(self, dlq: str, ids: Sequence[str], action: str, extra: str = "") -> None:
        noun = "dead letter" if len(ids) == 1 else "dead letters"
        shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
        super().__init__(f"no {noun} with id {shown} in {dlq}{extra}; nothing was {action}")
        self.ids = list(ids)


def check_entry_id(text: str) -> str:
    """A complete stream id `<ms>-<seq>`; raises ValueError otherwise (argparse turns it into exit 2)."""
    if not _STREAM_ID.match(text):
        raise ValueError(f"not a stream entry id (<milliseconds>-<sequence>, e.g. 1718000000000-0): {text!r}")
    return text


# --- Redis ----------------------------------------------------------------------------


@contextmanager
def connect(settings: Settings) -> Iterator[redis.Redis]:
    """A client returning bytes; Redis failures become one-line ProcessorErrors."""
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        client_name=CLIENT_NAME,
    )
    try:
        yield client
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise ProcessorError(f"cannot reach Redis at {redact_url(settings.redis_url)}: {_one_line(exc)}") from None
    except redis.ResponseError as exc:
        raise ProcessorError(f"Redis rejected the command: {_one_line(exc)}") from None
    except redis.RedisError as exc:
        raise ProcessorError(f"Redis at {redact_url(settings.redis_url)} failed: {_one_line(exc)}") from None
    finally:
        client.close()


def _one_line(exc: BaseException) -> str:
    return scrub(" ".join(str(exc).split()) or type(exc).__name__)


# --- lag ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lag:
    """Entries in the stream after the group's last-delivered-id (not yet delivered to anyone)."""

    count: int
    exact: bool  # False: `count` is a lower bound (counting stopped at LAG_COUNT_LIMIT)
    source: str  # "redis" (XINFO GROUPS), "counted" (Redis said nil), "no-group"


def group_lag(
    client: redis.Redis, stream: str, group: dict[str, Any], limit: int = LAG_COUNT_LIMIT, page_size: int = LAG_COUNT_PAGE
) -> Lag:
    """The group's lag from XINFO GROUPS, or counted when Redis reports it as nil.

    Redis (7.0+) returns a nil lag when it cannot derive it from its counters: after XDEL or
    XTRIM left a deleted id beyond the group's last-delivered-id, `entries-added` still
    counts the deleted entries, so `entries-added - entries-read` would overstate the lag
    (and `entries-read` itself may be nil); we therefore do not use that arithmetic. Instead
    we count the entries after last-delivered-id with XRANGE, and at the same time the
    entries up to it with XREVRANGE, page by page; whichever side ends first gives the
    answer (directly, or as XLEN minus the delivered part). So the work is bounded by the
    smaller side, never by the whole stream, and by `limit` entries in all; past that the
    forward count is reported as a lower bound. Entries added while counting may be counted
    too: the number is a snapshot, like Redis' own.
    """
    if group.get("lag") is not None:
        return Lag(int(group["lag"]), True, "redis")
    last_delivered = _text(group["last-delivered-id"])
    length = int(client.xlen(stream))
    after, upto = 0, 0
    forward_from, backward_from = f"({last_delivered}", last_delivered
    while after + upto < limit:
        page = client.xrange(stream, min=forward_from, max="+", count=page_size)
        after += len(page)
        if len(page) < page_size:
            return Lag(after, True, "counted")
        forward_from = f"({_text(page[-1][0])}"
        page = client.xrevrange(stream, max=backward_from, min="-", count=page_size)
        upto += len(page)
        if len(page) < page_size:
            return Lag(max(length - upto, 0), True, "counted")
        backward_from = f"({_text(page[-1][0])}"
    return Lag(after, False, "counted")


@dataclass(frozen=True)
class OldestPending:
    id: str
    consumer: str
    age_ms: int  # since the entry was added (from its id's time part)
    idle_ms: int  # since it was last delivered
    deliveries: int

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "consumer": self.consumer,
            "age_ms": self.age_ms,
            "idle_ms": self.idle_ms,
            "deliveries": self.deliveries,
        }


@dataclass(frozen=True)
class ConsumerInfo:
    name: str
    pending: int
    idle_ms: int  # since the consumer last read or claimed

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "pending": self.pending, "idle_ms": self.idle_ms}


@dataclass(frozen=True)
class LagReport:
    stream: str
    group: str
    dlq: str
    stream_exists: bool
    group_exists: bool
    length: int
    last_delivered_id: str | None
    lag: Lag
    pending: int
    oldest_pending: OldestPending | None
    consumers: list[ConsumerInfo]
    dlq_length: int

    def as_json(self) -> dict[str, object]:
        return {
            "stream": self.stream,
            "group": self.group,
            "stream_exists": self.stream_exists,
            "group_exists": self.group_exists,
            "length": self.length,
            "last_delivered_id": self.last_delivered_id,
            "lag": self.lag.count,
            "lag_exact": self.lag.exact,
            "lag_source": self.lag.source,
            "pending": self.pending,
            "oldest_pending": self.oldest_pending.as_json() if self.oldest_pending else None,
            "consumers": [c.as_json() for c in self.consumers],
            "dlq": self.dlq,
            "dlq_length": self.dlq_length,
        }


def lag_report(settings: Settings) -> LagReport:
    """Length, lag, pending entries and consumers of the group, and the DLQ's length.

    A missing stream or group is not an error: the Processor creates both at start-up.
    Without a group, every entry in the stream counts as lag (the group starts at id 0).
    """
    stream, group_name = settings.stream_key, settings.consumer_group
    with connect(settings) as client:
        dlq_length = int(client.xlen(settings.dlq_key))
        length = int(client.xlen(stream))
        stream_exists = bool(client.exists(stream))
        group = _find_group(client, stream, group_name) if stream_exists else None
        if group is None:
            return LagReport(
                stream, group_name, settings.dlq_key, stream_exists, False, length, None,
                Lag(length, True, "no-group"), 0, None, [], dlq_length,
            )
        lag = group_lag(client, stream, group)
        consumers = [
            ConsumerInfo(_text(c["name"]), int(c["pending"]), int(c["idle"]))
            for c in client.xinfo_consumers(stream, group_name)
        ]
        oldest = _oldest_pending(client, stream, group_name)
    return LagReport(
        stream, group_name, settings.dlq_key, True, True, length, _text(group["last-delivered-id"]), lag,
        int(group["pending"]), oldest, consumers, dlq_length,
    )


def _find_group(client: redis.Redis, stream: str, name: str) -> dict[str, Any] | None:
    wanted = name.encode()
    return next((g for g in client.xinfo_groups(stream) if g["name"] == wanted), None)


def _oldest_pending(client: redis.Redis, stream: str, group: str) -> OldestPending | None:
    """The smallest pending id (XPENDING's summary) with its idle time and delivery count."""
    summary = client.xpending(stream, group)
    if not summary["pending"]:
        return None
    oldest_id = summary["min"]
    details = client.xpending_range(stream, group, oldest_id, oldest_id, 1)
    seconds, micros = client.time()  # Redis' clock, not ours: ids are stamped by Redis
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    added_ms = int(_text(oldest_id).split("-")[0])
    if not details:  # acknowledged in between
        return OldestPending(_text(oldest_id), "-", max(now_ms - added_ms, 0), 0, 0)
    entry = details[0]
    return OldestPending(
        _text(oldest_id),
        _text(entry["consumer"]),
        max(now_ms - added_ms, 0),
        int(entry["time_since_delivered"]),
        int(entry["times_delivered"]),
    )


def format_lag(report: LagReport) -> list[str]:
    """The report as aligned lines for a terminal."""
    lines = [f"stream        {report.stream}: {_count(report.length, 'entry', 'entries')}"]
    if not report.stream_exists:
        lines[0] = f"stream        {report.stream}: does not exist yet (nothing was added)"
    if not report.group_exists:
        lines.append(f"group         {report.group}: not created yet (the Processor creates it at start-up; "
                     f"{_count(report.lag.count, 'entry', 'entries')} waiting)")
    else:
        lag = f"{report.lag.count}" if report.lag.exact else f"at least {report.lag.count}"
        how = "" if report.lag.source == "redis" else " (counted: Redis reports no lag after deletions)"
        lines.append(f"group         {report.group}: lag {lag}{how}, last delivered {report.last_delivered_id}")
        pending = f"pending       {report.pending}"
        oldest = report.oldest_pending
        if oldest is not None:
            pending += (f", oldest {oldest.id} added {format_ms(oldest.age_ms)} ago, idle {format_ms(oldest.idle_ms)}, "
                        f"consumer {_cell(oldest.consumer)}, delivered {_count(oldest.deliveries, 'time', 'times')}")
        lines.append(pending)
    lines.append(f"dead letters  {report.dlq}: {report.dlq_length}")
    if report.consumers:
        table = [("CONSUMER", "PENDING", "IDLE")]
        table += [(_cell(c.name), str(c.pending), format_ms(c.idle_ms)) for c in report.consumers]
        lines += ["", *table_lines(table)]
    elif report.group_exists:
        lines.append("(no consumers have joined the group)")
    return lines


# --- dead letters: reading ------------------------------------------------------------


@dataclass(frozen=True)
class Letter:
    """One dead letter: the original entry's fields plus the error fields (SPEC §5)."""

    id: str
    fields: dict[bytes, bytes]

    def get(self, name: str) -> str | None:
        value = self.fields.get(name.encode())
        return None if value is None else _text(value)

    @property
    def original(self) -> dict[bytes, bytes]:
        """The fields as the entry had them in the input stream."""
        return {k: v for k, v in self.fields.items() if k.decode("utf-8", "replace") not in DLQ_ERROR_FIELDS}

    @property
    def data(self) -> object | None:
        """The parsed `data` field, or None when it is missing or not JSON."""
        raw = self.fields.get(DATA_FIELD)
        if raw is None:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None

    @property
    def device_id(self) -> str | None:
        data = self.data
        device_id = data.get("device_id") if isinstance(data, dict) else None
        return device_id if isinstance(device_id, str) else None

    def summary(self) -> dict[str, object]:
        failures = self.get("failures")
        return {
            "id": self.id,
            "failed_at": self.get("failed_at"),
            "error_kind": self.get("error_kind"),
            "source_id": self.get("source_id"),
            "source_stream": self.get("source_stream"),
            "failures": int(failures) if failures and failures.isdigit() else failures,
            "consumer": self.get("consumer"),
            "device_id": self.device_id,
            "error": self.get("error"),
        }

    def as_json(self) -> dict[str, object]:
        """Every field as text; values that are not UTF-8 also exactly, base64-encoded."""
        binary = {_text(k): base64.b64encode(v).decode() for k, v in self.fields.items() if not _is_utf8(v)}
        return {"id": self.id, "fields": {_text(k): _text(v) for k, v in self.fields.items()},
                "fields_base64": binary, "data": self.data}


@dataclass(frozen=True)
class LetterPage:
    dlq: str
    length: int
    letters: list[Letter]
    more: bool  # letters follow the last one listed

    def as_json(self) -> dict[str, object]:
        return {
            "dlq": self.dlq,
            "length": self.length,
            "letters": [letter.summary() for letter in self.letters],
            "next_after": self.letters[-1].id if self.more else None,
        }


def list_letters(settings: Settings, limit: int, after: str | None = None) -> LetterPage:
    """Up to `limit` dead letters, oldest first, after the id `after` (exclusive) if given."""
    with connect(settings) as client:
        start = f"({after}" if after else "-"
        entries = client.xrange(settings.dlq_key, min=start, max="+", count=limit + 1)
        length = int(client.xlen(settings.dlq_key))
    letters = [Letter(_text(i), dict(f)) for i, f in entries[:limit]]
    return LetterPage(settings.dlq_key, length, letters, len(entries) > limit)


def show_letter(settings: Settings, letter_id: str) -> Letter:
    with connect(settings) as client:
        found = client.xrange(settings.dlq_key, min=letter_id, max=letter_id)
    if not found:
        raise UnknownLetters(settings.dlq_key, [letter_id], "shown")
    return Letter(letter_id, dict(found[0][1]))


def format_letter_page(page: LetterPage) -> list[str]:
    if not page.letters:
        return [f"{page.dlq}: no dead letters" + (" after that id" if page.length else "")]
    table = [("ID", "FAILED_AT", "KIND", "SOURCE_ID", "DEVICE_ID", "ERROR")]
    for letter in page.letters:
        table.append((
            letter.id,
            _cell(letter.get("failed_at")),
            _cell(letter.get("error_kind")),
            _cell(letter.get("source_id")),
            _cell(letter.device_id),
            _cell(letter.get("error"), ERROR_COLUMN_CHARS),
        ))
    shown = f"{len(page.letters)} of {page.length} dead letters in {page.dlq}, oldest first"
    more = f"; next page: --after {page.letters[-1].id}" if page.more else ""
    return [*table_lines(table), f"({shown}{more})"]


def format_letter(letter: Letter) -> list[str]:
    """Error fields first, then the original fields; `data` pretty-printed when it is JSON."""
    lines = [f"dead letter {letter.id}"]
    names = [n for n in DLQ_ERROR_FIELDS if n.encode() in letter.fields]
    width = max(len(n) for n in [*DLQ_ERROR_FIELDS, "data"]) + 2
    for name in names:
        lines.append(f"  {name.ljust(width)}{_printable(letter.get(name) or '')}")
    lines.append("original fields:")
    for raw_name, raw_value in letter.original.items():
        name = _printable(_text(raw_name))
        data = letter.data if raw_name == DATA_FIELD else None
        if data is not None:
            pretty = orjson.dumps(data, option=orjson.OPT_INDENT_2).decode().splitlines()
            lines.append(f"  {name.ljust(width)}(JSON)")
            lines += [f"    {_printable(line)}" for line in pretty]
        else:
            lines.append(f"  {name.ljust(width)}{_printable(_text(raw_value))}")
    if not letter.original:
        lines.append("  (none)")
    return lines


# --- dead letters: replay -------------------------------------------------------------

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
        return f"{_count(len(parts), 'dead letter', 'dead letters')} not replayable: {shown}{hint}"


def replay(settings: Settings, letter_ids: Sequence[str]) -> ReplayResult:
    """Re-add the named letters' original fields to STREAM_KEY and delete the letters: all or nothing.

    In one script call every letter is checked first (it exists, and its source_stream is
    STREAM_KEY); if any check fails nothing is written and a ProcessorError names the ids.
    """
    ids = _checked_ids(letter_ids)
    with connect(settings) as client:
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
    with connect(settings) as client:
        last = client.xrevrange(settings.dlq_key, count=1)
        if not last:
            return result
        end = _text(last[0][0])
        start = "-"
        while True:
            page = client.xrange(settings.dlq_key, min=start, max=end, count=REPLAY_PAGE)
            if not page:
                return result
            ids = [_text(entry_id) for entry_id, _ in page]
            result.add(_run_replay(client, settings, ids, "each")[1])
            start = f"({ids[-1]}"


def _run_replay(client: redis.Redis, settings: Settings, ids: Sequence[str], mode: str) -> tuple[bool, ReplayResult]:
    script = client.register_script(_REPLAY)
    reply = script(keys=[settings.dlq_key, settings.stream_key], args=[mode, len(DLQ_ERROR_FIELDS), *DLQ_ERROR_FIELDS, *ids])
    result = ReplayResult(settings.stream_key)
    written = bool(reply[0])
    for i in range(1, len(reply), 3):
        letter, status, value = _text(reply[i]), _text(reply[i + 1]), _text(reply[i + 2])
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
    lines = [f"replayed {_count(len(result.replayed), 'dead letter', 'dead letters')} into {result.stream}"]
    lines += [f"  {letter} -> {entry}" for letter, entry in result.replayed]
    if result.gone:
        lines.append(f"({_count(len(result.gone), 'letter', 'letters')} disappeared meanwhile: "
                     "replayed or purged by someone else)")
    return lines


# --- dead letters: purge --------------------------------------------------------------

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

Confirm = Callable[[str], bool]


class ConfirmationRequired(UsageError):
    """A destructive command without --yes, and no terminal to ask on."""


class Declined(ProcessorError):
    """The operator answered no."""


def confirmer(assume_yes: bool, stdin: TextIO, stderr: TextIO) -> Confirm:
    """Ask on the terminal; --yes skips the question; without a terminal and --yes, refuse (exit 2)."""
    if assume_yes:
        return lambda _question: True
    if not stdin.isatty():
        raise ConfirmationRequired("refusing to delete without confirmation: stdin is not a terminal; pass --yes")

    def ask(question: str) -> bool:
        stderr.write(f"{question} [y/N] ")
        stderr.flush()
        return stdin.readline().strip().lower() in ("y", "yes")

    return ask


@dataclass(frozen=True)
class PurgeResult:
    dlq: str
    purged: int
    ids: list[str] | None  # None for --all

    def as_json(self) -> dict[str, object]:
        return {"dlq": self.dlq, "purged": self.purged, "ids": self.ids}


def purge(settings: Settings, letter_ids: Sequence[str], confirm: Confirm) -> PurgeResult:
    """Delete the named letters, all or nothing: one unknown id and nothing is deleted."""
    ids = _checked_ids(letter_ids)
    with connect(settings) as client:
        missing = [i for i in ids if not client.xrange(settings.dlq_key, min=i, max=i)]
        if missing:  # before asking; the script checks again
            raise UnknownLetters(settings.dlq_key, missing, "deleted")
        if not confirm(f"Delete {_count(len(ids), 'dead letter', 'dead letters')} from {settings.dlq_key}?"):
            raise Declined("not confirmed; nothing was deleted")
        reply = client.register_script(_PURGE)(keys=[settings.dlq_key], args=ids)
    if len(reply) > 1:
        raise UnknownLetters(settings.dlq_key, [_text(i) for i in reply[1:]], "deleted")
    return PurgeResult(settings.dlq_key, int(reply[0]), ids)


def purge_all(settings: Settings, confirm: Confirm) -> PurgeResult:
    """Delete every letter up to the newest one present when asked; later letters stay.

    XTRIM MINID keeps the stream key (and any consumer group on it) while emptying it.
    """
    with connect(settings) as client:
        length = int(client.xlen(settings.dlq_key))
        last = client.xrevrange(settings.dlq_key, count=1)
        if not last:
            return PurgeResult(settings.dlq_key, 0, None)
        end = _text(last[0][0])
        question = f"Delete all {_count(length, 'dead letter', 'dead letters')} from {settings.dlq_key} (up to {end})?"
        if not confirm(question):
            raise Declined("not confirmed; nothing was deleted")
        purged = int(client.xtrim(settings.dlq_key, minid=_next_id(end), approximate=False))
    return PurgeResult(settings.dlq_key, purged, None)


def format_purge(result: PurgeResult) -> list[str]:
    return [f"deleted {_count(result.purged, 'dead letter', 'dead letters')} from {result.dlq}"]


# --- text -----------------------------------------------------------------------------


def format_counts(counts: dict[str, object]) -> str:
    """`claimed 3, stored 2, dead lettered 1, gone 0` from a dict of counts."""
    return ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in counts.items())


def format_ms(ms: int) -> str:
    """A duration for people: 850ms, 12.3s, 4m05s, 2h03m, 3d04h."""
    if ms < 1_000:
        return f"{ms}ms"
    seconds = ms / 1_000
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def table_lines(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _text(value: bytes | str) -> str:
    """Text of a Redis value; bytes that are not UTF-8 appear as \\xNN escapes."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _printable(text: str) -> str:
    """Control and other unprintable characters escaped, so data cannot drive the terminal."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _cell(text: str | None, width: int = CELL_CHARS) -> str:
    if text is None or text == "":
        return "-"
    text = _printable(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _checked_ids(ids: Sequence[str]) -> list[str]:
    """The ids without repeats; at most MAX_IDS, as one script call checks and writes them all."""
    unique = list(dict.fromkeys(ids))
    if not unique:
        raise UsageError("no dead-letter ids given")
    if len(unique) > MAX_IDS:
        raise UsageError(f"at most {MAX_IDS} ids at once; use --all or several runs")
    return unique


def _next_id(entry_id: str) -> str:
    """The smallest id after `entry_id`."""
    ms, seq = (int(part) for part in entry_id.split("-"))
    return f"{ms}-{seq + 1}" if seq < 2**64 - 1 else f"{ms + 1}-0"
