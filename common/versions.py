"""The oldest Redis and Postgres the Processor supports, checked at start-up (SPEC §7: exit 78).

Redis 7.0: XINFO GROUPS gained its `entries-read` and `lag` in 7.0 (and XINFO STREAM its
`entries-added` and `max-deleted-entry-id`); on 6.2 the loss watch and the lag would misread
replies instead of failing cleanly. Postgres 15: the version the schema and its partition
maintenance are built and tested on (the public schema without CREATE for PUBLIC, too).
"""

from __future__ import annotations

import psycopg
import redis

from common.errors import ConfigError

MIN_REDIS = (7, 0)
MIN_POSTGRES = 150000  # server_version_num of 15.0


class UnsupportedServer(ConfigError):
    """A server older than the oldest we support: restarting will not help."""


def redis_version(info: dict) -> tuple[int, ...]:
    """(major, minor, patch) from INFO server's `redis_version`."""
    raw = str(info.get("redis_version", ""))  # redis-py's INFO parser gives str keys, whatever decode_responses
    try:
        return tuple(int(part) for part in raw.split(".")[:3])
    except ValueError:
        raise UnsupportedServer(f"Redis reports a version we cannot read: {raw!r}") from None


def check_redis(client: redis.Redis) -> None:
    """Refuse a Redis older than MIN_REDIS (INFO server; the ACL rule allows it)."""
    version = redis_version(client.info("server"))
    if version < MIN_REDIS:
        raise UnsupportedServer(
            f"Redis {'.'.join(map(str, version))} is older than the oldest supported, "
            f"{'.'.join(map(str, MIN_REDIS))} (XINFO replies differ)"
        )


def check_postgres(conn: psycopg.Connection) -> None:
    """Refuse a Postgres older than MIN_POSTGRES."""
    number = conn.info.server_version
    if number < MIN_POSTGRES:
        raise UnsupportedServer(
            f"Postgres {number // 10000}.{number % 10000} is older than the oldest supported, "
            f"{MIN_POSTGRES // 10000}"
        )
