"""Replies Redis sent but the network lost: the code that knows what each one meant deals with it.

A proxy between the processor and Redis lets a command through, lets Redis run it, then
drops its reply and closes the connection. Entries an XREADGROUP delivered into that lost
reply are processed within seconds, not a claim threshold later; a failure count whose
reply was lost is not counted twice when it is sent again.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import closing

import orjson
import psycopg
import pytest

from common.keys import failures_key
from scripts.toolkit.fleet import Fleet
from scripts.toolkit.writer import produce
from supervisor.migrations import apply_migrations
from tests.e2e.processes import ProcessorProcess, wait_for
from tests.e2e.test_outages import CuttableProxy
from tests.e2e.verify import assert_exact, pending_count, stored_count, wait_settled

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# Left at its default: a claim could not rescue entries stuck in a lost reply in time.
CLAIM_THRESHOLD_MS = 60_000
SETTLE_TIMEOUT_S = 15.0
COUNT_TIMEOUT_S = 30.0  # one entry per batch: slower, and not about claiming
MAX_FAILURES = 3
REJECTED_DEVICE = "reject-me"

Command = list[bytes]


def parse_commands(buffer: bytes) -> tuple[list[Command], bytes]:
    """The complete RESP commands (arrays of bulk strings) at the start of `buffer`, and the rest."""
    commands, position = [], 0
    while True:
        command, end = _parse_command(buffer, position)
        if command is None:
            return commands, buffer[position:]
        commands.append(command)
        position = end


def _parse_command(buffer: bytes, position: int) -> tuple[Command | None, int]:
    header_end = buffer.find(b"\r\n", position)
    if header_end < 0:
        return None, position
    assert buffer[position : position + 1] == b"*", "redis-py sends every command as a RESP array"
    args: Command = []
    cursor = header_end + 2
    for _ in range(int(buffer[position + 1 : header_end])):
        length_end = buffer.find(b"\r\n", cursor)
        if length_end < 0:
            return None, position
        start = length_end + 2
        end = start + int(buffer[cursor + 1 : length_end])
        if len(buffer) < end + 2:
            return None, position
        args.append(buffer[start:end])
        cursor = end + 2
    return args, cursor


def delivered(reply: bytes) -> bool:
    """The reply says the command did something: not an error (e.g. NOSCRIPT) nor an empty read."""
    return not reply.startswith((b"-", b"*-1", b"$-1"))


class ReplyLosingProxy(CuttableProxy):
    """Forwards everything, except the reply of the `nth` command matching `matches` that did
    something: Redis runs that command, its reply is dropped and both sides of the
    connection are closed."""

    def __init__(self, upstream_url: str) -> None:
        super().__init__(upstream_url)
        self.matches: Callable[[Command], bool] = lambda command: False
        self.remaining = 0
        self.dropped: list[Command] = []
        self.awaiting: dict[socket.socket, Command | None] = {}  # server socket -> matched command in flight

    def lose_reply(self, matches: Callable[[Command], bool], nth: int = 1) -> None:
        with self.lock:
            self.matches, self.remaining = matches, nth

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            if replies:
                self._pump_replies(server=source, client=sink)
            else:
                self._pump_commands(client=source, server=sink)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                self._close(sock)

    def _pump_commands(self, client: socket.socket, server: socket.socket) -> None:
        pending = b""
        while data := client.recv(65_536):
            commands, pending = parse_commands(pending + data)
            with self.lock:
                if self.remaining:
                    matched = [command for command in commands if self.matches(command)]
                    if matched:
                        self.awaiting[server] = matched[0]  # before Redis can see it, let alone answer
            server.sendall(data)

    def _pump_replies(self, server: socket.socket, client: socket.socket) -> None:
        while data := server.recv(65_536):
            with self.lock:
                command = self.awaiting.pop(server, None)
                if command is not None and self.remaining and delivered(data):
                    self.remaining -= 1
                    if not self.remaining:
                        self.dropped.append(command)
                        return  # Redis ran it; nobody hears of it: `_pump` closes both sides
            client.sendall(data)


@pytest.fixture
def proxy(redis_url: str) -> Iterator[ReplyLosingProxy]:
    with closing(ReplyLosingProxy(redis_url)) as proxy:
        yield proxy


def reads_new_entries(command: Command) -> bool:
    return command[0].upper() == b"XREADGROUP" and command[-1] == b">"


def counts_failures(stream_key: str) -> Callable[[Command], bool]:
    """The call that counts failures of rejected rows: a script with the failures hash as its
    one key (or, as an earlier version did, HINCRBY of that hash)."""
    key = failures_key(stream_key, "processor").encode()

    def matches(command: Command) -> bool:
        name = command[0].upper()
        if name in (b"EVALSHA", b"EVAL"):
            return command[2:4] == [b"1", key]
        return name == b"HINCRBY" and command[1] == key

    return matches


def start(start_processor, env: dict[str, str], proxy: ReplyLosingProxy, **extra: str) -> ProcessorProcess:  # type: ignore[no-untyped-def]
    env = {**env, "REDIS_URL": proxy.url, "SHARDS": "1", "CLAIM_THRESHOLD_MS": str(CLAIM_THRESHOLD_MS), **extra}
    processor = start_processor(env)
    processor.wait_for_shards(1)
    return processor


@pytest.mark.parametrize("nth", [1, 3])
def test_entries_of_a_lost_read_reply_are_processed_at_once(
    redis_client, database_url, stream_key, env, proxy, start_processor, nth
):
    """The nth XREADGROUP > that delivers entries runs in Redis, its reply is lost: those
    entries sit in the shard's own pending list. The shard re-reads it after the outage, so
    every entry is stored within seconds, not after CLAIM_THRESHOLD_MS."""
    apply_migrations(database_url)
    produce(redis_client, stream_key, Fleet(50, seed=41).fixes(3_000))  # six reads of BATCH_SIZE 500
    proxy.lose_reply(reads_new_entries, nth)
    started = time.monotonic()
    processor = start(start_processor, env, proxy)

    wait_settled(redis_client, database_url, stream_key, SETTLE_TIMEOUT_S)
    assert time.monotonic() - started < CLAIM_THRESHOLD_MS / 1000 / 2
    assert len(proxy.dropped) == 1, "one read's reply was lost"
    assert_exact(redis_client, database_url, stream_key)
    assert redis_client.xlen(f"{stream_key}:dlq") == 0
    messages = processor.log_messages()
    assert "re-reading own pending entries after a Redis outage" in messages
    assert "entries claimed" not in messages


def reject_and_count(database_url: str, device_id: str) -> None:
    """Postgres rejects the device's rows (CHECK violation) and counts each rejection in a
    sequence, which a rolled-back transaction does not undo."""
    apply_migrations(database_url)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            f"""
            CREATE SEQUENCE rejections;
            CREATE FUNCTION reject_device() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF NEW.device_id = '{device_id}' THEN
                PERFORM nextval('rejections');
                RAISE EXCEPTION 'device {device_id} is not welcome' USING ERRCODE = 'check_violation';
              END IF;
              RETURN NEW;
            END $$;
            CREATE TRIGGER reject_device BEFORE INSERT ON positions FOR EACH ROW EXECUTE FUNCTION reject_device();
            GRANT USAGE ON SEQUENCE rejections TO processor_runtime;  -- the trigger runs as the shards' role
            """
        )


def rejections(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        last_value, is_called = conn.execute("SELECT last_value, is_called FROM rejections").fetchone()
    return last_value if is_called else 0


@pytest.mark.parametrize("nth", [1, MAX_FAILURES])
def test_a_failure_count_whose_reply_was_lost_counts_once(
    redis_client, database_url, stream_key, env, proxy, start_processor, nth
):
    """The reply of the nth failure count is lost and the count is sent again: each rejected
    entry is still written exactly MAX_FAILURES times and dead-lettered with failures ==
    MAX_FAILURES; every other entry is stored once.

    BATCH_SIZE=1 makes each write attempt of a rejected entry exactly one rejection in
    Postgres (no bisection), so the rejections sequence counts attempts."""
    reject_and_count(database_url, REJECTED_DEVICE)
    fixes = list(Fleet(20, seed=42).fixes(300))
    for n in range(50, 300, 100):
        fixes[n] = {**fixes[n], "device_id": REJECTED_DEVICE}
    produce(redis_client, stream_key, fixes)
    rejected = {i for i, fields in redis_client.xrange(stream_key) if orjson.loads(fields[b"data"])["device_id"] == REJECTED_DEVICE}
    proxy.lose_reply(counts_failures(stream_key), nth)
    processor = start(start_processor, env, proxy, MAX_FAILURES=str(MAX_FAILURES), BATCH_SIZE="1")

    def state() -> tuple[int, int, int]:
        return redis_client.xlen(f"{stream_key}:dlq"), stored_count(database_url), pending_count(redis_client, stream_key)

    expected = (len(rejected), len(fixes) - len(rejected), 0)
    try:
        wait_for(lambda: state() == expected, COUNT_TIMEOUT_S, interval_s=0.1)
    except AssertionError:
        raise AssertionError(
            f"(letters, rows, pending) {state()} != {expected} after {COUNT_TIMEOUT_S}s; "
            f"rejections {rejections(database_url)}, lost replies {proxy.dropped}; log: {processor.log_messages()[-20:]}"
        ) from None
    assert len(proxy.dropped) == 1, "one failure count's reply was lost"
    assert "redis unavailable, pausing" in processor.log_messages()
    letters = [fields for _, fields in redis_client.xrange(f"{stream_key}:dlq")]
    assert sorted(letter[b"source_id"] for letter in letters) == sorted(rejected), "each rejected entry once"
    assert {letter[b"error_kind"] for letter in letters} == {b"write"}
    assert [letter[b"failures"] for letter in letters] == [str(MAX_FAILURES).encode()] * len(rejected)
    assert rejections(database_url) == MAX_FAILURES * len(rejected), "each rejected entry written MAX_FAILURES times"
    wait_for(lambda: not redis_client.exists(failures_key(stream_key, "processor")), 5, what="the counts of dead-lettered entries to go")
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT count(*), count(DISTINCT (device_id, ts)) FROM positions").fetchone()
    assert rows == (len(fixes) - len(rejected),) * 2

