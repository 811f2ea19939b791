"""Signals from outside the supervisor's own SIGTERM: the whole process group, one shard, and the
others a service manager or a terminal sends (OPERATIONS.md, "Signals")."""

from __future__ import annotations

import os
import signal
import socket

import psycopg
import pytest

from scripts.toolkit.processes import catches, proc_title
from scripts.toolkit.services import free_port
from scripts.toolkit.writer import backlog
from tests.e2e.processes import wait_for
from tests.e2e.test_health import get
from tests.e2e.verify import finish_exactly, stored_count

pytestmark = pytest.mark.e2e


def test_a_sigterm_to_the_whole_process_group_drains(redis_client, database_url, stream_key, env, start_processor):
    """systemd's KillMode, `tini -g`, `kill -- -PGID`: each shard got the group's SIGTERM and then the
    supervisor's, took the second for "hurry", and left its in-flight batches pending. One drain now."""
    backlog(redis_client, stream_key, 20_000, devices=100, seed=31)
    port = free_port()
    processor = start_processor({**env, "DRAIN_TIMEOUT_S": "60", "HTTP_PORT": str(port)})
    wait_for(lambda: stored_count(database_url) > 1_000, what="the first rows")
    with psycopg.connect(database_url) as blocker:
        blocker.execute("LOCK TABLE positions IN ACCESS EXCLUSIVE MODE")  # batches in flight wait here
        wait_for(lambda: catches(processor.pid, signal.SIGTERM), what="the supervisor's handler")
        os.killpg(processor.pid, signal.SIGTERM)
        wait_for(lambda: "stopping shards" in processor.log_messages(), 10)
        status, body = get(port, "/healthz")  # the HTTP process got the group's SIGTERM too
        assert status == 503 and b"stopping" in body, body
    assert processor.wait(60) == 0
    [report] = [e["shards"] for e in processor.logs() if e["msg"] == "drain report"]
    assert sum(shard["in_flight"] for shard in report.values()) > 0, report
    assert all(shard["left_pending"] == 0 for shard in report.values()), report
    assert redis_client.xpending(stream_key, "processor")["pending"] == 0
    finish_exactly(start_processor(env), redis_client, database_url, stream_key)


def test_sigterm_to_one_shard_again_and_again_is_no_crash_loop(redis_client, database_url, stream_key, env, start_processor):
    """A shard told to stop drains and exits 0: the supervisor starts a new one at once and counts no
    crash (five within a minute halted the instance with 70)."""
    backlog(redis_client, stream_key, 3_000, devices=50, seed=32)
    processor = start_processor(env)
    processor.wait_for_shards(2)
    for _ in range(6):
        [shard] = [pid for pid in processor.shard_pids() if proc_title(pid).startswith("processor: shard 0 ")]
        wait_for(lambda: catches(shard, signal.SIGTERM), what="the shard's handler")
        os.kill(shard, signal.SIGTERM)
        wait_for(lambda: shard not in processor.shard_pids() and len(processor.shard_pids()) == 2, 30, what="a new shard 0")
    assert processor.log_messages().count("shard stopped when asked; starting a new one in its slot") == 6
    assert "supervisor halting" not in processor.log_messages()
    finish_exactly(processor, redis_client, database_url, stream_key)


@pytest.mark.parametrize("stop", [signal.SIGHUP, signal.SIGQUIT])
def test_a_hang_up_or_quit_stops_gracefully_and_usr1_is_ignored(redis_client, database_url, stream_key, env, start_processor, stop):
    """Their default, death, left the shards to drain alone with no report and no SPEC exit code."""
    backlog(redis_client, stream_key, 2_000, devices=50, seed=33)
    processor = start_processor(env)
    processor.wait_for_shards(2)
    wait_for(lambda: catches(processor.pid, signal.SIGUSR1), what="the supervisor's handlers")
    processor.signal(signal.SIGUSR1)
    wait_for(lambda: any(e["msg"].startswith("signal ignored") for e in processor.logs()), 10)
    assert processor.proc.poll() is None
    processor.signal(stop)
    assert processor.wait(30) == 0
    assert "drain report" in processor.log_messages()
    finish_exactly(start_processor(env), redis_client, database_url, stream_key)


def test_a_port_held_a_moment_longer_by_a_killed_instance_is_waited_for(env, start_processor):
    """After a SIGKILL of the supervisor its HTTP process holds HTTP_PORT until it notices (within a
    second): a replacement started at once halted with 78, "HTTP_PORT taken". Now it waits a little."""
    port = free_port()
    holder = socket.create_server(("0.0.0.0", port))
    processor = start_processor({**env, "HTTP_PORT": str(port)})
    wait_for(lambda: "supervisor starting" in processor.log_messages(), what="the supervisor")
    holder.close()
    wait_for(lambda: get(port, "/healthz")[0] in (200, 503), 30, what="HTTP_PORT answered")
    processor.wait_for_shards(2)
    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == 0
