"""What `make demo` and the failover playbook share: servers for one run, a producer thread,
the group's state, stopping a processor and cleaning up.

Servers: REDIS_URL / DATABASE_URL when they answer, else the usual local servers, else
throwaway ones (`scripts.toolkit.services`). On a reused server a run creates a fresh
database of its own and uses stream keys under a prefix of its own.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import redis

from common.config import redact_url
from common.logs import scrub
from scripts.toolkit.services import (
    ThrowawayPostgres,
    ThrowawayRedis,
    add_url_secret,
    missing_binaries,
    redis_reachable,
    with_database,
)
from scripts.toolkit.writer import Counts, steady

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/processor_demo"
GROUP = "processor"


def say(*lines: str, err: bool = False) -> None:
    print(*lines, sep="\n", file=sys.stderr if err else sys.stdout, flush=True)


def pg_admin_url(url: str) -> tuple[str | None, str]:
    """A URL on url's server where we may CREATE DATABASE (its own database, else `postgres`), or (None, why)."""
    why = ""
    for candidate in (url, with_database(url, "postgres")):
        try:
            with psycopg.connect(candidate, connect_timeout=2, autocommit=True) as conn:
                row = conn.execute("select rolcreatedb or rolsuper from pg_roles where rolname = current_user")
                if row.fetchone() == (True,):
                    return candidate, ""
                why = "its role may not create databases"
                break
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
            why = why or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if "does not exist" not in str(exc):
                break
    add_url_secret(url)
    return None, scrub(why)


def provide_services(stack: contextlib.ExitStack, tag: str, keep: bool) -> tuple[str, str, list[str]]:
    """(redis_url, database_url of a fresh database, description lines); exits 1 if impossible."""
    redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    pg_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    problems: list[tuple[str, bool]] = []  # (why a throwaway server is needed, worth a warning)
    if need_redis := not redis_reachable(redis_url):
        problems.append((f"Redis at {redact_url(redis_url)} does not answer", "REDIS_URL" in os.environ))
    admin, why = pg_admin_url(pg_url)  # on a reused server we want our own database, never its tables
    if admin is None:
        problems.append((f"Postgres at {redact_url(pg_url)} is not usable ({why})", "DATABASE_URL" in os.environ))
    advice = [a for a in missing_binaries() if (need_redis if a.startswith("redis-server") else admin is None)]
    if advice:
        say(*(why for why, _ in problems), "and the throwaway servers the demo would use instead need:", *advice,
            "Install that, or point REDIS_URL / DATABASE_URL at running servers.", err=True)
        raise SystemExit(1)
    for why, warn in problems:
        if warn:
            say(f"warning: {why}; using a throwaway server instead", err=True)
    if need_redis:
        redis_url = stack.enter_context(ThrowawayRedis()).url
    if pg_throwaway := admin is None:
        admin = stack.enter_context(ThrowawayPostgres(fsync=False)).url
    database = f"processor_demo_{tag}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    if keep and not pg_throwaway:
        stack.callback(say, f"kept database {redact_url(with_database(admin, database))}")
    elif not pg_throwaway:
        stack.callback(guarded, "drop the demo database", drop_database, admin, database)
    db_url = with_database(admin, database)
    return redis_url, db_url, [
        f"redis:    {redact_url(redis_url)} ({'throwaway server' if need_redis else 'reused server'})",
        f"postgres: {redact_url(db_url)} ({'throwaway server' if pg_throwaway else 'fresh database, reused server'})",
    ]


def drop_database(admin: str, database: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def delete_keys(url: str, prefix: str) -> None:
    with redis.Redis.from_url(url, socket_timeout=5) as r:
        for key in list(r.scan_iter(match=f"{prefix}*", count=1000)):
            r.delete(key)


def guarded(what: str, fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - cleanup goes on with the next step
        say(f"warning: could not {what}: {type(exc).__name__}: {exc}", err=True)


def group_info(r: redis.Redis, stream: str, group: str = GROUP) -> dict[str, Any] | None:
    """XINFO GROUPS of `group` with str keys (lag, pending, consumers, entries-read, ...); None without it."""
    try:
        groups = r.xinfo_groups(stream)
    except redis.ResponseError:  # no stream yet
        return None
    for g in groups:
        g = {(k.decode() if isinstance(k, bytes) else k): v for k, v in g.items()}
        name = g.get("name")
        if (name.decode() if isinstance(name, bytes) else name) == group:
            return g
    return None


class Stopped(Exception):  # raised in the producer's progress callback to end `steady` early
    pass


class Producer(threading.Thread):
    """`steady` load in a thread: args.rate fixes/s for args.seconds from args.devices (seed, malformed)."""

    def __init__(self, url: str, stream: str, args: argparse.Namespace) -> None:
        super().__init__(name="producer", daemon=True)
        self.url, self.stream, self.args = url, stream, args
        self.counts, self.error, self.stop = Counts(), None, threading.Event()
        self.finished_at: float | None = None

    def run(self) -> None:
        a = self.args
        try:
            with redis.Redis.from_url(self.url) as client:
                steady(client, self.stream, a.rate, a.seconds, devices=a.devices, seed=a.seed,
                       malformed_fraction=a.malformed, progress=self.progress)
        except Stopped:
            pass
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
        finally:
            self.finished_at = time.monotonic()

    def progress(self, counts: Counts) -> None:
        self.counts = counts
        if self.stop.is_set():
            raise Stopped


def stop_processor(proc: subprocess.Popen[bytes], wait_s: float = 30.0) -> int:
    """SIGTERM, a bounded wait for the drain, then SIGKILL of its whole session."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            say(f"processor did not stop within {wait_s:.0f}s; killing it", err=True)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def exit_status(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
