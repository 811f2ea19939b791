"""Wrong credentials or databases are configuration errors (exit 78), not outages to wait out."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from common.config import Settings
from common.errors import ExitCode
from common.status import StatusBoard
from shard.lifecycle import Shard
from tests.e2e.processes import wait_for

pytestmark = pytest.mark.e2e


def missing_database(url: str) -> str:
    return url.rsplit("/", 1)[0] + "/no_such_database_here"


def test_supervisor_halts_78_when_database_url_names_no_database(env, database_url, start_processor):
    """A valid MIGRATION_DATABASE_URL but a DATABASE_URL without a database: halt 78 before any shard starts."""
    processor = start_processor({**env, "DATABASE_URL": missing_database(database_url), "MIGRATION_DATABASE_URL": database_url})
    assert processor.wait(30) == ExitCode.CONFIG
    assert "shard spawned" not in processor.log_messages()
    halted = [e for e in processor.logs() if e["msg"] == "supervisor halted"]
    assert halted and "DATABASE_URL" in halted[0]["reason"]


def test_shard_exits_78_when_postgres_refuses_its_database(env, database_url, tmp_path):
    """A shard told to use a database that does not exist stops with 78 instead of retrying for ever."""
    settings = Settings.from_env({**env, "DATABASE_URL": missing_database(database_url), "SHARDS": "1"})
    pid = os.fork()
    if pid == 0:  # the shard's run() changes signal handlers and logging: keep it out of pytest
        os._exit(Shard(settings, 0, StatusBoard(1)).run())
    _, status = wait_for(lambda: (reaped := os.waitpid(pid, os.WNOHANG))[0] == pid and reaped, 30)
    assert os.waitstatus_to_exitcode(status) == ExitCode.CONFIG


@pytest.mark.parametrize("query", ["client_encoding=bogus", "options=-c%20statement_timeout%3Dabc", "service=no_such_service"])
def test_settings_the_server_refuses_at_connection_halt_78(env, database_url, start_processor, query):
    """A DATABASE_URL whose settings Postgres (or libpq) refuses when it connects is a configuration
    error, like a wrong password: halt 78 at once, not an outage waited out for a minute."""
    processor = start_processor({**env, "DATABASE_URL": f"{database_url}?{query}", "MIGRATION_DATABASE_URL": database_url})
    assert processor.wait(30) == ExitCode.CONFIG
    assert "shard spawned" not in processor.log_messages()


def test_a_redis_url_at_another_service_halts_78(env, start_processor):
    """REDIS_URL at a port where an HTTP server answers: redis-py's protocol error was a panic (70)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def answer() -> None:
            while True:
                try:
                    client, _ = server.accept()
                except OSError:
                    return  # the test closed the server
                with client:
                    client.recv(4096)
                    client.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        threading.Thread(target=answer, daemon=True).start()
        processor = start_processor({**env, "REDIS_URL": f"redis://127.0.0.1:{port}/0"})
        assert processor.wait(30) == ExitCode.CONFIG
    halted = [e for e in processor.logs() if e["msg"] == "supervisor halted"]
    assert halted and "Protocol error" in halted[0]["reason"]
