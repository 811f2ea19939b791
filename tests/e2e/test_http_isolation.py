"""No HTTP client and no Redis stall delays the supervisor: /healthz and /metrics live in the HTTP process."""

from __future__ import annotations

import calendar
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from common.timing import STOP_MARGIN_S
from scripts.toolkit.processes import children, proc_title
from scripts.toolkit.services import ThrowawayRedis, free_port, missing_binaries
from scripts.toolkit.writer import backlog
from supervisor.migrations import apply_migrations
from tests.e2e.processes import ProcessorProcess, wait_for
from tests.e2e.verify import assert_exact, wait_settled

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

TRICKLE_INTERVAL_S = 0.5
IDLE_CONNECTIONS = 50
STOP_BEGINS_WITHIN_S = 0.3  # "a fraction of a second" from SIGTERM to "stopping shards"
METRICS_WITHIN_S = 2.0  # /metrics with Redis stopped
RESTART_WITHIN_S = 2.0  # the first restart's backoff is 0.5 s at most
REDIS_STOPPED_S = 5.0


def get(port: int, path: str, timeout_s: float = 10.0) -> tuple[int, bytes, float]:
    """Status, body and seconds taken of one GET over a fresh connection (status 0 on a socket error)."""
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as client:
            client.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
            data = b""
            while chunk := client.recv(65536):
                data += chunk
    except OSError:
        return 0, b"", time.monotonic() - started
    head, _, body = data.partition(b"\r\n\r\n")
    return (int(head.split()[1]) if head else 0), body, time.monotonic() - started


def log_time(entry: dict) -> float:
    """The wall-clock time of a log line (its `time`, UTC with milliseconds)."""
    stamp, millis = entry["time"].rstrip("Z").split(".")
    return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) + int(millis) / 1000


def first_log(processor: ProcessorProcess, predicate) -> dict | None:  # type: ignore[no-untyped-def]
    return next((entry for entry in processor.logs() if predicate(entry)), None)


class Trickler(threading.Thread):
    """Sends a request one byte every TRICKLE_INTERVAL_S, reconnecting whenever the server cuts it off."""

    def __init__(self, port: int) -> None:
        super().__init__(name="trickler", daemon=True)
        self.port = port
        self.sent = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        request = b"GET /healthz HTTP/1.1\r\nHost: a-very-slow-client\r\n\r\n"
        while not self.stopping.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as client:
                    for byte in request:
                        client.send(bytes([byte]))
                        self.sent += 1
                        if self.stopping.wait(TRICKLE_INTERVAL_S):
                            return
            except OSError:
                self.stopping.wait(TRICKLE_INTERVAL_S)  # cut off, or the server is gone: try again


@pytest.fixture
def private_redis() -> Iterator[ThrowawayRedis]:
    """A Redis of this test's own, so that it can be stopped with SIGSTOP; closed at the end."""
    if advice := missing_binaries():
        pytest.skip("; ".join(advice))
    with ThrowawayRedis() as server:
        yield server


def test_slow_and_many_clients_never_delay_sigterm(env, start_processor):
    """A trickling client and 50 idle ones: /healthz still answers, SIGTERM starts the stop at once, exit 0."""
    port = free_port()
    env = {**env, "HTTP_PORT": str(port), "DRAIN_TIMEOUT_S": "5"}
    processor = start_processor(env)
    wait_for(lambda: get(port, "/healthz", 2)[0] == 200, 30, what="healthy")
    titles = sorted(proc_title(pid) for pid in children(processor.pid))
    assert f"processor: http [{env['INSTANCE_ID']}]" in titles, titles

    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(IDLE_CONNECTIONS)]
    trickler = Trickler(port)
    trickler.start()
    try:
        status, _, seconds = get(port, "/healthz")
        assert status == 200 and seconds < 1.0, ("beside the idle connections", status, seconds)
        wait_for(lambda: trickler.sent >= 3, 10, what="the trickler under way")
        status, _, seconds = get(port, "/healthz")
        assert status == 200 and seconds < 1.0, ("beside the trickler", status, seconds)
        signalled_at = time.time()
        processor.signal(signal.SIGTERM)
        assert processor.wait(float(env["DRAIN_TIMEOUT_S"]) + STOP_MARGIN_S + 5) == 0
    finally:
        trickler.stopping.set()
        for client in idle:
            client.close()
    stopping = first_log(processor, lambda e: e["msg"] == "stopping shards")
    assert stopping is not None
    delay = log_time(stopping) - signalled_at
    print(f"SIGTERM → 'stopping shards': {delay * 1000:.0f} ms with a trickling client and {IDLE_CONNECTIONS} idle ones")
    assert -0.01 <= delay < STOP_BEGINS_WITHIN_S, delay  # the log's milliseconds are truncated
    messages = processor.log_messages()
    assert "http process stopping" in messages and "supervisor stopped" in messages
    assert "shards did not stop in time; killing them" not in messages


def test_a_shard_killed_while_redis_is_stopped_is_restarted(database_url, env, private_redis, start_processor):
    """Redis stopped (SIGSTOP) while /metrics is scraped: the scrape answers, a SIGKILLed shard is restarted in time."""
    apply_migrations(database_url)
    port = free_port()
    env = {**env, "REDIS_URL": private_redis.url, "HTTP_PORT": str(port)}
    stream = env["STREAM_KEY"]
    processor = start_processor(env)
    shards = processor.wait_for_shards(2)
    wait_for(lambda: get(port, "/healthz", 2)[0] == 200, 30, what="healthy")
    with redis.Redis.from_url(private_redis.url) as client:
        backlog(client, stream, 20_000, devices=200, seed=61)
        redis_pid = int(client.info("server")["process_id"])
        scrapes: list[tuple[int, bytes, float]] = []
        os.kill(redis_pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            scrapes.append(get(port, "/metrics"))
            victim = shards[0]
            killed_at = time.time()
            os.kill(victim, signal.SIGKILL)
            while time.monotonic() - stopped_at < REDIS_STOPPED_S:  # scraped all through the outage
                scrapes.append(get(port, "/metrics"))
            replacement = wait_for(lambda: set(processor.shard_pids()) - set(shards), 10, what="a replacement shard")
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        exited = first_log(processor, lambda e: e["msg"].startswith("shard killed by") and e.get("child_pid") == victim)
        assert exited is not None and exited["msg"].endswith("; restarting"), exited
        respawned = first_log(processor, lambda e: e["msg"] == "shard spawned" and e["child_pid"] in replacement)
        assert respawned is not None
        reaped_after, restarted_after = log_time(exited) - killed_at, log_time(respawned) - killed_at
        slowest = max(seconds for _, _, seconds in scrapes)
        print(
            f"Redis stopped: {len(scrapes)} scrapes of /metrics, slowest {slowest * 1000:.0f} ms; "
            f"shard reaped {reaped_after * 1000:.0f} ms and restarted {restarted_after * 1000:.0f} ms after SIGKILL"
        )
        assert all(status == 200 for status, _, _ in scrapes), [(status, seconds) for status, _, seconds in scrapes]
        assert b"processor_stream_metrics_age_seconds" in scrapes[-1][1], "the last reading, with its age"
        assert slowest < METRICS_WITHIN_S
        assert reaped_after < STOP_BEGINS_WITHIN_S and restarted_after < RESTART_WITHIN_S

        wait_settled(client, database_url, stream, 60)
        assert_exact(client, database_url, stream)
        assert client.xlen(f"{stream}:dlq") == 0
    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == 0
