"""Drain rows: a backlog written before `processor run` starts, timed until all of it is stored."""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

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
from scripts.benchmark.run import ProcessorRun
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


def run_drain(bench: Bench, result: Result, scenario: DrainScenario, n: int, devices: int) -> None:
    """One drain row, filled into `result`; raises BenchError when the phase fails."""
    result.values.update(shards=scenario.shards, backlog=n, devices=devices, target_per_s=scenario.target)
    say(f"\n{scenario.label}: backlog {fmt_int(n)} fixes from {fmt_int(devices)} devices")
    with bench.sandbox(scenario.label, scenario.shards) as box:
        bench.migrate(box)
        if scenario.setup is not None:
            scenario.setup(box)
        produce_progress = Progress(f"{scenario.label}: producing backlog", n, noun="written")

        def on_batch(counts: Counts) -> None:
            if produce_progress.due():
                produce_progress.report(counts.total)

        t = time.monotonic()
        counts = backlog(box.redis, box.stream, n, devices=devices, seed=SEED, progress=on_batch)
        say(f"  backlog written in {time.monotonic() - t:.1f}s (not timed)")
        expected, total = counts.valid, counts.total
        if box.redis.xlen(box.stream) != total:
            raise BenchError(f"stream holds {box.redis.xlen(box.stream)} entries, expected {total}")

        with psycopg.connect(box.database_url, autocommit=True) as db:
            def stored() -> int:
                return db.execute("select count(*) from positions").fetchone()[0]

            span = Span(bench)
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
                span.stop(expected)
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
            shard_processes_seen=len(proc.memory),
            **span.values(proc, cpu, exit_code),
        )
        if exit_code != 0:
            raise BenchError(f"processor exited {exit_code} after SIGTERM (expected 0)\n{proc.log_tail()}")
        if len(proc.memory) != scenario.shards:
            raise BenchError(f"saw {len(proc.memory)} shard processes, expected {scenario.shards} (restarts?)")
