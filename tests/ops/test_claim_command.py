"""`processor claim` ends like every operator command: a bounded wait, one line, the contract's exit code.

It runs a shard's own pipeline, which waits out outages for ever and starts tasks of its
own; the command must neither wait for ever nor let a task's error reach the logs as a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from common.errors import ExitCode
from ops.claim_command import MAX_MIN_IDLE_MS
from ops.cli import build_parser
from scripts.toolkit.services import ThrowawayRedis
from tests.ops.letters import ROOT, run_cli

PASSWORD = "r1ght-" + uuid.uuid4().hex[:10]
# Connecting and the retries take a few seconds more than the command's patience (ops/claim.py).
BOUND_S = 30


@pytest.fixture
def claim_env(redis_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {**redis_env, "INSTANCE_ID": f"t{uuid.uuid4().hex[:6]}", "PANIC_DIR": str(tmp_path / "panic")}


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[ThrowawayRedis]:
    """A private Redis whose default user needs PASSWORD (the shared one must stay open)."""
    with ThrowawayRedis() as server:
        with redis.Redis.from_url(server.url) as admin:
            admin.config_set("requirepass", PASSWORD)
        yield server


def the_line(result: subprocess.CompletedProcess[str]) -> str:
    """The command's own stderr line; the shard's JSON logs around it are allowed, a traceback is not."""
    assert "Traceback" not in result.stderr and "never retrieved" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("setting", "url", "message"),
    [
        ("REDIS_URL", "redis://127.0.0.1:1/0", "processor: cannot reach Redis at redis://127.0.0.1:1/0: "),
        ("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/db",
         "processor: cannot connect to Postgres at postgresql://postgres@127.0.0.1:1/db: "),
    ],
)
def test_claim_gives_up_on_an_unreachable_server(claim_env: dict[str, str], setting: str, url: str, message: str) -> None:
    """An unreachable Redis or Postgres: exit 1 with one line within a bounded time, not a wait for ever."""
    started = time.monotonic()
    result = run_cli({**claim_env, setting: url}, "claim")
    assert time.monotonic() - started < BOUND_S
    assert result.returncode == ExitCode.FAILED, result.stderr
    assert the_line(result).startswith(message)


def test_claim_refused_password_is_one_line(claim_env: dict[str, str], locked_redis: ThrowawayRedis) -> None:
    """A wrong password: exit 78 and one line, and no 'Task exception was never retrieved' from the
    liveness task (it raced the join for the same refusal; three runs, as it lost most races)."""
    wrong = f"redis://:wrong@127.0.0.1:{locked_redis.port}/0"
    for _ in range(3):
        result = run_cli({**claim_env, "REDIS_URL": wrong}, "claim")
        assert result.returncode == ExitCode.CONFIG, result.stderr
        assert the_line(result).startswith("processor: ")
        assert "wrong" not in result.stderr


@pytest.mark.parametrize("value", ["99999999999999999999999999", str(MAX_MIN_IDLE_MS + 1), "-1", "1e3", "١٠", " 5", "5\n"])
def test_claim_min_idle_out_of_range_is_a_usage_error(value: str) -> None:
    """--min-idle-ms takes ASCII digits up to 100 years; anything else is exit 2, before Redis sees it."""
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["claim", "--min-idle-ms", value])
    assert caught.value.code == ExitCode.USAGE


def test_claim_min_idle_bounds_are_taken() -> None:
    for value in (0, MAX_MIN_IDLE_MS):
        assert build_parser().parse_args(["claim", "--min-idle-ms", str(value)]).min_idle_ms == value


def test_cli_claim_huge_min_idle_exits_2(claim_env: dict[str, str]) -> None:
    """The reproduced case, whole: exit 2 from argparse, not 70 with XAUTOCLAIM's traceback."""
    result = run_cli(claim_env, "claim", "--min-idle-ms", "99999999999999999999999999")
    assert result.returncode == ExitCode.USAGE
    assert "--min-idle-ms" in result.stderr and "Traceback" not in result.stderr


def test_claim_with_standard_input_closed_ends_cleanly(env: dict[str, str]) -> None:
    """With fd 0 closed, uvloop's epoll handle took it and libuv aborted the claim at the loop's
    close (SIGABRT, exit 134, no result printed); the entry point now holds /dev/null there."""
    from supervisor.migrations import apply_migrations

    apply_migrations(env["MIGRATION_DATABASE_URL"])
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env}
    done = subprocess.run(f"exec 0<&-; exec {sys.executable} -m ops claim --json", shell=True, env=full_env,
                          capture_output=True, text=True, timeout=BOUND_S)
    assert done.returncode == ExitCode.OK, done.stderr
    assert orjson.loads(done.stdout) == {"claimed": 0, "stored": 0, "dead_lettered": 0, "expired": 0, "gone": 0}
    assert "Assertion" not in done.stderr


def test_a_write_postgres_leaves_unanswered_ends_the_claim() -> None:
    """A frozen Postgres returns no error, so no retry loop counted a failure and the claim waited for
    its 300 s deadline: a batch write unanswered for POSTGRES_STALLED_S now ends it, one line, exit 1."""
    import asyncio
    from types import SimpleNamespace

    from common.config import Settings
    from common.errors import ProcessorError
    from common.status import StatusBoard
    from ops.claim import _watch_writes
    from shard.reporting import POSTGRES_STALLED_S, Report

    settings = Settings.from_env({"DATABASE_URL": "postgresql://app:s3cret-pw@db/gps"})
    report = Report(StatusBoard(1), 0, "t-claim")
    shard = SimpleNamespace(report=report, settings=settings)
    with pytest.raises(ProcessorError) as ended:
        report.writes_since[object()] = time.monotonic() - POSTGRES_STALLED_S - 1
        asyncio.run(asyncio.wait_for(_watch_writes(shard), 10))  # type: ignore[arg-type]
    message = str(ended.value)
    assert "a write got no answer within 20s" in message and "s3cret" not in message and "\n" not in message
