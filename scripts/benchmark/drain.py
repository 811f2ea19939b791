"""Drain rows: a backlog written before `processor run` starts, timed until all of it is stored."""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import orjson
import psycopg
import redis

from scripts.benchmark.base import (
    POLL_S,
    SEED,
    STALL_TIMEOUT_S,
    TARGET_DRAIN,
    BenchError,
    Progress,
    Result,
    fmt_int,
    say,
)
from scripts.benchmark.profiles import Profile
from scripts.benchmark.run import ProcessorRun, shard_cpu_s
from scripts.benchmark.sandbox import Bench, Sandbox, Span
from scripts.toolkit.harness import group_info
from scripts.toolkit.writer import Counts, backlog

GEOFENCES = 1_000


@dataclass
class DrainScenario:
    label: str
    shards: int
    setup: Callable[[Sandbox], None] | None = None  # after migrate, before the backlog
    target: float | None = None  # records/s


def import_geofences(box: Sandbox, count: int = GEOFENCES, spread: float = 1.0) -> None:
    """`count` geofences over the simulated fleet's area: circles of 100-600 m and squares, some with holes.

    `spread` scales the side of the square they are scattered over (1: the fleet's area).
    """
    rng = random.Random(SEED)
    center_lat, center_lon = 52.37, 4.90
    rows = []
    for n in range(count):
        lat = center_lat + (rng.random() * 2 - 1) * 0.45 * spread
        lon = center_lon + (rng.random() * 2 - 1) * 0.45 * spread
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


def drain_scenarios(args: argparse.Namespace) -> list[DrainScenario]:
    scenarios = [DrainScenario(f"drain, SHARDS={n}", n, target=TARGET_DRAIN.get(n)) for n in args.shards]
    if 2 in args.shards and not args.no_geofences:
        # Issue 3: with 1,000 active geofences, within 25% of the figure without them.
        scenarios.append(DrainScenario(f"drain, SHARDS=2, {GEOFENCES:,} geofences", 2, setup=import_geofences))
    return scenarios


def stream_done(client: redis.Redis, stream: str, total: int) -> tuple[bool, int]:
    """(whole stream read and nothing pending, entries read so far)."""
    g = group_info(client, stream)
    if g is None:
        return False, 0
    read = g.get("entries-read") or 0
    lag = g.get("lag")
    done = g.get("pending") == 0 and read >= total and (lag == 0 or lag is None)
    return done, read


def write_backlog(box: Sandbox, label: str, n: int, devices: int) -> tuple[int, int]:
    """The backlog XADDed before any consumer starts (not timed); returns (valid fixes, entries)."""
    produce_progress = Progress(f"{label}: producing backlog", n, noun="written")

    def on_batch(counts: Counts) -> None:
        if produce_progress.due():
            produce_progress.report(counts.total)

    t = time.monotonic()
    counts = backlog(box.redis, box.stream, n, devices=devices, seed=SEED, progress=on_batch)
    say(f"  backlog written in {time.monotonic() - t:.1f}s (not timed)")
    entries = box.redis.xlen(box.stream)
    if entries != counts.total:
        raise BenchError(f"stream holds {entries} entries, expected {counts.total}")
    return counts.valid, counts.total


class Consumer(Protocol):
    """What wait_drained needs of the processes under measurement."""

    started: float

    def sample(self) -> None: ...

    def check_alive(self) -> None: ...

    def log_tail(self, lines: int = 15) -> str: ...

    def busy_cpu_s(self) -> float: ...  # CPU seconds so far of the processes doing the work


@dataclass
class Drained:
    t_end: float  # the poll that saw everything stored
    first_read_at: float | None  # the poll that first saw an entry read
    # the consumer's busy_cpu_s() then (0 if none was): start-up (connections, geofences) is apart.
    # The per-fix CPU counts from this poll, up to POLL_S after the first entry was read.
    cpu_at_first_read: float


def wait_drained(box: Sandbox, consumer: Consumer, label: str, expected: int, total: int) -> Drained:
    """Poll until the group has read everything, nothing is pending and positions holds `expected` rows."""
    with psycopg.connect(box.database_url, autocommit=True) as db:
        def stored() -> int:
            return db.execute("select count(*) from positions").fetchone()[0]

        progress = Progress(label, expected)
        first_read_at: float | None = None
        cpu_at_first_read = 0.0
        last_change, last_read, count = consumer.started, -1, 0
        while True:
            now = time.monotonic()
            consumer.sample()
            done, read = stream_done(box.redis, box.stream, total)
            if read and first_read_at is None:
                first_read_at, cpu_at_first_read = now, consumer.busy_cpu_s()
            if read != last_read:
                last_change, last_read = now, read
            if done:
                count = stored()
                if count == expected:
                    return Drained(time.monotonic(), first_read_at, cpu_at_first_read)
                if count > expected:
                    raise BenchError(f"positions holds {count} rows, more than the {expected} fixes sent")
            if progress.due():
                previous, count = count, stored()
                progress.report(count, f"  (entries read {fmt_int(read)})")
                if count != previous:
                    last_change = now
            if now - last_change > STALL_TIMEOUT_S:
                raise BenchError(f"no progress for {STALL_TIMEOUT_S:.0f}s (stored {count}/{expected})\n"
                                 f"{consumer.log_tail()}")
            consumer.check_alive()
            time.sleep(POLL_S)


def drain_values(expected: int, started: float, drained: Drained) -> dict[str, float]:
    """records_per_s counts from process start (start-up included); drain_per_s from the first entry read."""
    wall = drained.t_end - started
    first = drained.first_read_at or drained.t_end
    return dict(
        records=expected,
        records_per_s=round(expected / wall, 1),
        drain_per_s=round(expected / max(drained.t_end - first, 1e-3), 1),
        wall_s=round(wall, 3),
        startup_s=round(first - started, 3),
    )


def run_drain(bench: Bench, result: Result, scenario: DrainScenario, n: int, devices: int) -> None:
    """One drain row, filled into `result`; raises BenchError when the phase fails."""
    result.values.update(shards=scenario.shards, backlog=n, devices=devices, target_per_s=scenario.target)
    say(f"\n{scenario.label}: backlog {fmt_int(n)} fixes from {fmt_int(devices)} devices")
    with bench.sandbox(scenario.label, scenario.shards) as box:
        bench.migrate(box)
        if scenario.setup is not None:
            scenario.setup(box)
        expected, total = write_backlog(box, scenario.label, n, devices)
        profile = Profile(bench, box, scenario.label)
        span = Span(bench)
        proc = ProcessorRun(box.env, box.workdir / "processor.log", scenario.shards)
        try:
            drained = wait_drained(box, proc, scenario.label, expected, total)
            cpu = proc.cpu_seconds()  # right before stopping
            proc.sample()
            span.stop(expected)
            say(f"  drained {fmt_int(expected)} in {drained.t_end - proc.started:.2f}s; stopping the processor (SIGTERM)")
            exit_code = proc.stop()
        finally:
            proc.close()
        startup = drained.cpu_at_first_read
        result.values.update(
            **drain_values(expected, proc.started, drained),
            shard_processes_seen=len(proc.shards()),
            shard_cpu_us_per_fix=round(1e6 * (shard_cpu_s(cpu) - startup) / expected, 2),
            shard_cpu_startup_s=round(startup, 2),
            **span.values(proc, cpu, exit_code),
            derived=proc.derived_counts(),
        )
        profile.collect(result)
        if exit_code != 0:
            raise BenchError(f"processor exited {exit_code} after SIGTERM (expected 0)\n{proc.log_tail()}")
        if len(proc.shards()) != scenario.shards:
            raise BenchError(f"saw {len(proc.shards())} shard processes, expected {scenario.shards} (restarts?)")
