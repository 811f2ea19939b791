"""The HTTP process's server and observer, in this process: real sockets, a status board, clients that misbehave."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack

import orjson
import pytest

from common.config import Settings
from common.status import ShardStatus, SlotState, StatusBoard, SupervisorState
from supervisor import http
from supervisor.http import HealthServer, listen
from supervisor.observer import Observer, StreamGauges, StreamReading
from tests.e2e.processes import wait_for

SHARDS = 2


def healthy_board() -> StatusBoard:
    """A board on which the supervisor (this test's parent) and every shard are fine."""
    board = StatusBoard(SHARDS)
    now = time.monotonic()
    for slot in range(SHARDS):
        board.write(slot, ShardStatus(heartbeat=now, pid=1000 + slot, redis_ok=True, postgres_ok=True))
    slots = tuple(SlotState(True, 1000 + slot, now, restarts=slot) for slot in range(SHARDS))
    board.write_supervisor(SupervisorState(os.getppid(), False, now, slots))
    return board


class StalledRedis:
    """A TCP server that accepts connections and never answers: Redis stopped with SIGSTOP, as a client sees it."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def stalled_redis() -> Iterator[StalledRedis]:
    server = StalledRedis()
    yield server
    server.close()


class Served:
    """A HealthServer on a free port, served by a thread; closed at the end of the test."""

    def __init__(self, observer: Observer, max_connections: int = http.MAX_CONNECTIONS) -> None:
        self.server = HealthServer(listen(0), observer, max_connections)
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.clients: list[socket.socket] = []

    def connect(self) -> socket.socket:
        client = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.clients.append(client)
        return client

    def get(self, path: str) -> tuple[int, bytes, float]:
        """Status, body and seconds taken of one GET."""
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as client:
            client.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
            status, body = read_response(client)
        return status, body, time.monotonic() - started

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.server.shutdown()
        self.server.server_close()


def read_response(client: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := client.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return (int(head.split()[1]) if head else 0), body


def sample(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text."""
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(f"{name} "))


@pytest.fixture
def serve(redis_url: str) -> Iterator:  # type: ignore[type-arg]
    """Factory: serve an observer of `board` whose stream gauges read `redis` (the test Redis by default)."""
    with ExitStack() as stack:

        def start(board: StatusBoard, redis: str = redis_url, **kwargs: int) -> Served:
            settings = Settings.from_env({"SHARDS": str(SHARDS), "INSTANCE_ID": "unit", "REDIS_URL": redis})
            gauges = StreamGauges(settings)
            gauges.start()
            stack.callback(gauges.stop)
            served = Served(Observer(settings, board, gauges), **kwargs)
            stack.callback(served.close)
            return served

        yield start


def test_healthz_is_200_while_the_supervisor_and_every_shard_are_fine(serve) -> None:  # type: ignore[no-untyped-def]
    """Every slot running, beating and connected, the supervisor our parent and not stopping: 200, pids from the board."""
    status, body, _ = serve(healthy_board()).get("/healthz")
    document = orjson.loads(body)
    assert status == 200 and document["status"] == "ok"
    assert {slot: shard["pid"] for slot, shard in document["shards"].items()} == {"0": 1000, "1": 1001}
    assert document["supervisor"] == {"pid": os.getppid(), "ok": True, "problems": []}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda s: SupervisorState(s.pid, True, s.beat, s.slots), "supervisor: stopping"),
        (lambda s: SupervisorState(s.pid + 1, s.stopping, s.beat, s.slots), "supervisor: gone"),
        (lambda s: SupervisorState(s.pid, s.stopping, s.beat - 60, s.slots), "supervisor: loop not beating"),
        (lambda s: SupervisorState(s.pid, s.stopping, s.beat, (SlotState(), *s.slots[1:])), "shard 0: not running"),
    ],
    ids=["stopping", "gone", "not-beating", "shard-down"],
)
def test_healthz_is_503_with_the_reason(serve, change, reason: str) -> None:  # type: ignore[no-untyped-def]
    """What the supervisor wrote into the board turns /healthz 503, naming the reason."""
    board = healthy_board()
    board.write_supervisor(change(board.read_supervisor()))
    status, body, _ = serve(board).get("/healthz")
    assert status == 503
    assert reason in orjson.loads(body)["reasons"]


def test_a_trickling_client_holds_up_nobody_and_is_cut_at_the_deadline(serve) -> None:  # type: ignore[no-untyped-def]
    """One byte every 0.3 s: others get /healthz at once; the trickler gets 408 within the request deadline."""
    served = serve(healthy_board())
    trickler = served.connect()
    started = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: a-very-slow-client\r\n\r\n":
            if stop.wait(0.3):
                return
            try:
                trickler.send(bytes([byte]))
            except OSError:
                return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    for _ in range(5):
        status, _, seconds = served.get("/healthz")
        assert status == 200 and seconds < 0.5
    status, body = read_response(trickler)
    stop.set()
    assert status == 408, body
    assert time.monotonic() - started < http.REQUEST_DEADLINE_S + 1.0


def test_many_idle_connections_do_not_stop_healthz(serve) -> None:  # type: ignore[no-untyped-def]
    """Fifty connections that send nothing: /healthz still answers at once."""
    served = serve(healthy_board())
    for _ in range(50):
        served.connect()
    status, _, seconds = served.get("/healthz")
    assert status == 200 and seconds < 0.5


def test_idle_connections_over_the_cap_make_room_for_a_request(serve) -> None:  # type: ignore[no-untyped-def]
    """With every slot taken by idle clients, a client that asks is served at once: the idle client
    that has waited longest is cut to make room. Idle clients refreshed as fast as they are cut (a
    slowloris) keep nobody from an answer."""
    served = serve(healthy_board(), max_connections=3)
    idle = [served.connect() for _ in range(3)]
    wait_for(lambda: len(served.server._waiting) == 3, 5, what="three idle clients in their slots")  # noqa: SLF001
    status, _, seconds = served.get("/healthz")
    assert status == 200 and seconds < 1.0
    idle[0].settimeout(1.0)
    assert idle[0].recv(1) == b"", "the longest-waiting idle client was cut"
    for _ in range(10):
        served.connect()
        status, _, seconds = served.get("/healthz")
        assert status == 200 and seconds < 1.0


def test_a_newcomer_is_refused_when_no_connection_is_idle(serve) -> None:  # type: ignore[no-untyped-def]
    """All slots busy with requests under way (none waiting for its head): one more is answered 503 at once."""
    served = serve(healthy_board(), max_connections=2)
    held = [served.server.slots.acquire(blocking=False) for _ in range(2)]
    try:
        status, body, seconds = served.get("/healthz")
        assert status == 503 and b"too many connections" in body and seconds < 1.0 + http.EVICTED_WAIT_S
    finally:
        for _ in held:
            served.server.slots.release()
    assert served.get("/healthz")[0] == 200


def test_oversized_headers_are_refused(serve) -> None:  # type: ignore[no-untyped-def]
    """A request head beyond MAX_HEAD_BYTES gets 431 without waiting for the rest; others are served."""
    served = serve(healthy_board())
    client = served.connect()
    client.sendall(b"GET /healthz HTTP/1.1\r\n" + b"X-Padding: " + b"x" * (http.MAX_HEAD_BYTES + 100))
    status, _ = read_response(client)
    assert status == 431
    assert served.get("/healthz")[0] == 200


def test_metrics_are_fresh_from_a_redis_that_answers(serve) -> None:  # type: ignore[no-untyped-def]
    """A scrape waits for a reading that is at most FRESH_S old: the DLQ gauge and an age below it."""
    status, body, _ = serve(healthy_board()).get("/metrics")
    text = body.decode()
    assert status == 200
    assert "processor_dead_letters 0.0" in text
    assert 0 <= sample(text, "processor_stream_metrics_age_seconds") < 1.0
    assert 'processor_shard_restarts_total{shard="1"} 1.0' in text


def test_metrics_do_not_wait_on_a_stalled_redis(serve, stalled_redis: StalledRedis) -> None:  # type: ignore[no-untyped-def]
    """Redis accepts but never answers: /metrics answers within the scrape wait, with the last reading and its age."""
    served = serve(healthy_board(), redis=stalled_redis.url)
    status, body, seconds = served.get("/metrics")
    assert status == 200 and seconds < 1.0
    assert b"processor_shard_up" in body and b"processor_consumer_lag" not in body, "no reading yet: no stream gauges"


def test_stale_stream_gauges_are_served_with_their_age(stalled_redis: StalledRedis) -> None:
    """The last good reading stays on show while Redis stalls; processor_stream_metrics_age_seconds says how old."""
    settings = Settings.from_env({"SHARDS": str(SHARDS), "INSTANCE_ID": "unit", "REDIS_URL": stalled_redis.url})
    gauges = StreamGauges(settings)
    try:
        gauges.reading = StreamReading(time.monotonic() - 30, dead_letters=2, lag=7, pending=3, oldest_pending_age_s=1.5)
        gauges.start()
        started = time.monotonic()
        families = {f.name: f for f in Observer(settings, healthy_board(), gauges).collect()}
        assert time.monotonic() - started < 1.0
        assert families["processor_consumer_lag"].samples[0].value == 7
        assert families["processor_stream_metrics_age_seconds"].samples[0].value >= 30
    finally:
        gauges.stop()


def raw_request(served, request: bytes) -> tuple[bytes, bytes]:  # type: ignore[no-untyped-def]
    """The head and body of the answer to `request`, sent as it is."""
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as client:
        client.sendall(request)
        data = b""
        while chunk := client.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_head_other_methods_and_absolute_urls(serve) -> None:  # type: ignore[no-untyped-def]
    """HEAD gets GET's status and headers without a body; POST gets 405 naming what is allowed;
    a malformed request JSON, not HTML; an absolute-form request line is served like its path."""
    served = serve(healthy_board())
    head, body = raw_request(served, b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert head.split()[1] == b"200" and b"Content-Length:" in head and body == b""
    head, body = raw_request(served, b"POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
    assert head.split()[1] == b"405" and b"Allow: GET, HEAD" in head and orjson.loads(body)["error"]
    head, body = raw_request(served, b"BREW /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert head.split()[1] == b"501" and orjson.loads(body)["error"]
    head, body = raw_request(served, b"GET http://t:9090/healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert head.split()[1] == b"200" and orjson.loads(body)["status"]
