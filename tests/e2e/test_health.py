"""/healthz and /metrics of a running supervisor."""

from __future__ import annotations

import os
import signal
import urllib.error
import urllib.request

import orjson
import pytest

from scripts.toolkit.services import ThrowawayPostgres, free_port
from scripts.toolkit.writer import backlog
from supervisor.migrations import apply_migrations
from tests.e2e.processes import wait_for
from tests.e2e.verify import assert_exact, wait_settled
from tests.services import with_database

pytestmark = pytest.mark.e2e


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def metric(text: bytes, name: str) -> dict[str, float]:
    """Samples of one metric: {label text: value}."""
    values = {}
    for line in text.decode().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key[len(name):]] = float(value)
    return values


def test_health_turns_503_when_a_shard_dies_and_200_after_its_restart(env, start_processor):
    """SIGKILL of a shard: /healthz says 503 with the reason within 10 s, then 200 once it is back."""
    port = free_port()
    processor = start_processor({**env, "HTTP_PORT": str(port)})
    wait_for(lambda: get(port, "/healthz")[0] == 200, 30, what="healthy")
    victim = processor.wait_for_shards(2)[0]
    os.kill(victim, signal.SIGKILL)
    status, body = wait_for(lambda: (r := get(port, "/healthz"))[0] == 503 and r, 10, 0.02, what="503")
    assert any("not running" in reason or "unreachable" in reason for reason in orjson.loads(body)["reasons"])
    wait_for(lambda: get(port, "/healthz")[0] == 200, 30, what="healthy again")
    assert metric(get(port, "/metrics")[1], "processor_shard_restarts_total")['{shard="0"}'] + metric(
        get(port, "/metrics")[1], "processor_shard_restarts_total"
    )['{shard="1"}'] == 1


def test_health_follows_postgres(redis_client, stream_key, env, start_processor):
    """Postgres stopped: 503 naming Postgres within 10 s; started again: 200, without a restart."""
    with ThrowawayPostgres(fsync=False) as postgres:
        url = with_database(postgres.url, "postgres")
        apply_migrations(url)
        port = free_port()
        processor = start_processor({**env, "DATABASE_URL": url, "MIGRATION_DATABASE_URL": url, "HTTP_PORT": str(port)})
        wait_for(lambda: get(port, "/healthz")[0] == 200, 30, what="healthy")
        shards = processor.wait_for_shards(2)
        postgres.stop()
        status, body = wait_for(lambda: (r := get(port, "/healthz"))[0] == 503 and r, 10, 0.1, what="503")
        assert any("Postgres unreachable" in reason for reason in orjson.loads(body)["reasons"])
        postgres.start()
        wait_for(lambda: get(port, "/healthz")[0] == 200, 30, what="healthy again")
        assert processor.shard_pids() == shards


def test_metrics_count_what_two_instances_share(redis_client, database_url, stream_key, env, start_processor):
    """Two instances drain one backlog: their metrics add up to it, each did 35-65% of it, lag ends at 0."""
    ports = [free_port(), free_port()]
    for name, port in zip(("alpha", "beta"), ports):
        start_processor({**env, "INSTANCE_ID": name, "HTTP_PORT": str(port), "BATCH_SIZE": "100"}, name=name)
    # Both instances must have joined before the backlog appears, or the first would take it all.
    wait_for(lambda: redis_client.exists(stream_key) and len(redis_client.xinfo_consumers(stream_key, "processor")) == 4, 30)
    backlog(redis_client, stream_key, 20_000, devices=500, seed=41)
    wait_settled(redis_client, database_url, stream_key, 60)
    assert_exact(redis_client, database_url, stream_key)
    shares = [sum(metric(get(port, "/metrics")[1], "processor_entries_processed_total").values()) for port in ports]
    assert sum(shares) == 20_000
    assert all(0.35 <= share / 20_000 <= 0.65 for share in shares), shares
    text = get(ports[0], "/metrics")[1]
    assert metric(text, "processor_consumer_lag")[""] == 0
    assert metric(text, "processor_pending_entries")[""] == 0
    assert metric(text, "processor_batch_seconds_count")[""] > 0


def test_health_answers_503_while_the_supervisor_waits_for_postgres_at_start_up(env, start_processor):
    """Postgres not there yet: /healthz answers 503 (supervisor: starting) during the wait, and a
    SIGTERM then ends the wait, the HTTP process with it, and exits 0."""
    port = free_port()
    gone = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    processor = start_processor({**env, "DATABASE_URL": gone, "MIGRATION_DATABASE_URL": gone, "HTTP_PORT": str(port)})
    status, body = wait_for(lambda: (r := get(port, "/healthz"))[0] and r, 20, 0.1, what="an answer")
    assert status == 503
    assert "supervisor: starting" in orjson.loads(body)["reasons"]
    processor.signal()
    assert processor.wait(20) == 0
    assert get(port, "/healthz") == (0, b""), "the HTTP process outlived the supervisor"
