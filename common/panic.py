"""Panic handling: an uncaught error is logged, dumped to PANIC_DIR as JSON, and exits 70.

Installed in the supervisor and again in every shard after fork. The dump holds what an
operator needs to see what the process was doing: its in-memory state (device cache,
in-flight entry ids), the redacted configuration and the traceback. Never a password.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from common.config import Settings
from common.errors import ExitCode
from common.logs import scrub

log = logging.getLogger("processor.panic")

# Test-only: set to "<where>" to make the process crash there (see crash_point); unset in production.
TEST_CRASH_ENV = "PROCESSOR_TEST_CRASH"

StateProvider = Callable[[], dict[str, Any]]


class Panic:
    """One per process: knows where to dump and how to describe the process's state."""

    def __init__(self, settings: Settings, process_name: str, state: StateProvider | None = None) -> None:
        self.settings = settings
        self.process_name = process_name
        self.state = state or (lambda: {})

    def install(self) -> None:
        sys.excepthook = self.excepthook
        threading.excepthook = self.thread_excepthook

    def loop_exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An exception nobody retrieved from a task or callback: the asyncio 'unhandled rejection'."""
        exc = context.get("exception")
        if exc is None:  # a warning from asyncio itself, not an error
            loop.default_exception_handler(context)
            return
        self.crash(type(exc), exc, exc.__traceback__, where=str(context.get("message", "event loop")))

    def excepthook(self, kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        self.crash(kind, exc, tb, where="main thread")

    def thread_excepthook(self, args: threading.ExceptHookArgs) -> None:
        self.crash(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback, where=f"thread {args.thread}")

    def crash(self, kind: type[BaseException], exc: BaseException, tb: TracebackType | None, where: str) -> None:
        """Log, dump, exit 70. Never returns."""
        text = scrub("".join(traceback.format_exception(kind, exc, tb)))
        path = self.dump(text, where)
        extra = {"where": where, "error": scrub(f"{kind.__name__}: {exc}"), "dump": str(path) if path else None}
        if path is None:
            extra["traceback"] = text  # no dump to read it in: the log line is the only record
        log.critical("panic: uncaught exception", extra=extra)
        logging.shutdown()
        os._exit(ExitCode.SOFTWARE)

    def dump(self, text: str, where: str) -> Path | None:
        try:
            state = self.state()
        except Exception as exc:  # a broken provider must not hide the original error
            state = {"state_unavailable": repr(exc)}
        document = {
            "process": self.process_name,
            "pid": os.getpid(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "where": where,
            "traceback": text,
            "config": self.settings.redacted(),
            "state": state,
        }
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path = self.settings.panic_dir / f"panic-{self.process_name}-{os.getpid()}-{stamp}.json"
        try:
            text = orjson.dumps(document, default=str, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
        except (TypeError, ValueError) as exc:  # the dump must never stop the exit
            document["state"] = {"state_unavailable": repr(exc)}
            text = orjson.dumps(document, default=str, option=orjson.OPT_INDENT_2)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            publish(path, scrub(text.decode()).encode())
        except OSError as exc:
            log.error("panic dump could not be written", extra={"path": str(path), "error": str(exc)})
            return None
        return path


def dump_dir_problem(directory: Path) -> str | None:
    """Why panic dumps could not be written into `directory` (made if missing), or None."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def warn_if_dumps_cannot_be_written(directory: Path) -> None:
    """Said at start-up, while nothing has crashed: a panic would find out too late. Not
    fatal: a read-only file system must not keep the pipeline from running."""
    if (problem := dump_dir_problem(directory)) is not None:
        log.warning("panic dumps cannot be written", extra={"panic_dir": str(directory), "error": problem})


def publish(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all.

    Whoever watches PANIC_DIR (a log shipper, an alert, `jq` in a loop) must never read a
    half-written dump, and a process killed mid-write must not leave one behind: the bytes go
    to a hidden name that no `panic-*.json` glob matches, reach the disk, and are renamed in.
    """
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


def crash_point(places: tuple[str, ...], panic_dir: Path) -> Callable[[], None] | None:
    """Test-only fault injection, decided once at start-up: a function that crashes at the
    place PROCESSOR_TEST_CRASH names when that is one of `places`, else None (production).

    Places: `shard-uncaught` (an exception out of the shard's main task), `shard-task`
    (an exception in a task nobody awaits), `shard-thread` (in a thread), `shard-hang`
    (the event loop blocks), `supervisor-uncaught`. A marker file in PANIC_DIR makes it
    happen once per test, so the restarted process runs normally.
    """
    where = os.environ.get(TEST_CRASH_ENV)
    if where not in places:
        return None
    return functools.partial(injected_crash, where, panic_dir)


def injected_crash(where: str, panic_dir: Path) -> None:
    marker = panic_dir / f".test-crash-{where}"
    try:
        panic_dir.mkdir(parents=True, exist_ok=True)
        marker.touch(exist_ok=False)
    except FileExistsError:
        return
    if where == "shard-hang":
        time.sleep(3600)
    elif where == "shard-task":
        asyncio.get_running_loop().create_task(_raise(where))  # reference dropped on purpose
    elif where == "shard-thread":
        threading.Thread(target=_raise_now, args=(where,), name="test-crash").start()
    else:
        _raise_now(where)


async def _raise(where: str) -> None:
    _raise_now(where)


def _raise_now(where: str) -> None:
    raise RuntimeError(f"test crash requested at {where}")
