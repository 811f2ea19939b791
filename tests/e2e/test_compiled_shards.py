"""`processor run` says whether its shards run compiled, and stores exactly either way."""

from __future__ import annotations

import signal

import pytest

from scripts.toolkit.writer import backlog
from tests.e2e.processes import wait_for
from tests.e2e.verify import assert_exact, wait_settled
from tests.shard.test_compiled import module_names

pytestmark = pytest.mark.e2e


def shard_starts(processor) -> list[dict]:  # type: ignore[no-untyped-def]
    return [entry for entry in processor.logs() if entry["msg"] == "shard starting"]


def test_shards_run_compiled_and_say_so(redis_client, database_url, stream_key, env, start_processor):
    processor = start_processor(env)
    starts = wait_for(lambda: len(s := shard_starts(processor)) == 2 and s, what="both shards' start lines")
    assert [(s["compiled_modules"], s["from_source"]) for s in starts] == [(len(module_names()), {})] * 2
    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == 0


def test_pure_python_shards_store_exactly(redis_client, database_url, stream_key, env, start_processor):
    """The fallback is the same source, run by the interpreter: every fix once, or once in the DLQ."""
    counts = backlog(redis_client, stream_key, 3_000, devices=40, seed=41, malformed_fraction=0.05)
    assert counts.malformed > 50
    processor = start_processor({**env, "PROCESSOR_PURE_PYTHON": "1"})
    wait_settled(redis_client, database_url, stream_key, 90)
    assert_exact(redis_client, database_url, stream_key)
    assert {s["compiled_modules"] for s in shard_starts(processor)} == {0}
    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == 0
