"""Fixtures of the operator-command tests that use Redis only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from common.config import Settings
from common.redis_client import keep_field_pairs
from tests.ops.letters import GROUP


@pytest.fixture
def redis_env(redis_url: str, stream_key: str) -> dict[str, str]:
    """Environment for the stream commands: Redis and this test's stream (no Postgres needed)."""
    return {"REDIS_URL": redis_url, "STREAM_KEY": stream_key, "CONSUMER_GROUP": GROUP, "LOG_LEVEL": "INFO"}


@pytest.fixture
def stream_settings(redis_env: dict[str, str]) -> Settings:
    return Settings.from_env(redis_env)


@pytest.fixture
def raw_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client that returns stream entries' fields as Redis holds them: flat lists, repeats kept."""
    with redis.Redis.from_url(redis_url) as client:
        keep_field_pairs(client)
        yield client
