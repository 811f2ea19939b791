"""Every Redis client the Processor opens: bounded timeouts, and no retries of its own.

redis-py (6 and later) silently sends a command again after a connection error, up to
ten times by default. An XREADGROUP or HINCRBY whose first reply was lost has already
run: sent again, it delivers other entries or counts a failure twice, and the entries
of the lost reply sit unseen in a pending list. So our clients never retry by
themselves; every lost reply reaches the code that knows what it means (common/retry.py
and the shard's re-read of its own pending entries).

TLS: a rediss:// URL; from_url passes its query parameters on, so `ssl_ca_certs=<CA file>`
names the CA that signed the server's certificate (host name checked too, by default).
"""

from __future__ import annotations

import functools
import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from redis.backoff import NoBackoff

from common.errors import ConfigError

# Query parameters of a rediss:// URL that name files; redis-py passes them to the ssl module.
TLS_FILE_PARAMETERS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path")


def _options(timeout_s: float, name: str | None) -> dict[str, Any]:
    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry_on_timeout": False,
        "client_name": name,
        "protocol": 2,  # RESP2 replies, as every parser of ours expects
    }


def check_tls_files(url: str) -> None:
    """Each file a Redis URL names for TLS must be readable: ConfigError (exit 78) if not.

    redis-py would only fail at connect time, with an ENOENT that looks like an outage.
    """
    for name, values in parse_qs(urlsplit(url).query).items():
        if name not in TLS_FILE_PARAMETERS:
            continue
        path = values[0]  # as redis-py's from_url reads it
        try:
            if name == "ssl_ca_path":
                os.listdir(path)
            else:
                with open(path, "rb"):
                    pass
        except OSError as exc:
            raise ConfigError(f"{name}={path} in the Redis URL cannot be read: {exc.strerror or exc}") from None


def sync_client(url: str, timeout_s: float, name: str | None = None) -> redis.Redis:
    """A blocking client (supervisor, operator commands) that returns bytes."""
    check_tls_files(url)
    return redis.Redis.from_url(url, retry=redis.retry.Retry(NoBackoff(), 0), **_options(timeout_s, name))


def async_client(url: str, timeout_s: float, name: str | None = None, health_check_s: int = 0) -> redis.asyncio.Redis:
    """An asyncio client (shards) that returns bytes; `health_check_s` pings a pooled
    connection idle that long before using it, so one from before a restart is checked."""
    check_tls_files(url)
    client = redis.asyncio.Redis.from_url(
        url,
        retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
        health_check_interval=health_check_s,
        **_options(timeout_s, name),
    )
    pool = client.connection_pool
    pool.connection_class = _packing_in_one_join(pool.connection_class)  # TCP, TLS or Unix socket alike
    return client


class _OneJoinPacking:
    """redis-py's asyncio `pack_command` joins its growing buffer again for every argument,
    up to 6 KB: an XACK of 500 ids cost a shard 0.3-0.4 ms. The same bytes, in one join."""

    encoder: Any

    def pack_command(self, *args: Any) -> list[bytes]:
        # As redis-py does: a command name with a space ("CLIENT SETINFO") is several arguments.
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        encode = self.encoder.encode
        pieces = [b"*%d\r\n" % len(args)]
        for arg in args:
            value = encode(arg)
            pieces += (b"$%d\r\n" % len(value), value, b"\r\n")
        return [b"".join(pieces)]


@functools.cache
def _packing_in_one_join(connection_class: type) -> type:
    return type(connection_class.__name__, (_OneJoinPacking, connection_class), {})


def _entries(response: list[Any] | None, **_options: Any) -> list[tuple[bytes, list[bytes] | None]]:
    """Stream entries with their fields as Redis sent them: a flat [name, value, …] list
    (None for an entry deleted while pending). redis-py's own parsers make a dict, which
    merges repeated field names; a dead letter must keep them."""
    return [(entry[0], entry[1]) for entry in response or () if entry is not None]


def _read(response: list[Any] | dict[Any, Any] | None, **options: Any) -> list[list[Any]]:
    streams = response.items() if isinstance(response, dict) else response or ()  # RESP3 sends a map
    return [[stream, _entries(entries)] for stream, entries in streams]


def _claim(response: list[Any], **options: Any) -> list[Any]:
    return response if options.get("parse_justid", False) else _entries(response)


def text(value: bytes | str) -> str:
    """Text of a Redis value, for logs, metrics and output. Redis names (groups, consumers) may be
    any bytes: those that are not UTF-8 appear as \\xNN escapes. Never sent back to Redis: a name
    given to a command again is passed as the bytes Redis sent."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def keep_field_pairs(client: redis.Redis | redis.asyncio.Redis) -> None:
    """Make `client` return stream entries' fields as flat lists of names and values."""
    for command, parser in (
        ("XRANGE", _entries),
        ("XREVRANGE", _entries),
        ("XREADGROUP", _read),
        ("XREAD", _read),
        ("XCLAIM", _claim),
    ):
        client.set_response_callback(command, parser)
