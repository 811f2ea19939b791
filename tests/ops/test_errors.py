"""The command line's error boundary: what each kind of Redis or Postgres failure becomes."""

from __future__ import annotations

import psycopg
import psycopg.errors
import pytest
import redis.exceptions as rx

from common.errors import ExitCode, ProcessorError
from ops.errors import POSTGRES, REDIS, Refused, SchemaMissing, translate, translated

REDIS_URL = "redis://:s3cret-pw@cache:6379/0"
PG_URL = "postgresql://app:s3cret-pw@db:5432/gps"


@pytest.mark.parametrize(
    ("server", "url", "exc", "kind", "exit_code", "message"),
    [
        (REDIS, REDIS_URL, rx.ConnectionError("Error 111 connecting"), ProcessorError, ExitCode.FAILED,
         "cannot reach Redis at redis://:***@cache:6379/0: Error 111 connecting"),
        (REDIS, REDIS_URL, rx.ResponseError("LOADING Redis is loading the dataset in memory"), ProcessorError,
         ExitCode.FAILED, "cannot reach Redis at redis://:***@cache:6379/0: LOADING"),
        (REDIS, REDIS_URL, rx.NoPermissionError("this user has no permissions to run the 'xadd' command"), Refused,
         ExitCode.CONFIG, "Redis user default may not run XADD: this user has no permissions"
         " to run the 'xadd' command (OPERATIONS.md, Redis ACL user)"),
        (REDIS, REDIS_URL, rx.AuthenticationError("invalid username-password pair"), Refused, ExitCode.CONFIG,
         "Redis at redis://:***@cache:6379/0 refused the credentials: invalid username-password pair"),
        (REDIS, REDIS_URL, rx.ResponseError("ERR syntax error"), ProcessorError, ExitCode.FAILED,
         "Redis rejected the command: ERR syntax error"),
        (POSTGRES, PG_URL, psycopg.OperationalError("connection failed: Connection refused"), ProcessorError,
         ExitCode.FAILED, "cannot reach Postgres at postgresql://app:***@db:5432/gps: connection failed"),
        (POSTGRES, PG_URL, psycopg.errors.InsufficientPrivilege("permission denied for table geofences"), Refused,
         ExitCode.CONFIG, "Postgres at postgresql://app:***@db:5432/gps refused the command: permission denied for"
         " table geofences (the Postgres user lacks this privilege)"),
        (POSTGRES, PG_URL, psycopg.errors.UndefinedTable('relation "geofences" does not exist'), SchemaMissing,
         ExitCode.CONFIG, "the database schema is missing or out of date (relation \"geofences\" does not exist);"
         " run `processor migrate` first"),
        (POSTGRES, PG_URL, psycopg.errors.UniqueViolation("duplicate key value"), ProcessorError, ExitCode.FAILED,
         "Postgres rejected the command: duplicate key value"),
    ],
)
def test_each_outcome_becomes_one_line(
    server: str, url: str, exc: Exception, kind: type[ProcessorError], exit_code: int, message: str
) -> None:
    """Outage: exit 1, "cannot reach"; refused: exit 78 naming what; anything else the server said: exit 1."""
    error = translate(server, url, exc)
    assert type(error) is kind and error.exit_code == exit_code
    assert str(error).startswith(message) and "s3cret" not in str(error)


def test_a_refused_connection_and_a_note() -> None:
    """A wrong password at connect says so; a note (what was done already) ends every message."""
    wrong = psycopg.OperationalError('connection failed: FATAL:  password authentication failed for user "app"')
    error = translate(POSTGRES, PG_URL, wrong, connecting=True)
    assert isinstance(error, Refused) and "refused the connection: connection failed" in str(error)
    outage = translate(REDIS, REDIS_URL, rx.TimeoutError("Timeout"), unreachable="cannot notify through", note="; x")
    assert str(outage) == "cannot notify through Redis at redis://:***@cache:6379/0: Timeout; x"


@pytest.mark.parametrize(
    "exc",
    [ValueError("a bug of ours"), KeyError("x"), ProcessorError("already a message"), psycopg.OperationalError("pg")],
)
def test_bugs_own_errors_and_the_other_servers_errors_pass_through(exc: Exception) -> None:
    """A bug propagates unchanged (a traceback, not a misleading message); so does a ProcessorError, and a
    Postgres error inside the Redis boundary (the Postgres boundary around it translates it)."""
    with pytest.raises(type(exc)) as caught, translated(REDIS, REDIS_URL):
        raise exc
    assert caught.value is exc


def test_ctrl_c_propagates() -> None:
    with pytest.raises(KeyboardInterrupt), translated(POSTGRES, PG_URL):
        raise KeyboardInterrupt


def test_migrate_with_postgres_unreachable_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`processor migrate` against a closed port: a clear line, no traceback, exit 1 (try again later)."""
    from ops.cli import main

    monkeypatch.setenv("DATABASE_URL", "postgresql://app:s3cret-pw@127.0.0.1:1/gps")
    assert main(["migrate"]) == ExitCode.FAILED
    err = capsys.readouterr().err
    assert "cannot connect to Postgres at postgresql://app:***@127.0.0.1:1/gps" in err
    assert "Traceback" not in err and "s3cret-pw" not in err


def test_a_bug_in_a_command_exits_70_with_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An error nobody translated is an internal error: exit 70 (SPEC §7), the message masked."""
    import ops.lag
    from ops.cli import main

    def broken(_settings: object, _args: object) -> int:
        raise KeyError("redis://u:s3cret-pw@h/0")

    monkeypatch.setattr(ops.lag, "cmd_lag", broken)
    monkeypatch.setenv("REDIS_URL", "redis://u:s3cret-pw@h/0")
    assert main(["lag"]) == ExitCode.SOFTWARE
    err = capsys.readouterr().err
    assert "processor: internal error: KeyError" in err and "s3cret-pw" not in err


def test_a_postgres_that_stops_answering_mid_command_is_an_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server frozen after the command connected (SIGSTOP, or a network that drops packets): libpq
    waited for ever. Now each answer is waited for AnswerBounded.answer_timeout_s, then one line, exit 1."""
    import signal
    import time

    import ops.errors
    from common.postgres import AnswerBounded
    from scripts.toolkit.processes import children, signal_all
    from scripts.toolkit.services import ThrowawayPostgres, missing_binaries

    if advice := missing_binaries():
        pytest.skip("; ".join(advice))
    monkeypatch.setattr(AnswerBounded, "answer_timeout_s", 1.0)
    with ThrowawayPostgres() as server:
        postmaster = int((server.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        with pytest.raises(ProcessorError) as failed, ops.errors.postgres(server.url) as conn:
            conn.execute("SELECT 1")
            frozen = [postmaster, *children(postmaster)]
            signal_all(frozen, signal.SIGSTOP)
            started = time.monotonic()
            try:
                conn.execute("SELECT 2")
            finally:
                waited = time.monotonic() - started
                signal_all(frozen, signal.SIGCONT)
    assert failed.value.exit_code == ExitCode.FAILED and waited < 10
    assert str(failed.value).startswith("cannot reach Postgres at") and "no answer within 1s" in str(failed.value)
