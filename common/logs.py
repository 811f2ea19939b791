"""JSON-lines logging on stdout, configured again in every process after fork."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from typing import Any, TextIO

import orjson

# A last line of defence: whatever a message or exception quotes, a URL's password never leaves.
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s\"']*):[^@\s/\"']*@", re.IGNORECASE)
# `password=`, `sslpassword=`, `ssl_password=`: a libpq value may be quoted, with \' inside.
_KEYWORD_PASSWORD = re.compile(r"(?P<head>password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s\"',;&]+)", re.IGNORECASE)

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


# Passwords read from the configuration, masked wherever they appear (a driver's error
# message may quote one outside any URL). Kept longest first, so that a secret inside a longer
# one cannot leave the rest of that one showing; sorted when one is added (at start-up), not
# for every string `scrub` sees.
_SECRETS: list[str] = []
MIN_SECRET_CHARS = 4  # shorter values would mask ordinary words


def add_secret(value: str | None) -> None:
    if value and len(value) >= MIN_SECRET_CHARS and value not in _SECRETS:
        _SECRETS.append(value)
        _SECRETS.sort(key=len, reverse=True)


def scrub(text: str) -> str:
    """Mask passwords in URLs and `password=` pairs, and every configured password."""
    text = _URL_PASSWORD.sub(r"\g<head>:***@", text)
    text = _KEYWORD_PASSWORD.sub(r"\g<head>***", text)
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _scrubbed(value: Any) -> Any:
    """Scrub every string inside a log field, leaving the JSON structure intact."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {key: _scrubbed(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrubbed(item) for item in value]
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, process, message and any `extra` fields."""

    def __init__(self, process_name: str) -> None:
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": self.process_name,
            "pid": record.process,
            "msg": scrub(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = _scrubbed(value)
        if record.exc_info:
            entry["exc"] = scrub(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=lambda v: scrub(str(v))).decode()


class _LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that outlives its reader: once the pipe it writes to is closed (`processor
    run | jq` ended by a Ctrl-C), the logs go nowhere, said once on stderr, rather than a
    traceback on stderr for every line and, at exit, a failed flush."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            drop_stream(self.stream)
            with contextlib.suppress(OSError, ValueError):
                process = getattr(self.formatter, "process_name", "")
                print(f"processor {process}: the reader of {self.name or 'the log'} went away; logs are dropped from now on",
                      file=sys.stderr)
            return
        super().handleError(record)


def drop_stream(stream: TextIO) -> None:
    """Point `stream`'s file descriptor at /dev/null: what is buffered or written later goes nowhere."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def configure(level: str, process_name: str, stream: TextIO | None = None) -> None:
    """Route every logger to stdout (or `stream`) as JSON lines; replaces handlers inherited across fork."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stream = stream or sys.stdout
    handler = _LineHandler(stream)
    handler.set_name({sys.stdout: "standard output", sys.stderr: "standard error"}.get(stream, getattr(stream, "name", "the log")))
    handler.setFormatter(JsonFormatter(process_name))
    root.addHandler(handler)
    root.setLevel(level)
    # Library chatter at INFO (connection pools, retries) is noise in a pipeline's logs.
    for noisy in ("asyncio", "psycopg", "redis"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
