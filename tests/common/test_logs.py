"""JSON-lines logging on stdout and the password scrubber."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from common import logs

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
NOISY = ("asyncio", "psycopg", "redis")

pytestmark = pytest.mark.usefixtures("fresh_secrets")  # each test's secrets are its own (common.logs._SECRETS)


@pytest.fixture
def configured(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """logs.configure() for this test only: the root logger's handlers and levels are restored after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, {name: logging.getLogger(name).level for name in NOISY})
    yield capsys
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict]:
    out = capsys.readouterr().out
    return [orjson.loads(line) for line in out.splitlines()]


def test_records_are_json_lines_with_standard_fields(configured: pytest.CaptureFixture[str]) -> None:
    """Each record is one JSON object on stdout with time, level, logger, process, pid and msg."""
    logs.configure("INFO", "shard-3")
    logging.getLogger("processor.test").info("stored %d fixes", 42)
    [entry] = lines(configured)
    assert TIME.match(entry["time"])
    assert entry["level"] == "INFO"
    assert entry["logger"] == "processor.test"
    assert entry["msg"] == "stored 42 fixes"
    assert entry["process"] == "shard-3"
    assert isinstance(entry["pid"], int)


def test_extra_fields_are_top_level_members(configured: pytest.CaptureFixture[str]) -> None:
    """`extra` fields become members of the line; values JSON cannot hold are written as text."""
    logs.configure("DEBUG", "supervisor")
    logging.getLogger("processor.test").debug(
        "batch", extra={"entries": 500, "seconds": 0.25, "shard": 1, "path": Path("/tmp/x"), "ids": ["1-0"]}
    )
    [entry] = lines(configured)
    assert entry["msg"] == "batch" and entry["level"] == "DEBUG"
    assert (entry["entries"], entry["seconds"], entry["shard"], entry["path"], entry["ids"]) == (
        500, 0.25, 1, "/tmp/x", ["1-0"])


def test_level_filters_and_exceptions_are_included(configured: pytest.CaptureFixture[str]) -> None:
    """Records below the level are dropped; an exception's traceback goes in `exc` on the same line."""
    logs.configure("WARNING", "cli")
    log = logging.getLogger("processor.test")
    log.info("hidden")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    [entry] = lines(configured)
    assert entry["level"] == "ERROR" and entry["msg"] == "failed"
    assert "RuntimeError: boom" in entry["exc"]


def test_configure_replaces_handlers(configured: pytest.CaptureFixture[str]) -> None:
    """Configuring twice (as after a fork) leaves one handler: each record is written once."""
    logs.configure("INFO", "a")
    logs.configure("INFO", "b")
    logging.getLogger("processor.test").info("once")
    assert [e["process"] for e in lines(configured)] == ["b"]


def test_passwords_in_messages_are_scrubbed(configured: pytest.CaptureFixture[str]) -> None:
    """A password in a message, argument or extra field never reaches stdout."""
    logs.configure("INFO", "cli")
    logging.getLogger("processor.test").info(
        "connecting to %s", "postgresql://app:hunter2@db/gps", extra={"redis": "redis://:hunter2@cache:6379/0"}
    )
    out = configured.readouterr().out
    assert "hunter2" not in out
    entry = orjson.loads(out)
    assert entry["msg"] == "connecting to postgresql://app:***@db/gps"
    assert entry["redis"] == "redis://:***@cache:6379/0"


def test_keyword_password_at_end_of_message_keeps_the_line_valid_json(configured: pytest.CaptureFixture[str]) -> None:
    """A message ending in `password=...` is scrubbed and the line is still JSON with every field."""
    logs.configure("INFO", "cli")
    logging.getLogger("processor.test").info("dsn host=db password=hunter2", extra={"shard": 2})
    out = configured.readouterr().out
    assert "hunter2" not in out
    entry = orjson.loads(out)
    assert entry["msg"] == "dsn host=db password=***"
    assert entry["shard"] == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://:pw@h", "redis://:***@h"),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        ("password=pw", "password=***"),
        ("host=h password = pw port=5", "host=h password = *** port=5"),
        ("PASSWORD='p w' user=u", "PASSWORD=*** user=u"),
        ("error at rediss://user:pw@h:6380 and postgres://u:x@h2/db", "error at rediss://user:***@h:6380 and postgres://u:***@h2/db"),
    ],
)
def test_scrub_masks_passwords(text: str, expected: str) -> None:
    """scrub masks URL passwords and password= values."""
    assert logs.scrub(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        '{"redis":"redis://h:6379/0","db":"postgresql://u@h:5432/db"}',
        '{"redis":"redis://h:6379","db":"postgresql://u@h/db"}',
        '{"a":"http://h:80","b":"user@example.com"}',
        "redis://h:6379,postgresql://u@h/db",
        "no secrets here: 12:30 user@host",
    ],
)
def test_scrub_leaves_text_without_passwords_alone(text: str) -> None:
    """Adjacent URLs without passwords (even in one JSON line) and other text are not changed."""
    assert logs.scrub(text) == text


def test_a_secret_inside_a_longer_one_leaves_nothing_of_it() -> None:
    """Secrets are masked longest first, whatever order they were registered in."""
    logs.add_secret("n3sted")
    logs.add_secret("outer-n3sted-pw")
    assert logs.scrub("pw outer-n3sted-pw and n3sted") == "pw *** and ***"
