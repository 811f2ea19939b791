"""The HTTP server of /healthz and /metrics: a thread per connection, every client bounded.

A client gets REQUEST_DEADLINE_S for its whole request line and headers (MAX_HEAD_BYTES at
most) and WRITE_TIMEOUT_S to take the answer; at most MAX_CONNECTIONS are served at once.
When all are taken, the one that has waited longest for its request's head is cut to make
room (a client that asks at once, as a health check or a scrape does, is never that one);
only when none is waiting is the newcomer answered 503 and closed. So no client, however
slow, stalled, numerous or large, keeps the others from an answer. It runs in the HTTP process
(supervisor/http_process.py), never in the supervisor, which only binds the socket.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import orjson
from prometheus_client import CollectorRegistry, generate_latest

from common.faults import one_line
from supervisor.observer import Observer

log = logging.getLogger("processor.http")

REQUEST_DEADLINE_S = 2.0  # from accept to the end of the request's headers
WRITE_TIMEOUT_S = 2.0  # to send the whole answer
MAX_HEAD_BYTES = 8192  # request line and headers
MAX_CONNECTIONS = 64  # served at once
EVICTED_WAIT_S = 0.5  # for the slot of a connection cut to make room
LISTEN_BACKLOG = 128
REFUSE_DRAIN_READS = 8  # of MAX_HEAD_BYTES each, before closing a refused connection


def listen(port: int, wait_s: float = 0.0, between: Callable[[], None] = lambda: None) -> socket.socket:
    """The listening socket on all interfaces; bound by the supervisor before its first fork.

    A port in use is tried again every 0.1 s (`between` the tries) for up to `wait_s`: the HTTP
    process of an instance SIGKILLed a moment ago holds it until it notices (within a second),
    and a restart that quick is not a configuration error.
    """
    until = time.monotonic() + wait_s
    while True:
        try:
            return socket.create_server(("0.0.0.0", port), backlog=LISTEN_BACKLOG)  # SO_REUSEADDR on POSIX
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() >= until:
                raise
        time.sleep(0.1)
        between()


class HeadTooLarge(Exception):
    """The request line and headers exceed MAX_HEAD_BYTES."""


def read_head(sock: socket.socket, deadline: float, limit: int = MAX_HEAD_BYTES) -> bytes:
    """The request line and headers, by the monotonic `deadline`; b"" when the client closed first.

    Raises TimeoutError when the deadline passes, HeadTooLarge beyond `limit` bytes.
    """
    head = b""
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request headers not complete in time")
        sock.settimeout(remaining)
        chunk = sock.recv(limit + 1 - len(head))
        if not chunk:
            return b""
        head += chunk
        if len(head) > limit:
            raise HeadTooLarge(f"request headers over {limit} bytes")
    return head


def refuse(sock: socket.socket, status: HTTPStatus, reason: str, timeout_s: float) -> None:
    """Answer `status` with a JSON reason, as far as the client takes it within `timeout_s`."""
    body = orjson.dumps({"error": reason})
    head = (
        f"HTTP/1.0 {status.value} {status.phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    try:
        sock.settimeout(timeout_s)
        sock.sendall(head.encode() + body)
        sock.setblocking(False)
        for _ in range(REFUSE_DRAIN_READS):  # what the client sent already: closing on it would reset the answer
            if not sock.recv(MAX_HEAD_BYTES):
                break
    except OSError:
        pass  # the client is gone, does not read, or has sent nothing more


class HealthServer(ThreadingHTTPServer):
    """Serves on an inherited listening socket; each connection in a daemon thread of its own."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, listener: socket.socket, observer: Observer, max_connections: int = MAX_CONNECTIONS) -> None:
        super().__init__(listener.getsockname()[:2], _handler_class(observer), bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        self.slots = threading.BoundedSemaphore(max_connections)
        self._waiting: dict[socket.socket, None] = {}  # still reading their request's head, oldest first
        self._waiting_lock = threading.Lock()

    @contextlib.contextmanager
    def waiting_for_head(self, sock: socket.socket) -> Iterator[None]:
        with self._waiting_lock:
            self._waiting[sock] = None
        try:
            yield
        finally:
            with self._waiting_lock:
                self._waiting.pop(sock, None)

    def _cut_longest_waiting(self) -> bool:
        """Cut the connection that has waited longest for its head; its thread then frees its slot."""
        with self._waiting_lock:
            oldest = next(iter(self._waiting), None)
            if oldest is None:
                return False
            del self._waiting[oldest]
        with contextlib.suppress(OSError):
            oldest.shutdown(socket.SHUT_RDWR)
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        """On the accepting thread: start the connection's thread; when all slots are taken, first
        make room by cutting the longest-waiting idle connection, else refuse this one at once."""
        if not self.slots.acquire(blocking=False):
            if not (self._cut_longest_waiting() and self.slots.acquire(timeout=EVICTED_WAIT_S)):
                refuse(request, HTTPStatus.SERVICE_UNAVAILABLE, "too many connections; try again", 0.0)
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # the client went away or stalled: its loss alone
            log.debug("http client failed", extra={"error": one_line(exc)})
        else:
            log.error("http request failed", extra={"error": one_line(exc)}, exc_info=True)


class _Collector:
    def __init__(self, observer: Observer) -> None:
        self.observer = observer

    def collect(self) -> list[Any]:
        return self.observer.collect()


def _handler_class(observer: Observer) -> type[BaseHTTPRequestHandler]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(observer))

    class Handler(BaseHTTPRequestHandler):
        head_only = False  # a HEAD request: the answer's status and headers, no body

        def setup(self) -> None:
            self.connection = self.request
            self.rfile = io.BytesIO()  # filled by handle() once the whole head is in
            self.wfile = self.connection.makefile("wb")

        def handle(self) -> None:
            """One request per connection, its head read within the deadline and the size limit."""
            try:
                with self.server.waiting_for_head(self.connection):  # type: ignore[attr-defined]
                    head = read_head(self.connection, time.monotonic() + REQUEST_DEADLINE_S)
            except TimeoutError:
                refuse(self.connection, HTTPStatus.REQUEST_TIMEOUT, "request not complete in time", WRITE_TIMEOUT_S)
                return
            except HeadTooLarge as exc:
                refuse(self.connection, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, str(exc), WRITE_TIMEOUT_S)
                return
            if head:
                self.connection.settimeout(WRITE_TIMEOUT_S)
                self.rfile = io.BytesIO(head)
                self.handle_one_request()

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            path = urlsplit(self.path).path  # also of an absolute-form request line (RFC 9112 3.2.2)
            if path == "/healthz":
                status, body = observer.health()
                self._send(status, "application/json", orjson.dumps(body))
            elif path == "/metrics":
                self._send(200, "text/plain; version=0.0.4; charset=utf-8", generate_latest(registry))
            else:
                self._send(404, "application/json", b'{"error": "not found; try /healthz or /metrics"}')

        def do_HEAD(self) -> None:  # noqa: N802 - uptime checkers ask with HEAD: GET's status and headers
            self.head_only = True
            self.do_GET()

        def _not_allowed(self) -> None:
            self._send(405, "application/json", b'{"error": "only GET and HEAD are served"}', allow="GET, HEAD")

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """http.server's own refusals (a malformed request, an unknown method) in JSON, not HTML."""
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send(code, "application/json", orjson.dumps({"error": message or HTTPStatus(code).phrase}))

        def _send(self, status: int, content_type: str, body: bytes, allow: str | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if allow is not None:
                self.send_header("Allow", allow)
            self.end_headers()
            if not self.head_only:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server API
            pass  # scrapes every few seconds would drown the logs

    return Handler
