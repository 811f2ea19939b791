"""Our Redis clients never resend a command by themselves (redis-py ≥ 6 does, by default)."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
import redis.exceptions

from common.redis_client import async_client, sync_client


@pytest.fixture
def dropping_server():
    """A TCP server that answers the connection handshake, then swallows PING: it closes
    the connection without a reply, as a network cut after the server executed it would."""
    listener = socket.create_server(("127.0.0.1", 0))
    pings: list[bytes] = []
    done = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                if b"PING" in data:
                    pings.append(data)
                    return
                conn.sendall(b"+OK\r\n" * data.count(b"*"))  # one reply per command of the handshake

    def serve() -> None:
        listener.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            handle(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0", pings
    done.set()
    thread.join(2)
    listener.close()


def test_sync_client_sends_a_command_once(dropping_server) -> None:
    """A lost reply is an error for the caller, not a silent second XREADGROUP."""
    url, commands = dropping_server
    client = sync_client(url, 2.0)
    with pytest.raises(redis.exceptions.ConnectionError):
        client.execute_command("PING")
    client.close()
    assert len(commands) == 1


def test_async_client_sends_a_command_once(dropping_server) -> None:
    url, commands = dropping_server

    async def go() -> None:
        client = async_client(url, 2.0)
        try:
            with pytest.raises(redis.exceptions.ConnectionError):
                await client.execute_command("PING")
        finally:
            await client.aclose()

    asyncio.run(go())
    assert len(commands) == 1


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "unix:///tmp/no.sock", "rediss://127.0.0.1:1/0"])
def test_commands_are_packed_byte_for_byte_as_redis_py_packs_them(url: str) -> None:
    """The one-join packing keeps the connection class (TCP, Unix socket, TLS) and redis-py's bytes."""
    import redis.asyncio.connection as connections

    client = async_client(url, 1.0)
    ours = client.connection_pool.make_connection()
    theirs_class = next(c for c in type(ours).__mro__[1:] if c.__module__ == connections.__name__)
    assert theirs_class.__name__ == type(ours).__name__
    theirs = theirs_class(**client.connection_pool.connection_kwargs)
    for args in [
        ("XACK", "stream", "group", *[f"1700000000000-{i}".encode() for i in range(2_000)]),
        ("CLIENT SETINFO", "LIB-NAME", "processor"),
        (b"CONFIG GET", "maxmemory"),
        ("SET", "ü-key", memoryview(b"\x00\xff" * 5_000)),
        ("XADD", b"s", 1, 2.5, -7, "x" * 10_000),
    ]:
        assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args)), args[0]
    asyncio.run(client.aclose())
