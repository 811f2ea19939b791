"""Outages of Postgres and Redis under load: consumption pauses and resumes, nothing is lost or dead-lettered."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest
import redis

from scripts.toolkit.fleet import Fleet
from scripts.toolkit.processes import children, signal_all
from scripts.toolkit.services import ThrowawayPostgres, ThrowawayRedis, free_port, missing_binaries
from scripts.toolkit.writer import produce, steady
from shard.decode import decode_entry
from supervisor.migrations import apply_migrations
from tests.e2e.processes import ProcessorProcess, wait_for
from tests.e2e.test_health import get
from tests.e2e.verify import assert_exact, entries_by_outcome, pending_count, stored_count, wait_settled

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

RATE_PER_S = 1_000
LOAD_S = 25.0
DEVICES = 200
POSTGRES_DOWN_S = 15.0
REDIS_DOWN_S = 4.0
CUT_DOWN_S = 3.0
LOST_ENTRIES = 200
SETTLE_TIMEOUT_S = 60.0
# Entries left in a live shard's pending list are claimed only after CLAIM_THRESHOLD_MS;
# after a Redis outage consumption must resume well before that, without a claim.
CLAIM_THRESHOLD_MS = 60_000
RESUME_TIMEOUT_S = 20.0
PRODUCER_GIVE_UP_S = 60.0  # a producer that cannot write for this long fails the test
PRODUCER_RETRY_S = 0.05
PRODUCER_CHUNK = 1_000


@pytest.fixture
def private_postgres() -> Iterator[ThrowawayPostgres]:
    """A Postgres of this test's own, so that it can be stopped; closed at the end."""
    if advice := missing_binaries():
        pytest.skip("; ".join(advice))
    with ThrowawayPostgres(fsync=False) as server:
        yield server


@contextlib.contextmanager
def frozen_postgres(server: ThrowawayPostgres, postmaster: bool = False) -> Iterator[None]:
    """SIGSTOP the server's backends (and its postmaster: no new connection either) for the block."""
    pid = int((server.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    frozen = [pid] * postmaster + children(pid)
    signal_all(frozen, signal.SIGSTOP)
    try:
        yield
    finally:
        signal_all(frozen, signal.SIGCONT)


def wait_unhealthy(port: int, because: bytes, timeout_s: float) -> None:
    """/healthz answers 503 within `timeout_s`, its body naming `because`."""
    _, body = wait_for(lambda: (h := get(port, "/healthz"))[0] == 503 and h, timeout_s, 0.5, "503")
    assert because in body, body


@pytest.fixture
def private_redis() -> Iterator[ThrowawayRedis]:
    """A Redis of this test's own with the AOF on, so that a restart keeps the stream; closed at the end."""
    if advice := missing_binaries():
        pytest.skip("; ".join(advice))
    with ThrowawayRedis(appendonly=True) as server:
        yield server


class RetryingProducer(threading.Thread):
    """XADDs distinct fixes at a steady rate; a batch that fails is sent again, whole, until Redis takes it.

    Every fix has its own (device_id, ts), so a batch that landed although its reply was lost
    only duplicates entries, which the Processor stores once. `payloads[:acked]` were
    acknowledged at least once.
    """

    def __init__(self, url: str, stream: str, rate_per_s: float, seconds: float, seed: int) -> None:
        super().__init__(name="retrying-producer", daemon=True)
        self.payloads = [orjson.dumps(fix) for fix in Fleet(DEVICES, seed=seed).fixes(round(rate_per_s * seconds))]
        decoded = [decode_entry({b"data": data}) for data in self.payloads]
        self.keys = {(fix.device_id, fix.ts) for fix in decoded}
        assert len(self.keys) == len(self.payloads)
        self.url, self.stream, self.rate_per_s = url, stream, rate_per_s
        self.acked = 0
        self.failed_attempts = 0
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            with redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=1) as client:
                self._produce(client)
        except BaseException as exc:  # noqa: BLE001 - handed to the test, which re-raises it
            self.error = exc

    def _produce(self, client: redis.Redis) -> None:
        started = last_success = time.monotonic()
        while self.acked < len(self.payloads) and not self.stopping.is_set():
            due = min(len(self.payloads), int((time.monotonic() - started) * self.rate_per_s) + 1)
            if due > self.acked:
                batch = self.payloads[self.acked : min(due, self.acked + PRODUCER_CHUNK)]
                try:
                    with client.pipeline(transaction=False) as pipe:
                        for data in batch:
                            pipe.xadd(self.stream, {"data": data})
                        pipe.execute()
                except (redis.ConnectionError, redis.TimeoutError):
                    self.failed_attempts += 1
                    if time.monotonic() - last_success > PRODUCER_GIVE_UP_S:
                        raise
                    self.stopping.wait(PRODUCER_RETRY_S)
                    continue
                self.acked += len(batch)
                last_success = time.monotonic()
            else:
                self.stopping.wait(0.01)  # pacing: the next entries are not due yet

    def finish(self, timeout_s: float) -> None:
        """Wait until every fix was acknowledged; re-raise what stopped the producer."""
        self.join(timeout_s)
        if self.is_alive():
            self.stopping.set()
            self.join(5)
            raise AssertionError(f"producer not finished after {timeout_s}s: {self.acked}/{len(self.payloads)} acked")
        if self.error is not None:
            raise self.error
        assert self.acked == len(self.payloads)


class CuttableProxy:
    """A TCP proxy in front of Redis that fails like a network: replies lost, then connections cut."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self.upstream_url = upstream_url
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.losing = threading.Event()
        self.down = threading.Event()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def url(self) -> str:
        parts = urlsplit(self.upstream_url)
        netloc = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit((parts.scheme, f"{netloc}127.0.0.1:{self.port}", parts.path, parts.query, ""))

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self.down.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self.lock:
                self.sockets |= {client, server}
            for source, sink, replies in ((client, server, False), (server, client, True)):
                thread = threading.Thread(target=self._pump, args=(source, sink, replies), daemon=True)
                thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65_536):
                if not (replies and self.losing.is_set()):
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        with self.lock:
            self.sockets.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def lose_replies(self) -> None:
        """From now on commands still reach Redis, which runs them, but its replies vanish."""
        self.losing.set()

    def cut(self) -> None:
        """Drop every connection and refuse new ones until `heal()`."""
        self.down.set()
        with self.lock:
            victims = list(self.sockets)
        for sock in victims:
            self._close(sock)
        self.losing.clear()

    def heal(self) -> None:
        """Accept connections again."""
        self.down.clear()

    def close(self) -> None:
        self.down.set()
        self.listener.close()
        with self.lock:
            victims = list(self.sockets)
        for sock in victims:
            self._close(sock)


@pytest.fixture
def redis_proxy(redis_url: str) -> Iterator[CuttableProxy]:
    """A proxy in front of the shared Redis whose connections the test can cut; closed at the end."""
    proxy = CuttableProxy(redis_url)
    yield proxy
    proxy.close()


def per_consumer(processor: ProcessorProcess, message: str) -> Counter[str]:
    """How often each shard logged `message`."""
    return Counter(entry.get("consumer", "?") for entry in processor.logs() if entry["msg"] == message)


def consumers(env: dict[str, str]) -> set[str]:
    """The consumer names of the processor's shards."""
    return {f"{env['INSTANCE_ID']}-{index}" for index in range(int(env["SHARDS"]))}


def assert_nothing_exited(processor: ProcessorProcess, shard_pids: list[int], env: dict[str, str]) -> None:
    """The supervisor and the very same shards are still running; no shard ever exited or panicked."""
    assert processor.proc.poll() is None, "the supervisor exited"
    assert processor.shard_pids() == shard_pids, "a shard was replaced"
    exits = [e for e in processor.logs() if e["msg"].startswith(("shard exited", "shard killed"))]
    assert not exits, exits
    assert not list(Path(env["PANIC_DIR"]).glob("*")), "a process panicked"


def hold_down(stop: Callable[[], None], start: Callable[[], None], seconds: float, paused: Callable[[], bool]) -> None:
    """Stop a server, see every shard pause, keep it down for `seconds` in all, then start it."""
    down_at = time.monotonic()
    stop()
    try:
        wait_for(paused, seconds, interval_s=0.1, what="every shard to log the pause")
        time.sleep(max(0.0, down_at + seconds - time.monotonic()))  # the outage itself
    finally:
        start()


def test_postgres_outage_pauses_and_loses_nothing(redis_client, stream_key, env, private_postgres, start_processor):
    """Postgres down 15 s under load: shards pause (logged once each), resume, and every fix is stored once."""
    database_url = private_postgres.url
    apply_migrations(database_url)
    env = {**env, "DATABASE_URL": database_url, "MIGRATION_DATABASE_URL": database_url, "MAX_FAILURES": "2"}
    processor = start_processor(env)
    shard_pids = processor.wait_for_shards(2)
    with ThreadPoolExecutor(1) as pool:
        load: Future = pool.submit(steady, redis_client, stream_key, RATE_PER_S, LOAD_S, devices=DEVICES, seed=21)
        wait_for(lambda: stored_count(database_url) > 500, what="the first rows")
        paused = "postgres unavailable, pausing"
        hold_down(
            private_postgres.stop,
            private_postgres.start,
            POSTGRES_DOWN_S,
            lambda: set(per_consumer(processor, paused)) == consumers(env),
        )
        counts = load.result(timeout=LOAD_S + 30)
    assert counts.total == round(RATE_PER_S * LOAD_S)
    wait_settled(redis_client, database_url, stream_key, SETTLE_TIMEOUT_S)

    assert redis_client.xlen(f"{stream_key}:dlq") == 0
    assert_exact(redis_client, database_url, stream_key)
    assert stored_count(database_url) == counts.total
    assert_nothing_exited(processor, shard_pids, env)
    expected = dict.fromkeys(consumers(env), 1)
    assert per_consumer(processor, paused) == expected, "one pause line per shard per outage"
    assert per_consumer(processor, "postgres reachable again") == expected
    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == 0


def test_redis_restart_with_persistence_pauses_and_loses_nothing(database_url, env, private_redis, start_processor):
    """Redis (AOF on) restarted under load: shards pause and resume; every fix stored once, none dead-lettered."""
    apply_migrations(database_url)
    env = {**env, "REDIS_URL": private_redis.url, "MAX_FAILURES": "2", "CLAIM_THRESHOLD_MS": str(CLAIM_THRESHOLD_MS)}
    stream = env["STREAM_KEY"]
    processor = start_processor(env)
    shard_pids = processor.wait_for_shards(2)
    producer = RetryingProducer(private_redis.url, stream, RATE_PER_S, LOAD_S, seed=22)
    producer.start()
    try:
        wait_for(lambda: stored_count(database_url) > 2_000, what="the first rows")
        hold_down(
            private_redis.stop,
            private_redis.start,
            REDIS_DOWN_S,
            lambda: set(per_consumer(processor, "redis unavailable, pausing")) == consumers(env),
        )
        producer.finish(LOAD_S + PRODUCER_GIVE_UP_S)
    finally:
        producer.stopping.set()
    assert producer.failed_attempts > 0, "the outage never reached the producer"

    with redis.Redis.from_url(private_redis.url) as client:
        valid, poison = entries_by_outcome(client, stream)
        assert not poison
        assert {(fix.device_id, fix.ts) for fix in valid.values()} == producer.keys, (
            "the stream holds exactly the fixes the producer added (restart with the AOF loses none)"
        )
        wait_settled(client, database_url, stream, RESUME_TIMEOUT_S)
        assert client.xlen(f"{stream}:dlq") == 0
        assert_exact(client, database_url, stream)
    assert stored_count(database_url) == len(producer.keys)
    assert_nothing_exited(processor, shard_pids, env)
    paused = per_consumer(processor, "redis unavailable, pausing")
    resumed = per_consumer(processor, "redis reachable again")
    assert set(paused) == set(resumed) == consumers(env)
    assert paused == resumed, "every pause ends with 'reachable again'"
    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == 0


def test_entries_delivered_into_a_network_cut_are_not_stuck(
    redis_client, database_url, stream_key, env, redis_proxy, start_processor
):
    """Entries delivered into replies a network cut lost are processed once it heals, not a claim threshold later."""
    apply_migrations(database_url)
    env = {**env, "REDIS_URL": redis_proxy.url, "MAX_FAILURES": "2", "CLAIM_THRESHOLD_MS": str(CLAIM_THRESHOLD_MS)}
    processor = start_processor(env)
    shard_pids = processor.wait_for_shards(2)
    fleet = Fleet(DEVICES, seed=23)  # consecutive chunks of its fixes are all distinct
    produce(redis_client, stream_key, fleet.fixes(2_000))
    wait_settled(redis_client, database_url, stream_key, SETTLE_TIMEOUT_S)  # the shards now wait in XREADGROUP ... BLOCK

    redis_proxy.lose_replies()
    produce(redis_client, stream_key, fleet.fixes(LOST_ENTRIES))
    wait_for(lambda: pending_count(redis_client, stream_key) > 0, 10, what="Redis to deliver entries into lost replies")
    hold_down(
        redis_proxy.cut,
        redis_proxy.heal,
        CUT_DOWN_S,
        lambda: set(per_consumer(processor, "redis unavailable, pausing")) == consumers(env),
    )
    produce(redis_client, stream_key, fleet.fixes(1_000))
    wait_settled(redis_client, database_url, stream_key, RESUME_TIMEOUT_S)

    assert redis_client.xlen(f"{stream_key}:dlq") == 0
    assert_exact(redis_client, database_url, stream_key)
    assert_nothing_exited(processor, shard_pids, env)
    assert set(per_consumer(processor, "redis reachable again")) == consumers(env)
    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == 0


def test_a_frozen_postgres_makes_healthz_503(redis_client, stream_key, env, private_postgres, start_processor):
    """SIGSTOP of the server's processes under load: the shards' statements never return and no
    error ever comes back (new connections still would), yet /healthz must say so (SPEC §6)."""
    database_url = private_postgres.url
    apply_migrations(database_url)
    port = free_port()
    env = {**env, "DATABASE_URL": database_url, "MIGRATION_DATABASE_URL": database_url, "HTTP_PORT": str(port)}
    processor = start_processor(env)
    wait_for(lambda: get(port, "/healthz")[0] == 200, what="healthy")
    with ThreadPoolExecutor(1) as pool:
        load: Future = pool.submit(steady, redis_client, stream_key, 200, 8.0, devices=DEVICES, seed=23)
        wait_for(lambda: stored_count(database_url) > 100, what="the first rows: every shard holds connections")
        with frozen_postgres(private_postgres):  # its backends; the postmaster itself would still fork new ones
            wait_unhealthy(port, b"Postgres", 60)
        load.result(timeout=60)
    wait_settled(redis_client, database_url, stream_key, SETTLE_TIMEOUT_S)
    assert_exact(redis_client, database_url, stream_key)
    wait_for(lambda: get(port, "/healthz")[0] == 200, what="healthy again")
    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == 0

