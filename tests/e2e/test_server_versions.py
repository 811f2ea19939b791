"""The oldest supported servers (Redis 7.0, Postgres 15) are checked at start-up: an older one is exit 78.

No Redis 6.2 is installed here, so a stand-in speaks just enough RESP to say it is one: the
rare fault is the server's version, not its behaviour.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from common.errors import ExitCode
from common.versions import MIN_POSTGRES, UnsupportedServer, check_postgres, check_redis, redis_version
from scripts.toolkit.services import free_port

pytestmark = pytest.mark.e2e


def _answer(command: list[bytes], version: str) -> bytes:
    name = command[0].upper() if command else b""
    if name == b"INFO":
        body = f"# Server\r\nredis_version:{version}\r\nredis_mode:standalone\r\n".encode()
        return b"$%d\r\n%s\r\n" % (len(body), body)
    if name == b"PING":
        return b"+PONG\r\n"
    if name == b"CLIENT":
        return b"+OK\r\n"
    return b"-ERR unknown command\r\n"


def _serve(conn: socket.socket, version: str) -> None:
    reader = conn.makefile("rb")
    with conn, reader:
        while line := reader.readline():
            if not line.startswith(b"*"):
                return
            command = []
            for _ in range(int(line[1:])):
                size = int(reader.readline()[1:])
                command.append(reader.read(size + 2)[:-2])
            conn.sendall(_answer(command, version))


@pytest.fixture
def old_redis() -> Iterator[str]:
    """A RESP endpoint that says it is Redis 6.2.14."""
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_serve, args=(conn, "6.2.14"), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"redis://127.0.0.1:{port}/0"
    listener.close()


def test_processor_run_refuses_redis_older_than_7(env, old_redis, start_processor):
    """`processor run` against Redis 6.2: exit 78 with one line naming both versions, no shard forked."""
    processor = start_processor({**env, "REDIS_URL": old_redis})
    assert processor.wait(30) == ExitCode.CONFIG
    assert "Redis 6.2.14 is older than the oldest supported, 7.0" in processor.halted_reason()
    assert "shard spawned" not in processor.log_messages()


def test_redis_in_service_passes(redis_client):
    check_redis(redis_client)
    assert redis_version(redis_client.info("server")) >= (7, 0)


@pytest.mark.parametrize("number, refused", [(140012, True), (MIN_POSTGRES - 1, True), (MIN_POSTGRES, False), (170002, False)])
def test_postgres_versions(number, refused):
    conn = SimpleNamespace(info=SimpleNamespace(server_version=number))
    if refused:
        with pytest.raises(UnsupportedServer, match=r"older than the oldest supported, 15"):
            check_postgres(conn)  # type: ignore[arg-type]
    else:
        check_postgres(conn)  # type: ignore[arg-type]


def test_an_unreadable_redis_version_is_refused():
    with pytest.raises(UnsupportedServer, match="cannot read"):
        redis_version({"redis_version": "seven"})
