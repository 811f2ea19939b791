"""The servers (throwaway or given) and one fresh database and stream per phase."""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

from common.config import redact_url
from scripts.benchmark.base import PASSED_THROUGH, SPEC_VARS, BenchError, say
from scripts.benchmark.machine import MachineMeter
from scripts.benchmark.run import ProcessorRun
from scripts.toolkit.processes import CLK_TCK, PROCESSOR, ROOT, children, cpu_ticks
from scripts.toolkit.services import (
    ThrowawayPostgres,
    ThrowawayRedis,
    missing_binaries,
    postgres_reachable,
    redis_reachable,
    with_database,
)


@dataclass
class Sandbox:
    """One phase's own database and stream, plus the processor environment pointing at them."""

    label: str
    database_url: str
    redis: redis.Redis
    stream: str
    env: dict[str, str]
    workdir: Path


class Bench:
    """Servers (throwaway or given), and fresh databases and streams for each phase."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.token = secrets.token_hex(4)
        self.stack = contextlib.ExitStack()
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-"))
        self.stack.callback(shutil.rmtree, self.workdir, ignore_errors=True)
        self.postgres: ThrowawayPostgres | None = None
        self.redis_server: ThrowawayRedis | None = None
        self.serial = 0
        profile = getattr(args, "profile", None)
        self.profile_dir = Path(profile).resolve() if profile else None
        self.statements_tracked = False  # pg_stat_statements loaded (with --profile)

    def __enter__(self) -> Bench:
        try:
            self._start_servers()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def _start_servers(self) -> None:
        args = self.args
        if (args.redis_url is None or args.database_url is None) and missing_binaries():
            raise BenchError("cannot start throwaway servers: " + "; ".join(missing_binaries()))
        if args.redis_url is None:
            say("starting a throwaway Redis ...")
            self.redis_server = self.stack.enter_context(ThrowawayRedis())
            self.redis_url = self.redis_server.url
        else:
            if not redis_reachable(args.redis_url):
                raise BenchError(f"Redis not reachable at {redact_url(args.redis_url)}")
            self.redis_url = args.redis_url
        if args.database_url is None:
            say("starting a throwaway Postgres (fsync on) ...")
            preload = {"shared_preload_libraries": "pg_stat_statements"} if self.profile_dir else None
            self.postgres = self.stack.enter_context(ThrowawayPostgres(fsync=True, settings=preload))
            self.admin_url = self.postgres.url
            warm_up_wal(self.admin_url)
        else:
            if not postgres_reachable(args.database_url):
                raise BenchError(f"Postgres not reachable at {redact_url(args.database_url)}")
            self.admin_url = args.database_url
        self.redis = redis.Redis.from_url(self.redis_url)
        self.stack.callback(self.redis.close)
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            self.pg_version = conn.execute("show server_version").fetchone()[0]
            preloaded = conn.execute("show shared_preload_libraries").fetchone()[0]
        self.statements_tracked = self.profile_dir is not None and "pg_stat_statements" in preloaded
        if self.profile_dir is not None and not self.statements_tracked:
            say("--profile: this Postgres does not preload pg_stat_statements; no statement statistics")
        self.redis_version = self.redis.info("server").get("redis_version")

    def describe_servers(self) -> dict[str, str]:
        return {
            "redis": ("throwaway " if self.redis_server else "") + f"{redact_url(self.redis_url)} (Redis {self.redis_version})",
            "postgres": ("throwaway, fsync on " if self.postgres else "")
            + f"{redact_url(self.admin_url)} (PostgreSQL {self.pg_version})",
        }

    # -- server-side CPU, for "where the time goes" --------------------------------------

    def redis_cpu_s(self) -> float:
        info = self.redis.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def redis_calls(self) -> dict[str, int] | None:
        """Calls per command so far (throwaway Redis only: on a shared server others' calls would count)."""
        if self.redis_server is None:
            return None
        stats = self.redis.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}

    def batches_between(self, before: dict[str, int] | None, fixes: int) -> dict[str, float] | None:
        """Batches the shards committed since `before`: each batch is settled with one XACK."""
        after = self.redis_calls()
        if before is None or after is None:
            return None
        acks = after.get("xack", 0) - before.get("xack", 0)
        reads = after.get("xreadgroup", 0) - before.get("xreadgroup", 0)
        return {"batches": acks, "mean_batch": round(fixes / acks, 1) if acks else 0.0, "xreadgroup_calls": reads}

    def postgres_cpu_s(self) -> float | None:
        """CPU of the whole throwaway cluster (postmaster, reaped and live backends); None if not ours."""
        if self.postgres is None:
            return None
        try:
            pid = int((self.postgres.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        ticks = cpu_ticks(pid, with_children=True) + sum(cpu_ticks(child) for child in children(pid))
        return ticks / CLK_TCK

    # -- sandboxes ------------------------------------------------------------------------

    @contextlib.contextmanager
    def sandbox(self, label: str, shards: int) -> Iterator[Sandbox]:
        self.serial += 1
        name = f"bench_{self.token}_{self.serial}"
        stream = f"bench:{self.token}:{self.serial}:t"
        workdir = self.workdir / f"phase{self.serial}"
        workdir.mkdir()
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            database_url = with_database(self.admin_url, name)
            env = self._processor_env(database_url, stream, shards, workdir)
            yield Sandbox(label, database_url, self.redis, stream, env, workdir)
        finally:
            self._drop(name, stream)

    def _processor_env(self, database_url: str, stream: str, shards: int, workdir: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SPEC_VARS}
        env.update({k: os.environ[k] for k in PASSED_THROUGH if k in os.environ})
        env.update(
            REDIS_URL=self.redis_url,
            DATABASE_URL=database_url,
            MIGRATION_DATABASE_URL=database_url,
            STREAM_KEY=stream,
            CONSUMER_GROUP="processor",
            DLQ_KEY=f"{stream}:dlq",
            SHARDS=str(shards),
            HTTP_PORT="0",
            INSTANCE_ID=f"bench-{self.token}",
            LOG_LEVEL="INFO",  # a few lines per shard life (per-batch lines are DEBUG): `shard stopped` has its counts
            PANIC_DIR=str(workdir / "panic"),
            PYTHONPATH=str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        )
        return env

    def _drop(self, database: str, stream: str) -> None:
        errors = []
        try:
            keys = {stream, f"{stream}:dlq"} | {k.decode() for k in self.redis.scan_iter(match=f"*{self.token}*", count=1000)}
            self.redis.delete(*keys)
        except redis.RedisError as exc:
            errors.append(f"could not delete Redis keys of {stream}: {exc}")
        try:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
        except psycopg.Error as exc:
            errors.append(f"could not drop database {database}: {exc}")
        for error in errors:
            say(f"warning: {error}")

    def migrate(self, box: Sandbox) -> None:
        try:
            done = subprocess.run(
                [*PROCESSOR, "migrate"], cwd=ROOT, env=box.env, stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=120, start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            raise BenchError("processor migrate did not finish within 120 s") from None
        if done.returncode != 0:
            raise BenchError(f"processor migrate exited {done.returncode}: {(done.stderr or done.stdout).strip()[-2000:]}")


class Span:
    """A phase's measured span: CPU of the machine, of Redis and of our Postgres, and the batches committed."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.meter = MachineMeter()
        self.pg_cpu0, self.redis_cpu0, self.calls0 = bench.postgres_cpu_s(), bench.redis_cpu_s(), bench.redis_calls()
        self.meter.start()

    def stop(self, fixes: int | Callable[[], int]) -> None:
        """End the span; `fixes` (or a function counting them, read after the CPU figures) sizes the batches."""
        self.machine = self.meter.stop()
        self.pg_cpu1, self.redis_cpu1 = self.bench.postgres_cpu_s(), self.bench.redis_cpu_s()
        self.fixes = fixes() if callable(fixes) else fixes
        self.batches = self.bench.batches_between(self.calls0, self.fixes)

    def measured(self) -> dict[str, Any]:
        """The span's own result values, whatever ran in it: batches, Postgres' and Redis' CPU, the machine."""
        return dict(
            batches=self.batches,
            postgres_cpu_s=None if self.pg_cpu0 is None else round(self.pg_cpu1 - self.pg_cpu0, 2),
            redis_cpu_s=round(self.redis_cpu1 - self.redis_cpu0, 2),
            machine=self.machine,
        )

    def values(self, proc: ProcessorRun, cpu: dict[str, float], exit_code: int) -> dict[str, Any]:
        """The result values every measured phase reports, from the span and the processor run."""
        panic = Path(proc.env["PANIC_DIR"])
        return dict(
            cpu_s=round(sum(cpu.values()), 2),
            cpu_by_process_s={k: round(v, 2) for k, v in cpu.items()},
            peak_rss_mb_per_shard=proc.peak_rss_mb(),
            exit_code=exit_code,
            **self.measured(),
            panic_files=sorted(p.name for p in panic.iterdir()) if panic.is_dir() else [],
        )


# A new cluster has one WAL segment: until its checkpoints recycle some, every 16 MB of WAL
# a drain writes first creates, zero-fills and fsyncs a new segment. That slowed whichever
# drain ran first on the throwaway server (the Processor's, in round 1) by up to a third.
WARM_UP_WAL_ROWS = 2_000_000  # about 300 MB of WAL, more than a 200,000-fix drain writes


def warm_up_wal(admin_url: str) -> None:
    """Write and recycle a drain's worth of WAL on a new throwaway server, so that no measured drain pays for it."""
    say("warming up the throwaway Postgres' WAL ...")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE bench_warm_up AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, {WARM_UP_WAL_ROWS}) g")
        conn.execute("DROP TABLE bench_warm_up")
        conn.execute("CHECKPOINT")
