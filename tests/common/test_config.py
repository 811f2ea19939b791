"""Settings.from_env (SPEC §4): defaults, one clear error per bad value, secrets never shown."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import Settings, redact_url
from common.errors import ConfigError, ExitCode

ROOT = Path(__file__).parents[2]
SECRET = "s3cret"


def test_defaults() -> None:
    """An empty environment gives every default of the SPEC §4 table."""
    s = Settings.from_env({})
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.database_url == "postgresql://localhost/processor"
    assert s.migration_database_url == s.database_url
    assert (s.stream_key, s.consumer_group, s.dlq_key) == ("telemetry:t", "processor", "telemetry:t:dlq")
    assert s.instance_id == (socket.gethostname() or "processor")
    assert s.shards == (os.cpu_count() or 1)
    assert (s.batch_size, s.claim_threshold_ms, s.claim_interval_ms) == (500, 60_000, 15_000)
    assert (s.max_failures, s.drain_timeout_s, s.device_cache_size) == (5, 20.0, 100_000)
    assert (s.panic_dir, s.log_level, s.http_port) == (Path("./panic"), "INFO", 8080)
    assert s.max_future_s == 300.0


def test_derived_defaults_follow_their_source() -> None:
    """DLQ_KEY defaults to <STREAM_KEY>:dlq and MIGRATION_DATABASE_URL to DATABASE_URL."""
    s = Settings.from_env({"STREAM_KEY": "gps:in", "DATABASE_URL": "postgresql://app@db:6432/gps"})
    assert s.dlq_key == "gps:in:dlq"
    assert s.migration_database_url == "postgresql://app@db:6432/gps"
    explicit = Settings.from_env({"STREAM_KEY": "gps:in", "DLQ_KEY": "dead", "MIGRATION_DATABASE_URL": "postgres://m@db/gps"})
    assert (explicit.dlq_key, explicit.migration_database_url) == ("dead", "postgres://m@db/gps")


def test_explicit_values_are_parsed() -> None:
    """Every variable set to a valid value is read with its type."""
    s = Settings.from_env({
        "REDIS_URL": "rediss://:pw@cache:6380/2", "SHARDS": "3", "BATCH_SIZE": "50",
        "CLAIM_THRESHOLD_MS": "1000", "CLAIM_INTERVAL_MS": "200", "MAX_FAILURES": "2",
        "DRAIN_TIMEOUT_S": "1.5", "DEVICE_CACHE_SIZE": "10", "PANIC_DIR": "/tmp/p",
        "LOG_LEVEL": "debug", "HTTP_PORT": "0", "INSTANCE_ID": "edge-a", "CONSUMER_GROUP": "g",
        "MAX_FUTURE_S": "0.5",
    })
    assert s.max_future_s == 0.5
    assert (s.redis_url, s.shards, s.batch_size, s.claim_threshold_ms) == ("rediss://:pw@cache:6380/2", 3, 50, 1000)
    assert (s.claim_interval_ms, s.max_failures, s.drain_timeout_s, s.device_cache_size) == (200, 2, 1.5, 10)
    assert (s.panic_dir, s.log_level, s.http_port, s.instance_id, s.consumer_group) == (
        Path("/tmp/p"), "DEBUG", 0, "edge-a", "g")


def test_positions_retention_days() -> None:
    """POSITIONS_RETENTION_DAYS: 0 (keep for ever) by default, a whole number of days up to 36,500."""
    assert Settings.from_env({}).positions_retention_days == 0
    assert Settings.from_env({"POSITIONS_RETENTION_DAYS": "30"}).positions_retention_days == 30
    assert Settings.from_env({"POSITIONS_RETENTION_DAYS": "36500"}).positions_retention_days == 36_500
    for bad in ("-1", "36501", "1.5", "forever", ""):
        with pytest.raises(ConfigError, match="POSITIONS_RETENTION_DAYS"):
            Settings.from_env({"POSITIONS_RETENTION_DAYS": bad})


def test_well_formed_values_that_look_unusual_are_accepted() -> None:
    """The stricter checks take what operators do write."""
    s = Settings.from_env({
        "SHARDS": "+3", "DRAIN_TIMEOUT_S": "1e1", "MAX_FUTURE_S": ".5", "REDIS_URL": "rediss://h:6380/?ssl_cert_reqs=required",
        "DATABASE_URL": "postgresql://u@h1:5432,h2:5433/db?sslmode=verify-full&target_session_attrs=read-write",
        "DLQ_KEY": "telemetry:t:dead", "PANIC_DIR": "/tmp/not/yet/made",
    })
    assert (s.shards, s.drain_timeout_s, s.max_future_s, s.dlq_key) == (3, 10.0, 0.5, "telemetry:t:dead")
    assert Settings.from_env({"REDIS_URL": "unix:///run/redis.sock?db=2"}).redis_url == "unix:///run/redis.sock?db=2"


def test_a_libpq_url_may_name_several_hosts() -> None:
    """SPEC §4: DATABASE_URL is a libpq URL: hosts to try in turn, each with its port or none."""
    url = "postgresql://app:s3cret@db1:5432,db2:5433,db3/gps?target_session_attrs=read-write"
    assert Settings.from_env({"DATABASE_URL": url}).database_url == url
    with pytest.raises(ConfigError, match="DATABASE_URL is not a valid URL") as info:
        Settings.from_env({"DATABASE_URL": "postgresql://app:s3cret@db1:5432,db2:fifty/gps"})
    assert "s3cret" not in str(info.value)


def test_the_longest_stream_key_gets_its_default_dlq() -> None:
    """A STREAM_KEY of 200 characters is valid, and so is the DLQ_KEY derived from it (204)."""
    settings = Settings.from_env({"STREAM_KEY": "s" * 200})
    assert settings.dlq_key == "s" * 200 + ":dlq"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SHARDS", "abc"), ("SHARDS", "0"), ("SHARDS", "-2"), ("SHARDS", "2.5"), ("SHARDS", ""), ("SHARDS", "  "),
        ("BATCH_SIZE", "0"), ("BATCH_SIZE", "lots"), ("CLAIM_THRESHOLD_MS", "-1"), ("CLAIM_INTERVAL_MS", "1e3"),
        ("MAX_FAILURES", "0"), ("DEVICE_CACHE_SIZE", "x"), ("HTTP_PORT", "70000"), ("HTTP_PORT", "-1"),
        ("DRAIN_TIMEOUT_S", "soon"), ("DRAIN_TIMEOUT_S", "-1"), ("DRAIN_TIMEOUT_S", "nan"), ("DRAIN_TIMEOUT_S", "inf"),
        ("LOG_LEVEL", "LOUD"), ("STREAM_KEY", "two words"), ("CONSUMER_GROUP", "tab\tgroup"),
        ("DLQ_KEY", "x" * 201), ("INSTANCE_ID", "bell\x07"), ("PANIC_DIR", ""),
        ("REDIS_URL", "http://x"), ("REDIS_URL", "localhost:6379"), ("REDIS_URL", "redis://"),
        ("DATABASE_URL", "mysql://u@h/db"), ("DATABASE_URL", "postgresql://h:port/db"),
        ("MIGRATION_DATABASE_URL", "redis://h/0"),
        ("MAX_FUTURE_S", "-1"), ("MAX_FUTURE_S", "soon"), ("MAX_FUTURE_S", "inf"),
        # int() and float() take these; an operator would not mean them.
        ("SHARDS", "1_0"), ("SHARDS", "\uff15"), ("BATCH_SIZE", "\u0661\u0660"), ("DRAIN_TIMEOUT_S", "1_0"),
        ("MAX_FUTURE_S", "\u0665"),
        # redis-py would pass an unknown parameter to its connection (TypeError at the first
        # command), fail on a malformed value at the first command, take a database that is
        # not a number for 0, and port 0 for 6379.
        ("REDIS_URL", "redis://127.0.0.1:6379/0?bogus=1"), ("REDIS_URL", "redis://127.0.0.1:6379/0?socket_timeout=abc"),
        ("REDIS_URL", "rediss://127.0.0.1:6379/0?ssl_cert_reqs=bogus"), ("REDIS_URL", "redis://127.0.0.1:6379/abc"),
        ("REDIS_URL", "redis://127.0.0.1:6379/-1"), ("REDIS_URL", "redis://127.0.0.1:0/0"),
        ("REDIS_URL", "rediss://h:6379/0?ssl_validate_ocsp=true"),  # the sync client takes it, the shards' asyncio one not
        ("REDIS_URL", "redis://h:6379/0?cache_config=x&protocol=3"),  # AttributeError in redis-py's constructor
        # Redis reads SELECT's index as an int, and beyond it answered "not an integer" (exit 70 in run).
        ("REDIS_URL", "redis://h:6379/2147483648"), ("REDIS_URL", "redis://h:6379/99999999999999999999"),
        ("REDIS_URL", "redis://h:6379/0?db=99999999999999999999"), ("REDIS_URL", "redis://h:6379/0?db=-1"),
        # Options the Processor sets itself, which redis-py would let the URL override: bytes
        # replies, RESP2, timeouts, the pool, the client's name.
        ("REDIS_URL", "redis://h:6379/0?decode_responses=True"), ("REDIS_URL", "redis://h:6379/0?protocol=2"),
        ("REDIS_URL", "redis://h:6379/0?socket_timeout=5"), ("REDIS_URL", "redis://h:6379/0?max_connections=1"),
        ("REDIS_URL", "redis://h:6379/0?client_name=x"), ("REDIS_URL", "unix:///tmp/r.sock?encoding=latin-1"),
        ("SHARDS", "1" * 5_000),  # int() refuses over 4,300 digits with its own ValueError
        # libpq checks these values only when it connects, and says so as an outage would.
        ("DATABASE_URL", "postgresql://u@h:5432/db?sslmode=bogus"),
        ("DATABASE_URL", "postgresql://u@h:5432/db?target_session_attrs=bogus"),
        ("DATABASE_URL", "postgresql://u@h:0/db"), ("MIGRATION_DATABASE_URL", "postgresql://u@h1:5432,h2:0/db"),
        ("DATABASE_URL", "postgresql://u@h:5432/db\nfoo"), ("REDIS_URL", "redis://h :6379/0"),
        # Dead letters written into the input stream would be read and dead-lettered for ever.
        ("DLQ_KEY", "telemetry:t"), ("DLQ_KEY", "telemetry:t:group:processor:failures"), ("DLQ_KEY", "telemetry:t:alive:a-0"),
        # Panic dumps could never be written there.
        ("PANIC_DIR", "/etc/passwd"), ("PANIC_DIR", "/etc/passwd/panic"),
    ],
)
def test_malformed_value_names_the_variable(name: str, value: str) -> None:
    """Each malformed value raises ConfigError naming the variable, on one line."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    message = str(info.value)
    assert name in message
    assert "\n" not in message
    assert info.value.exit_code == ExitCode.CONFIG == 78


@pytest.mark.parametrize("name", ["DATABASE_URL", "MIGRATION_DATABASE_URL", "REDIS_URL"])
@pytest.mark.parametrize(
    "template",
    [
        "{scheme}://u:s3cret@nohost:99999/db",  # port out of range
        "{scheme}://u:s3cret@nohost:xyz/db",  # port not a number
        "{scheme}://u:s3cret@[::1/db",  # broken IPv6 literal
        "http://u:s3cret@nohost/db",  # wrong scheme
        "mysql://u@host/db?password=s3cret",  # wrong scheme, password in the query
        "{scheme}://u:s3/cret@host:5432/db",  # unencoded '/' in the password
        "{scheme}://u:s3#cret@host:5432/db",  # unencoded '#' in the password
        "{scheme}://u:s3cret@host:5432/db?bogus=1",  # a parameter no client takes
        "{scheme}://u:s3cret\n@host:5432/db",  # a line break pasted into the password
        # Text that only resembles a URL is echoed when refused: the password is masked all the same.
        '"{scheme}://u:s3cret@host:5432/db"',  # quoted, as an .env file writes it
        "'{scheme}://u:s3cret@host:5432/db'",
        "<{scheme}://u:s3cret@host:5432/db>",
        "{name}={scheme}://u:s3cret@host:5432/db",  # the whole assignment pasted as the value
        "\ufeff{scheme}://u:s3cret@host:5432/db",  # a byte-order mark from a Windows editor
        "\x01{scheme}://u:s3cret@host:5432/db",
        "1{scheme}://u:s3cret@host:5432/db",
        "{scheme}:/u:s3cret@host:5432/db",  # a slash short
        "{scheme}:/u:s3//cret@host:5432/db",  # ... and a '//' in the password
        "{scheme}//u:s3cret@host:5432/db",  # no colon after the scheme
        "{scheme}://:s3cret@host:5432/db",  # no user name
    ],
    ids=["bad-port", "port-nan", "ipv6", "scheme", "query", "slash-in-password", "hash-in-password", "parameter", "newline",
         "double-quoted", "single-quoted", "angle-brackets", "assignment", "bom", "control-character", "digit-before",
         "one-slash", "one-slash-and-slashes-in-password", "no-colon", "no-user"],
)
def test_url_errors_never_contain_the_password(name: str, template: str) -> None:
    """A URL that is rejected or accepted never has its password in an error message."""
    scheme = "redis" if name == "REDIS_URL" else "postgresql"
    url = template.format(scheme=scheme, name=name)
    try:
        Settings.from_env({name: url})
    except ConfigError as exc:
        assert name in str(exc)
        for part in ("s3cret", "s3/", "s3#", "cret@"):
            assert part not in str(exc)


def test_redacted_masks_every_password() -> None:
    """Settings.redacted() masks the passwords of all three URLs and keeps the rest."""
    s = Settings.from_env({
        "REDIS_URL": "redis://:r3dis@cache:6379/0",
        "DATABASE_URL": "postgresql://app:s3cret@db:5432/gps?sslmode=require",
        "MIGRATION_DATABASE_URL": "postgresql://owner:m1grate@db:5432/gps?password=q3ry",
        "PANIC_DIR": "/var/panic",
    })
    values = s.redacted()
    assert values["redis_url"] == "redis://:***@cache:6379/0"
    assert values["database_url"] == "postgresql://app:***@db:5432/gps?sslmode=require"
    assert values["migration_database_url"] == "postgresql://owner:***@db:5432/gps?password=***"
    assert values["panic_dir"] == "/var/panic" and values["shards"] == s.shards
    assert not any(secret in repr(values) for secret in ("r3dis", "s3cret", "m1grate", "q3ry"))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://h:5432/db?sslmode=require&password=pw", "postgresql://h:5432/db?sslmode=require&password=***"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    """redact_url masks a userinfo password and a password= query value, nothing else."""
    assert redact_url(url) == expected


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening TCP socket nobody should connect to: a connection attempt would queue on it."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as server:
        server.setblocking(False)
        yield server


def contacted(server: socket.socket) -> bool:
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def run_cli(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "ops", *args],
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env},
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    return result, time.monotonic() - started


@pytest.mark.parametrize(
    ("bad", "name"),
    [
        ({"SHARDS": "abc"}, "SHARDS"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"DATABASE_URL": f"postgresql://u:{SECRET}@nohost:99999/db"}, "DATABASE_URL"),
    ],
)
def test_cli_config_error_exits_78_with_one_line(listener: socket.socket, bad: dict[str, str], name: str) -> None:
    """`processor run` with a bad setting exits 78 fast, one stderr line naming it, no secret, no connection."""
    port = listener.getsockname()[1]
    env = {
        "REDIS_URL": f"redis://:{SECRET}@127.0.0.1:{port}/0",
        "DATABASE_URL": f"postgresql://u:{SECRET}@127.0.0.1:{port}/db",
        "HTTP_PORT": "0",
        **bad,
    }
    result, elapsed_s = run_cli(env, "run")
    assert result.returncode == 78, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert name in lines[0]
    assert SECRET not in result.stderr + result.stdout
    assert elapsed_s < 10
    assert not contacted(listener)


def test_cli_unknown_command_exits_2() -> None:
    """`processor bogus` is a usage error: exit 2."""
    result, _ = run_cli({}, "bogus")
    assert result.returncode == 2
    assert "bogus" in result.stderr


@pytest.mark.parametrize("groups", [("processor", "archive"), ("a", "a:failures"), ("a:lost", "a"), ("x:lost-watch", "x")])
def test_the_bookkeeping_keys_of_two_groups_never_meet(groups: tuple[str, str]) -> None:
    """Two deployments on one stream through two groups (even with names like another's keys) keep
    their failure counts and loss counters apart."""
    from common.keys import failures_key, loss_watch_key, lost_key

    first, second = ({make("telemetry:t", group) for make in (failures_key, lost_key, loss_watch_key)} for group in groups)
    assert len(first) == len(second) == 3 and not first & second
