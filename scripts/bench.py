#!/usr/bin/env python3
"""Benchmark of the Processor: drain throughput and end-to-end latency.

    .venv/bin/python -m scripts.bench            # full run (a few minutes); or `make bench`
    .venv/bin/python -m scripts.bench --quick    # smoke test (backlog 20,000, latency 5 s)
    .venv/bin/python -m scripts.bench --only drain --shards 1,2,4 --json bench.json

What it measures
----------------
drain     A backlog (default 200,000 fixes from 2,000 devices) is XADDed *before* the
          processor starts (not timed). Then `processor run` is started as a subprocess and
          timed from process start until the group has read the whole stream, nothing is
          pending and `count(*) from positions` equals the number of fixes sent (polled
          every 50 ms). One run per `--shards` value, each on a fresh database and stream.
          Reported: records/s, wall seconds (and the start-up part of it: process start →
          first entry read), CPU seconds of the supervisor and its shards (utime+stime from
          /proc, sampled right before stopping), peak RSS per shard (VmHWM). Then SIGTERM;
          the processor must exit 0.
latency   SHARDS=2 under a steady offered load (default 5,000 fixes/s for 30 s). Each fix
          carries `io.bench_seq`; its send time is time.monotonic() right before the XADD.
          A bench-only statement-level AFTER INSERT trigger with a transition table on
          `positions` calls pg_notify('bench_commit', '<seq>,<seq>,...'); NOTIFY is delivered
          only when the writing transaction commits, and the transition table of an
          `INSERT ... ON CONFLICT DO NOTHING` holds exactly the rows it inserted, so the
          receipt time on a LISTENing connection is the commit time. A 1 s warm-up (fixes
          without bench_seq, so unmeasured) runs first so every shard has its connections
          and device state, then the measured load. Reported: p50/p99/max of receipt − send,
          achieved send rate, fixes never seen (must be 0).

Servers
-------
By default the benchmark starts its own throwaway Redis and Postgres (fsync on, i.e. honest
durability), so figures are reproducible and the shared services are never touched. With
`--redis-url` / `--database-url` it uses those servers instead: it creates (and drops) its own
databases `bench_<random>` on the Postgres server and uses stream keys containing a random
token on Redis, which it deletes afterwards.

Processor settings: the SPEC §4 variables of the caller's environment are not passed on,
except the tuning knobs BATCH_SIZE, DEVICE_CACHE_SIZE and DRAIN_TIMEOUT_S (reported when set).

Adding a scenario
-----------------
`drain_scenarios()` lists the drain rows. A scenario may carry a `setup(sandbox)` callback that
runs after the migrations and before the backlog, e.g. a geofence row:

    DrainScenario("drain, SHARDS=2, 1,000 geofences", shards=2, setup=import_geofences,
                  target=60_000)

where `import_geofences(sandbox)` writes rows through `sandbox.database_url`.

Exit status: 0 when every phase ran and every correctness check held (targets that are
missed are reported, not failed); 1 when a phase failed; 2 usage; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import psycopg
import redis
from psycopg import sql

from common.config import redact_url
from scripts.toolkit import fleet as simulate_fleet
from scripts.toolkit import writer as simulate
from scripts.toolkit.processes import PROCESSOR, ROOT
from scripts.toolkit.services import (
    ThrowawayPostgres,
    ThrowawayRedis,
    missing_binaries,
    postgres_reachable,
    redis_reachable,
    with_database,
)

POLL_S = 0.05
PROGRESS_S = 1.0
STALL_TIMEOUT_S = 90.0  # no progress for this long fails a phase
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0  # on top of the processor's own DRAIN_TIMEOUT_S
SEED = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
PASSED_THROUGH = ("BATCH_SIZE", "DEVICE_CACHE_SIZE", "DRAIN_TIMEOUT_S")
SPEC_VARS = (
    "REDIS_URL", "DATABASE_URL", "MIGRATION_DATABASE_URL", "STREAM_KEY", "CONSUMER_GROUP", "DLQ_KEY",
    "INSTANCE_ID", "SHARDS", "BATCH_SIZE", "CLAIM_THRESHOLD_MS", "CLAIM_INTERVAL_MS", "MAX_FAILURES",
    "DRAIN_TIMEOUT_S", "DEVICE_CACHE_SIZE", "PANIC_DIR", "LOG_LEVEL", "HTTP_PORT",
)

TARGET_DRAIN = {1: 40_000, 2: 60_000}
TARGET_P99_MS = 50.0
TARGET_RSS_MB = 150.0

# Bench-only: the commit of every INSERT into positions NOTIFYs the bench_seq of the rows it
# inserted. NOTIFY payloads must stay below 8000 bytes, so long lists go out in pieces.
_COMMIT_TRIGGER = """
CREATE FUNCTION bench_notify_commit() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    payload text;
    seqs text[];
    chunk int := 500;
BEGIN
    SELECT string_agg(attributes->>'bench_seq', ',') INTO payload
    FROM new_rows WHERE attributes ? 'bench_seq';
    IF payload IS NULL THEN
        RETURN NULL;
    END IF;
    IF octet_length(payload) < 7900 THEN
        PERFORM pg_notify('bench_commit', payload);
        RETURN NULL;
    END IF;
    seqs := string_to_array(payload, ',');
    FOR i IN 1 .. cardinality(seqs) BY chunk LOOP
        PERFORM pg_notify('bench_commit', array_to_string(seqs[i : i + chunk - 1], ','));
    END LOOP;
    RETURN NULL;
END $$;
CREATE TRIGGER bench_commit AFTER INSERT ON positions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench_notify_commit();
"""


class BenchError(Exception):
    """A phase could not complete or a correctness check failed."""


class Interrupted(BaseException):
    """SIGTERM to the benchmark; handled like Ctrl-C."""


# --- output --------------------------------------------------------------------------------


class Scrubber:
    """Removes every password we know of from text before it is printed or written."""

    def __init__(self) -> None:
        self.secrets: set[str] = set()

    def add_url(self, url: str | None) -> None:
        if not url:
            return
        with contextlib.suppress(ValueError):
            password = urlsplit(url).password
            if password:
                self.secrets.add(password)

    def __call__(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text


SCRUB = Scrubber()


def say(message: str) -> None:
    sys.stderr.write(SCRUB(message) + "\n")
    sys.stderr.flush()


def fmt_int(n: float) -> str:
    return f"{n:,.0f}"


# --- the machine and /proc --------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: index 0 is field 3 (state)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_ticks(pid: int, with_children: bool = False) -> int:
    """utime+stime (and cutime+cstime of reaped children) in clock ticks; 0 if gone."""
    f = _stat_fields(pid)
    if f is None:
        return 0
    ticks = int(f[11]) + int(f[12])
    if with_children:
        ticks += int(f[13]) + int(f[14])
    return ticks


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            f = _stat_fields(int(entry.name))
            if f is not None and f[1] == str(pid):
                found.append(int(entry.name))
    return sorted(found)


def status_kb(pid: int, *keys: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def proc_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


_STAT_COLUMNS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_ticks() -> dict[str, int]:
    """Jiffies of all CPUs from the first line of /proc/stat, by column."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return dict(zip(_STAT_COLUMNS, values + [0] * (8 - len(values))))


class MachineMeter:
    """CPU use of the whole machine and of this benchmark process between start() and stop(), in cores."""

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.ticks0 = machine_ticks()
        self.self0 = _own_cpu_s()

    def stop(self) -> dict[str, float]:
        seconds = max(time.monotonic() - self.t0, 1e-9)
        ticks1 = machine_ticks()
        d = {k: (ticks1[k] - self.ticks0[k]) / CLK_TCK / seconds for k in _STAT_COLUMNS}
        busy = d["user"] + d["nice"] + d["system"] + d["irq"] + d["softirq"] + d["steal"]
        return {
            "span_s": round(seconds, 2),
            "busy_cores": round(busy, 2),
            "user_cores": round(d["user"] + d["nice"], 2),
            "system_cores": round(d["system"], 2),
            "irq_softirq_cores": round(d["irq"] + d["softirq"], 2),
            "steal_cores": round(d["steal"], 2),
            "iowait_cores": round(d["iowait"], 2),
            "bench_process_cpu_s": round(_own_cpu_s() - self.self0, 2),
        }


def background_load(seconds: float = 1.0) -> float:
    """Cores kept busy by other processes while the benchmark does nothing."""
    meter = MachineMeter()
    meter.start()
    time.sleep(seconds)
    return meter.stop()["busy_cores"]


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# --- the processor under test ------------------------------------------------------------


@dataclass
class ShardMemory:
    pid: int
    title: str
    rss_kb: int = 0  # highest VmRSS seen while sampling
    hwm_kb: int = 0  # VmHWM, the kernel's peak


class ProcessorRun:
    """`processor run` in its own session; samples the CPU and memory of it and its shards."""

    def __init__(self, env: dict[str, str], log_path: Path, shards: int) -> None:
        self.shards_expected = shards
        self.env = env
        self.log_path = log_path
        self.log_file = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [*PROCESSOR, "run"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.memory: dict[int, ShardMemory] = {}
        self.last_scan = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise BenchError(f"processor exited early with code {code}\n{self.log_tail()}")

    def sample(self) -> None:
        """Memory of every shard; the children are re-listed at most once a second."""
        now = time.monotonic()
        live = [m for m in self.memory.values() if _stat_fields(m.pid) is not None]
        if len(live) < self.shards_expected or now - self.last_scan >= 1.0:
            self.last_scan = now
            for pid in children_of(self.pid):
                if pid not in self.memory:
                    self.memory[pid] = ShardMemory(pid, proc_title(pid))
        for mem in self.memory.values():
            kb = status_kb(mem.pid, "VmRSS", "VmHWM")
            mem.rss_kb = max(mem.rss_kb, kb.get("VmRSS", 0))
            mem.hwm_kb = max(mem.hwm_kb, kb.get("VmHWM", 0))

    def cpu_seconds(self) -> dict[str, float]:
        """CPU so far of the supervisor (with any reaped child) and each live child."""
        out = {"supervisor": cpu_ticks(self.pid, with_children=True) / CLK_TCK}
        for pid in children_of(self.pid):
            out[f"{proc_title(pid)} (pid {pid})"] = cpu_ticks(pid) / CLK_TCK
        return out

    def peak_rss_mb(self) -> list[float]:
        return [round(max(m.hwm_kb, m.rss_kb) / 1024, 1) for m in self.memory.values()]

    def stop(self) -> int:
        """SIGTERM and wait for the graceful exit; returns the exit code."""
        drain = float(self.env.get("DRAIN_TIMEOUT_S", "20"))
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=drain + STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            raise BenchError(f"processor did not exit within {drain + STOP_GRACE_S:.0f}s of SIGTERM") from None

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
            if tail:
                return "processor log tail:\n  " + "\n  ".join(tail)
        return "(processor wrote no log)"

    def close(self) -> None:
        """Kill the whole process group, whatever state it is in (by its id only)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=3)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # shards share the supervisor's group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.log_file.close()


# --- servers and per-phase sandboxes ---------------------------------------------------------


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
        self.stack.callback(_rmtree, self.workdir)
        self.postgres: ThrowawayPostgres | None = None
        self.redis_server: ThrowawayRedis | None = None
        self.serial = 0

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
            self.postgres = self.stack.enter_context(ThrowawayPostgres(fsync=True))
            self.admin_url = self.postgres.url
        else:
            if not postgres_reachable(args.database_url):
                raise BenchError(f"Postgres not reachable at {redact_url(args.database_url)}")
            self.admin_url = args.database_url
        self.redis = redis.Redis.from_url(self.redis_url)
        self.stack.callback(self.redis.close)
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            self.pg_version = conn.execute("show server_version").fetchone()[0]
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
        ticks = cpu_ticks(pid, with_children=True) + sum(cpu_ticks(child) for child in children_of(pid))
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
            LOG_LEVEL="WARNING",
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


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# --- Redis group state ------------------------------------------------------------------------


def group_state(client: redis.Redis, stream: str, group: str = "processor") -> dict[str, Any] | None:
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:
        return None
    for g in groups:
        g = {(k.decode() if isinstance(k, bytes) else k): v for k, v in g.items()}
        name = g.get("name")
        if (name.decode() if isinstance(name, bytes) else name) == group:
            return g
    return None


def stream_done(client: redis.Redis, stream: str, total: int) -> tuple[bool, int]:
    """(whole stream read and nothing pending, entries read so far)."""
    g = group_state(client, stream)
    if g is None:
        return False, 0
    read = g.get("entries-read") or 0
    lag = g.get("lag")
    done = g.get("pending") == 0 and read >= total and (lag == 0 or lag is None)
    return done, read


class Progress:
    """One stderr line per second: phase, stored rows, rate."""

    def __init__(self, phase: str, total: int | None = None, noun: str = "stored") -> None:
        self.phase = phase
        self.noun = noun
        self.total = total
        self.t0 = self.last_t = time.monotonic()
        self.last_n = 0

    def due(self) -> bool:
        return time.monotonic() - self.last_t >= PROGRESS_S

    def report(self, stored: int, extra: str = "") -> None:
        now = time.monotonic()
        rate = (stored - self.last_n) / max(now - self.last_t, 1e-9)
        of = f"/{fmt_int(self.total)}" if self.total else ""
        say(f"  [{self.phase}] {now - self.t0:6.1f}s  {self.noun} {fmt_int(stored)}{of}  {fmt_int(rate)}/s{extra}")
        self.last_t, self.last_n = now, stored


# --- scenarios --------------------------------------------------------------------------------


@dataclass
class DrainScenario:
    label: str
    shards: int
    setup: Callable[[Sandbox], None] | None = None  # after migrate, before the backlog
    target: float | None = None  # records/s


@dataclass
class Result:
    kind: str
    label: str
    values: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


GEOFENCES = 1_000


def import_geofences(box: Sandbox) -> None:
    """1,000 geofences over the simulated fleet's area: circles of 100-600 m and squares, some with holes."""
    rng = random.Random(SEED)
    center_lat, center_lon = 52.37, 4.90
    rows = []
    for n in range(GEOFENCES):
        lat = center_lat + (rng.random() * 2 - 1) * 0.45
        lon = center_lon + (rng.random() * 2 - 1) * 0.45
        if n % 2:
            rows.append((f"bench-{n}", orjson.dumps({"type": "Point", "coordinates": [lon, lat]}).decode(),
                         100 + rng.random() * 500))
            continue
        d = 0.002 + rng.random() * 0.004
        ring = [[lon - d, lat - d], [lon + d, lat - d], [lon + d, lat + d], [lon - d, lat + d], [lon - d, lat - d]]
        h = d / 3
        hole = [[lon - h, lat - h], [lon - h, lat + h], [lon + h, lat + h], [lon + h, lat - h], [lon - h, lat - h]]
        polygon = {"type": "Polygon", "coordinates": [ring, hole] if n % 4 == 0 else [ring]}
        rows.append((f"bench-{n}", orjson.dumps(polygon).decode(), None))
    with psycopg.connect(box.database_url) as db:
        with db.cursor() as cur:
            cur.executemany("INSERT INTO geofences (name, geometry, radius_m) VALUES (%s, %s::jsonb, %s)", rows)


def run_membership(result: Result, counts: tuple[int, ...] = (10, 1_000, 10_000), points: int = 50_000) -> None:
    """Cost of the geofence test per fix (STRtree + exact check) for few and for many geofences."""
    from shard.geo import GeofenceIndex, parse_geofence

    rng = random.Random(SEED)
    lats = [52.37 + (rng.random() * 2 - 1) * 0.45 for _ in range(points)]
    lons = [4.90 + (rng.random() * 2 - 1) * 0.45 for _ in range(points)]
    for count in counts:
        fences = []
        for n in range(count):
            lat, lon = 52.37 + (rng.random() * 2 - 1) * 0.45, 4.90 + (rng.random() * 2 - 1) * 0.45
            if n % 2:
                fences.append(parse_geofence(n, f"c{n}", {"type": "Point", "coordinates": [lon, lat]}, 100 + rng.random() * 500))
            else:
                d = 0.002 + rng.random() * 0.004
                ring = [[lon - d, lat - d], [lon + d, lat - d], [lon + d, lat + d], [lon - d, lat + d], [lon - d, lat - d]]
                fences.append(parse_geofence(n, f"p{n}", {"type": "Polygon", "coordinates": [ring]}, None))
        index = GeofenceIndex(fences)
        best = math.inf
        for _ in range(3):
            t = time.perf_counter()
            inside = sum(len(ids) for i in range(0, points, 500) for ids in index.inside(lats[i:i + 500], lons[i:i + 500]))
            best = min(best, time.perf_counter() - t)
        result.values[f"us_per_fix_{count}"] = best / points * 1e6
        result.values[f"inside_share_{count}"] = inside / points
        say(f"  membership with {count:,} geofences: {best / points * 1e6:.2f} µs per fix "
            f"({inside / points:.1%} of fixes inside one)")


def drain_scenarios(args: argparse.Namespace) -> list[DrainScenario]:
    scenarios = [DrainScenario(f"drain, SHARDS={n}", n, target=TARGET_DRAIN.get(n)) for n in args.shards]
    if 2 in args.shards and not args.no_geofences:
        # Issue 3: with 1,000 active geofences, within 25% of the figure without them.
        scenarios.append(DrainScenario(f"drain, SHARDS=2, {GEOFENCES:,} geofences", 2, setup=import_geofences))
    return scenarios


def run_drain(bench: Bench, result: Result, scenario: DrainScenario, n: int, devices: int) -> None:
    """One drain row, filled into `result`; raises BenchError when the phase fails."""
    result.values.update(shards=scenario.shards, backlog=n, devices=devices, target_per_s=scenario.target)
    say(f"\n{scenario.label}: backlog {fmt_int(n)} fixes from {fmt_int(devices)} devices")
    with bench.sandbox(scenario.label, scenario.shards) as box:
        bench.migrate(box)
        if scenario.setup is not None:
            scenario.setup(box)
        produce_progress = Progress(f"{scenario.label}: producing backlog", n, noun="written")

        def on_batch(counts: simulate.Counts) -> None:
            if produce_progress.due():
                produce_progress.report(counts.total)

        t = time.monotonic()
        counts = simulate.backlog(box.redis, box.stream, n, devices=devices, seed=SEED, progress=on_batch)
        say(f"  backlog written in {time.monotonic() - t:.1f}s (not timed)")
        expected, total = counts.valid, counts.total
        if box.redis.xlen(box.stream) != total:
            raise BenchError(f"stream holds {box.redis.xlen(box.stream)} entries, expected {total}")

        with psycopg.connect(box.database_url, autocommit=True) as db:
            def stored() -> int:
                return db.execute("select count(*) from positions").fetchone()[0]

            meter = MachineMeter()
            pg_cpu0, redis_cpu0, calls0 = bench.postgres_cpu_s(), bench.redis_cpu_s(), bench.redis_calls()
            meter.start()
            proc = ProcessorRun(box.env, box.workdir / "processor.log", scenario.shards)
            t0 = proc.started
            try:
                progress = Progress(scenario.label, expected)
                first_read_at: float | None = None
                last_change, last_read, count = t0, -1, 0
                while True:
                    now = time.monotonic()
                    proc.sample()
                    done, read = stream_done(box.redis, box.stream, total)
                    if read and first_read_at is None:
                        first_read_at = now
                    if read != last_read:
                        last_change, last_read = now, read
                    if done:
                        count = stored()
                        if count == expected:
                            t_end = time.monotonic()
                            break
                        if count > expected:
                            raise BenchError(f"positions holds {count} rows, more than the {expected} fixes sent")
                    if progress.due():
                        previous, count = count, stored()
                        progress.report(count, f"  (entries read {fmt_int(read)})")
                        if count != previous:
                            last_change = now
                    if now - last_change > STALL_TIMEOUT_S:
                        raise BenchError(f"no progress for {STALL_TIMEOUT_S:.0f}s (stored {count}/{expected})\n"
                                         f"{proc.log_tail()}")
                    proc.check_alive()
                    time.sleep(POLL_S)
                cpu = proc.cpu_seconds()  # right before stopping
                proc.sample()
                machine = meter.stop()
                pg_cpu1, redis_cpu1 = bench.postgres_cpu_s(), bench.redis_cpu_s()
                batches = bench.batches_between(calls0, expected)
                say(f"  drained {fmt_int(expected)} in {t_end - t0:.2f}s; stopping the processor (SIGTERM)")
                exit_code = proc.stop()
            finally:
                proc.close()
        wall = t_end - t0
        result.values.update(
            records=expected,
            records_per_s=round(expected / wall, 1),
            wall_s=round(wall, 3),
            startup_s=round((first_read_at or t_end) - t0, 3),
            cpu_s=round(sum(cpu.values()), 2),
            cpu_by_process_s={k: round(v, 2) for k, v in cpu.items()},
            peak_rss_mb_per_shard=proc.peak_rss_mb(),
            shard_processes_seen=len(proc.memory),
            exit_code=exit_code,
            batches=batches,
            postgres_cpu_s=None if pg_cpu0 is None else round(pg_cpu1 - pg_cpu0, 2),
            redis_cpu_s=round(redis_cpu1 - redis_cpu0, 2),
            machine=machine,
            panic_files=_panic_files(box),
        )
        if exit_code != 0:
            raise BenchError(f"processor exited {exit_code} after SIGTERM (expected 0)\n{proc.log_tail()}")
        if len(proc.memory) != scenario.shards:
            raise BenchError(f"saw {len(proc.memory)} shard processes, expected {scenario.shards} (restarts?)")


def _panic_files(box: Sandbox) -> list[str]:
    panic = Path(box.env["PANIC_DIR"])
    return sorted(p.name for p in panic.iterdir()) if panic.is_dir() else []


# --- latency ---------------------------------------------------------------------------------


class CommitListener(threading.Thread):
    """LISTEN bench_commit; records time.monotonic() of the commit notice of each bench_seq."""

    def __init__(self, database_url: str, total: int) -> None:
        super().__init__(name="commit-listener", daemon=True)
        self.database_url = database_url
        self.received = [0.0] * total
        self.seen = 0
        self.duplicates = 0
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                conn.execute("LISTEN bench_commit")
                self.ready.set()
                received = self.received
                monotonic = time.monotonic
                while not self.stopping.is_set():
                    for notice in conn.notifies(timeout=0.2):
                        t = monotonic()
                        for item in notice.payload.split(","):
                            seq = int(item)
                            if received[seq]:
                                self.duplicates += 1
                            else:
                                received[seq] = t
                                self.seen += 1
        except BaseException as exc:  # surfaced by the main thread
            self.error = exc
            self.ready.set()

    def check(self) -> None:
        if self.error is not None:
            raise BenchError(f"commit listener failed: {self.error}")

    def close(self) -> None:
        self.stopping.set()
        self.join(timeout=5)


def paced_send(box: Sandbox, fleet: simulate_fleet.Fleet, rate: float, seconds: float, sent_at: list[float] | None,
               on_tick: Callable[[int], None]) -> tuple[int, float]:
    """Offer `rate` fixes/s for `seconds` s in 10 ms ticks (like simulate.steady).

    With `sent_at`, fix number i carries io.bench_seq = i and sent_at[i] gets time.monotonic()
    taken right before its XADD batch is written. Returns (sent, seconds taken).
    """
    total = int(round(rate * seconds))
    gen = fleet.fixes(total, live=True)
    dumps = orjson.dumps
    monotonic = time.monotonic
    tick = 0.01
    sent = 0
    t0 = next_tick = monotonic()
    while sent < total:
        due = min(total, int((monotonic() - t0) * rate) + 1)
        while sent < due:
            k = min(due - sent, 1000)
            payloads = []
            for i in range(sent, sent + k):
                fix = next(gen)
                if sent_at is not None:
                    fix["io"]["bench_seq"] = i
                payloads.append(dumps(fix))
            t_send = monotonic()
            simulate.produce(box.redis, box.stream, payloads, pipeline_size=len(payloads))
            if sent_at is not None:
                for i in range(sent, sent + k):
                    sent_at[i] = t_send
            sent += k
        on_tick(sent)
        if sent >= total:
            break
        next_tick += tick
        now = monotonic()
        if next_tick > now:
            time.sleep(next_tick - now)
        else:
            next_tick = now
    return sent, monotonic() - t0


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def run_latency(bench: Bench, result: Result, shards: int, rate: float, seconds: float, devices: int,
                warmup_s: float) -> None:
    """The latency rows, filled into `result`; raises BenchError when the phase fails."""
    label = result.label
    total = int(round(rate * seconds))
    result.values.update(shards=shards, offered_per_s=rate, seconds=seconds, devices=devices, warmup_s=warmup_s,
                         target_p99_ms=TARGET_P99_MS)
    say(f"\n{label}")
    with bench.sandbox(label, shards) as box:
        bench.migrate(box)
        with psycopg.connect(box.database_url, autocommit=True) as db:
            db.execute(_COMMIT_TRIGGER)

            def stored() -> int:
                return db.execute("select count(*) from positions").fetchone()[0]

            listener = CommitListener(box.database_url, total)
            listener.start()
            proc: ProcessorRun | None = None
            try:
                listener.ready.wait(READY_TIMEOUT_S)
                listener.check()
                proc = ProcessorRun(box.env, box.workdir / "processor.log", shards)
                _wait_for_consumers(box, proc, shards)
                fleet = simulate_fleet.Fleet(devices, seed=SEED, start_ms=time.time_ns() // 1_000_000)
                if warmup_s > 0:
                    warm, _ = paced_send(box, fleet, rate, warmup_s, None, lambda _n: proc.sample())
                    _wait_until(lambda: stored() >= warm, proc, f"the {warm} warm-up fixes to be stored")
                    say(f"  warm-up: {fmt_int(warm)} fixes in {warmup_s:g}s stored")
                base = stored()
                sent_at = [0.0] * total
                progress = Progress(label, total)

                def on_tick(sent: int) -> None:
                    proc.sample()
                    if progress.due():
                        progress.report(listener.seen, f"  (sent {fmt_int(sent)})")

                meter = MachineMeter()
                pg_cpu0, redis_cpu0, calls0 = bench.postgres_cpu_s(), bench.redis_cpu_s(), bench.redis_calls()
                cpu0 = proc.cpu_seconds()
                meter.start()
                sent, send_s = paced_send(box, fleet, rate, seconds, sent_at, on_tick)
                deadline = time.monotonic() + 15.0
                while listener.seen < sent and time.monotonic() < deadline:
                    listener.check()
                    proc.check_alive()
                    proc.sample()
                    if progress.due():
                        progress.report(listener.seen, "  (all sent)")
                    time.sleep(POLL_S)
                machine = meter.stop()
                pg_cpu1, redis_cpu1 = bench.postgres_cpu_s(), bench.redis_cpu_s()
                count = stored() - base
                batches = bench.batches_between(calls0, count)
                cpu1 = proc.cpu_seconds()
                cpu = {k: v - cpu0.get(k, 0.0) for k, v in cpu1.items()}
                proc.sample()
                exit_code = proc.stop()
            finally:
                listener.close()
                if proc is not None:
                    proc.close()
        listener.check()
        latencies = sorted((listener.received[i] - sent_at[i]) * 1000.0 for i in range(sent) if listener.received[i])
        unseen = sent - len(latencies)
        result.values.update(
            sent=sent,
            achieved_per_s=round(sent / send_s, 1),
            p50_ms=round(percentile(latencies, 50), 2) if latencies else None,
            p99_ms=round(percentile(latencies, 99), 2) if latencies else None,
            max_ms=round(latencies[-1], 2) if latencies else None,
            mean_ms=round(sum(latencies) / len(latencies), 2) if latencies else None,
            not_seen=unseen,
            duplicate_notices=listener.duplicates,
            rows_stored=count,
            cpu_s=round(sum(cpu.values()), 2),
            cpu_by_process_s={k: round(v, 2) for k, v in cpu.items()},
            peak_rss_mb_per_shard=proc.peak_rss_mb(),
            exit_code=exit_code,
            batches=batches,
            postgres_cpu_s=None if pg_cpu0 is None else round(pg_cpu1 - pg_cpu0, 2),
            redis_cpu_s=round(redis_cpu1 - redis_cpu0, 2),
            machine=machine,
            panic_files=_panic_files(box),
        )
        if unseen:
            raise BenchError(f"{unseen} of {sent} fixes were never seen committed within 15 s")
        if count != sent:
            raise BenchError(f"positions gained {count} rows during the measured load, expected {sent}")
        if exit_code != 0:
            raise BenchError(f"processor exited {exit_code} after SIGTERM (expected 0)\n{proc.log_tail()}")


def _wait_for_consumers(box: Sandbox, proc: ProcessorRun, shards: int) -> None:
    def ready() -> bool:
        try:
            return len(box.redis.xinfo_consumers(box.stream, "processor")) >= shards
        except redis.ResponseError:
            return False

    _wait_until(ready, proc, f"{shards} consumers in the group")


def _wait_until(condition: Callable[[], bool], proc: ProcessorRun, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not condition():
        proc.check_alive()
        proc.sample()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {READY_TIMEOUT_S:.0f}s waiting for {what}\n{proc.log_tail()}")
        time.sleep(POLL_S)


# --- report ------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def _met(ok: bool | None) -> str:
    return "" if ok is None else ("yes" if ok else "**NO**")


def render_table(cores: int, model: str, results: list[Result]) -> str:
    rows: list[tuple[str, str, str, str]] = []
    for r in results:
        v = r.values
        if r.kind == "drain" and "records_per_s" in v:
            target = v.get("target_per_s")
            rss = max(v["peak_rss_mb_per_shard"] or [0.0])
            rows += [
                (f"{r.label}: throughput", f"{fmt_int(v['records_per_s'])} records/s",
                 f"≥ {fmt_int(target)}/s" if target else "", _met(v["records_per_s"] >= target if target else None)),
                (f"{r.label}: wall time", f"{v['wall_s']:.2f} s ({v['startup_s']:.2f} s start-up) "
                 f"for {fmt_int(v['records'])}", "", ""),
                (f"{r.label}: processor CPU", f"{v['cpu_s']:.1f} s ({v['cpu_s'] / v['wall_s']:.2f} cores)", "", ""),
                (f"{r.label}: peak RSS per shard", " / ".join(f"{x:.0f}" for x in v["peak_rss_mb_per_shard"]) + " MB",
                 f"≤ {TARGET_RSS_MB:.0f} MB", _met(rss <= TARGET_RSS_MB)),
                (f"{r.label}: exit after SIGTERM", str(v["exit_code"]), "0", _met(v["exit_code"] == 0)),
            ]
        elif r.kind == "latency" and "p99_ms" in v:
            rss = max(v["peak_rss_mb_per_shard"] or [0.0])
            rows += [
                (f"{r.label}: p50", _ms(v["p50_ms"]), "", ""),
                (f"{r.label}: p99", _ms(v["p99_ms"]), f"≤ {TARGET_P99_MS:.0f} ms",
                 _met(v["p99_ms"] is not None and v["p99_ms"] <= TARGET_P99_MS)),
                (f"{r.label}: max", _ms(v["max_ms"]), "", ""),
                (f"{r.label}: achieved rate", f"{fmt_int(v['achieved_per_s'])}/s ({fmt_int(v['sent'])} sent)",
                 f"{fmt_int(v['offered_per_s'])}/s offered", ""),
                (f"{r.label}: fixes not seen committed", str(v["not_seen"]), "0", _met(v["not_seen"] == 0)),
                (f"{r.label}: processor CPU", f"{v['cpu_s']:.1f} s ({v['cpu_s'] / v['machine']['span_s']:.2f} cores)",
                 "", ""),
                (f"{r.label}: peak RSS per shard", " / ".join(f"{x:.0f}" for x in v["peak_rss_mb_per_shard"]) + " MB",
                 f"≤ {TARGET_RSS_MB:.0f} MB", _met(rss <= TARGET_RSS_MB)),
                (f"{r.label}: exit after SIGTERM", str(v["exit_code"]), "0", _met(v["exit_code"] == 0)),
            ]
        elif r.kind == "membership":
            rows += [
                (f"{r.label}: {n} geofences", f"{v[key]:.2f} µs per fix "
                 f"({v[key.replace('us_per_fix', 'inside_share')]:.0%} of fixes inside one)", "", "")
                for key in sorted((k for k in v if k.startswith("us_per_fix_")), key=lambda k: int(k.rsplit("_", 1)[1]))
                for n in [f"{int(key.rsplit('_', 1)[1]):,}"]
            ]
        if r.error:
            rows.append((f"{r.label}: FAILED", r.error.splitlines()[0][:160].replace("|", "/"), "", "**NO**"))
    head = f"{cores} cores, {model}"
    lines = [f"| {head} | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def where_time_goes(results: list[Result]) -> list[str]:
    notes = []
    for r in results:
        v = r.values
        if "cpu_s" not in v:
            continue
        span = v["machine"]["span_s"]
        parts = [f"processor {v['cpu_s']:.1f} s"]
        if v.get("postgres_cpu_s") is not None:
            parts.append(f"Postgres {v['postgres_cpu_s']:.1f} s")
        parts.append(f"Redis {v['redis_cpu_s']:.1f} s")
        m = v["machine"]
        parts.append(f"bench itself {m['bench_process_cpu_s']:.1f} s")
        b = v.get("batches")
        batches = ""
        if b and b["batches"]:
            per_batch_ms = 1000.0 * v["cpu_s"] / b["batches"]
            batches = (f" {fmt_int(b['batches'])} batches of {b['mean_batch']:g} fixes on average "
                       f"({per_batch_ms:.2f} ms processor CPU per batch, {1e6 * v['cpu_s'] / max(1, v.get('records') or v.get('rows_stored') or 1):.0f} µs per fix).")
        if v.get("postgres_cpu_s") is not None:
            known = v["cpu_s"] + v["postgres_cpu_s"] + v["redis_cpu_s"] + m["bench_process_cpu_s"]
            other = max(0.0, m["busy_cores"] * span - known)
            flag = " (**other load on the machine: this row is not representative**)" if other > 0.25 * span else ""
            parts.append(f"everything else {other:.1f} s{flag}")
        notes.append(f"- {r.label}: {', '.join(parts)} over {span:.1f} s. Machine: {m['busy_cores']:.2f} of "
                     f"{os.cpu_count()} cores busy (user {m['user_cores']:.2f}, system {m['system_cores']:.2f}, "
                     f"softirq {m['irq_softirq_cores']:.2f}, steal {m['steal_cores']:.2f}), iowait {m['iowait_cores']:.2f}."
                     + batches)
    return notes


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scripts.bench", description="Benchmark the Processor: drain throughput and end-to-end latency.",
    )
    p.add_argument("--only", choices=("drain", "latency", "membership"), help="run one phase only (default: both)")
    p.add_argument("--shards", default="1,2", help="SHARDS values of the drain runs, comma-separated (default 1,2)")
    p.add_argument("--backlog", type=int, default=None, help="fixes in the drain backlog (default 200000; --quick 20000)")
    p.add_argument("--devices", type=int, default=2000, help="simulated devices (default 2000)")
    p.add_argument("--rate", type=float, default=5000, help="offered load of the latency phase, fixes/s (default 5000)")
    p.add_argument("--latency-seconds", type=float, default=None, help="measured load duration (default 30; --quick 5)")
    p.add_argument("--latency-shards", type=int, default=2, help="SHARDS of the latency phase (default 2)")
    p.add_argument("--warmup-seconds", type=float, default=1.0, help="unmeasured load before the latency phase, s (default 1)")
    p.add_argument("--redis-url", help="use this Redis instead of a throwaway one (unique stream keys, deleted after)")
    p.add_argument("--database-url", help="use this Postgres server instead of a throwaway one "
                   "(creates and drops its own databases bench_<random>)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--no-geofences", action="store_true", help="skip the drain row with 1,000 geofences")
    p.add_argument("--quick", action="store_true", help="smoke test: backlog 20,000 and latency 5 s unless given")
    args = p.parse_args(argv)
    try:
        args.shards = [int(s) for s in args.shards.split(",") if s.strip()]
    except ValueError:
        p.error("--shards must be comma-separated whole numbers, e.g. 1,2")
    if not args.shards or any(not 1 <= s <= 256 for s in args.shards):
        p.error("--shards values must be 1..256")
    if args.backlog is None:
        args.backlog = 20_000 if args.quick else 200_000
    if args.latency_seconds is None:
        args.latency_seconds = 5.0 if args.quick else 30.0
    if args.backlog < 1 or args.devices < 1 or args.rate <= 0 or args.latency_seconds <= 0 or args.latency_shards < 1:
        p.error("--backlog, --devices, --rate, --latency-seconds and --latency-shards must be positive")
    SCRUB.add_url(args.redis_url)
    SCRUB.add_url(args.database_url)
    return args


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise Interrupted()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    cores, model = os.cpu_count() or 1, cpu_model()
    results: list[Result] = []
    servers: dict[str, str] = {}
    background: float | None = None
    status = 0
    started = time.monotonic()
    try:
        with Bench(args) as bench:
            servers = bench.describe_servers()
            say(f"servers: redis {servers['redis']}; postgres {servers['postgres']}")
            background = background_load()
            if background > 0.15:
                say(f"WARNING: other processes keep {background:.2f} of {cores} cores busy; "
                    "the figures will be lower than on a quiet machine")
            inherited = {k: os.environ[k] for k in PASSED_THROUGH if k in os.environ}
            if inherited:
                say(f"processor settings from the environment: {inherited}")
            phases: list[tuple[Result, Callable[[Result], None]]] = []
            if args.only in (None, "drain"):
                for scenario in drain_scenarios(args):
                    phases.append((Result("drain", scenario.label),
                                   lambda r, s=scenario: run_drain(bench, r, s, args.backlog, args.devices)))
            if args.only in (None, "membership"):
                phases.append((Result("membership", "geofence membership test"), run_membership))
            if args.only in (None, "latency"):
                label = f"latency, SHARDS={args.latency_shards}, {fmt_int(args.rate)}/s x {args.latency_seconds:g}s"
                phases.append((Result("latency", label),
                               lambda r: run_latency(bench, r, args.latency_shards, args.rate, args.latency_seconds,
                                                     args.devices, args.warmup_seconds)))
            for result, phase in phases:
                results.append(result)
                try:
                    phase(result)
                except BenchError as exc:
                    status = 1
                    result.error = str(exc)
                    say(f"phase failed: {exc}")
                except BaseException:
                    result.error = "interrupted"
                    raise
    except (KeyboardInterrupt, Interrupted):
        say("\ninterrupted; servers and processes cleaned up")
        status = 130
    except BenchError as exc:
        say(f"error: {exc}")
        status = 1
    except Exception as exc:  # noqa: BLE001 - report without secrets, then fail
        say(f"error: {type(exc).__name__}: {exc}")
        status = 1

    if results:
        title = f"## Processor benchmark: {cores} cores, {model}"
        settings = (f"backlog {fmt_int(args.backlog)} fixes / {fmt_int(args.devices)} devices; latency "
                    f"{fmt_int(args.rate)}/s x {args.latency_seconds:g} s" + ("; --quick" if args.quick else ""))
        out = [title, "", settings, ""]
        if background is not None:
            quiet = "quiet" if background <= 0.15 else "**NOT quiet: figures understate the processor**"
            out += [f"Background load before the run: {background:.2f} of {cores} cores busy ({quiet}).", ""]
        if servers:
            out += [f"Servers: Redis {servers['redis']}; Postgres {servers['postgres']}", ""]
        out += [render_table(cores, model, results), ""]
        notes = where_time_goes(results)
        if notes:
            out += ["Where the time goes (CPU seconds during each measured span):", *notes, ""]
        print(SCRUB("\n".join(out)))
        sys.stdout.flush()
    if args.json:
        doc = {
            "machine": {"cores": cores, "cpu_model": model},
            "servers": servers,
            "background_busy_cores": background,
            "settings": {k: getattr(args, k) for k in ("backlog", "devices", "rate", "latency_seconds",
                                                      "latency_shards", "warmup_seconds", "shards", "quick")},
            "processor_env": {k: os.environ[k] for k in PASSED_THROUGH if k in os.environ},
            "targets": {"drain_per_s": TARGET_DRAIN, "p99_ms": TARGET_P99_MS, "rss_mb_per_shard": TARGET_RSS_MB},
            "results": [{"kind": r.kind, "label": r.label, **r.values, "error": r.error} for r in results],
            "status": status,
            "bench_seconds": round(time.monotonic() - started, 1),
        }
        Path(args.json).write_text(SCRUB(json.dumps(doc, indent=2)) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
