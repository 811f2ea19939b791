"""Options, the order of the phases, and the report at the end (`python -m scripts.bench`)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from common.logs import scrub
from scripts.benchmark.base import PASSED_THROUGH, BenchError, Interrupted, Result, fmt_int, say
from scripts.benchmark.drain import drain_scenarios, run_drain
from scripts.benchmark.growth import growth_phases
from scripts.benchmark.latency import run_latency
from scripts.benchmark.machine import background_load, cpu_model
from scripts.benchmark.membership import run_membership
from scripts.benchmark.report import json_document, render_report
from scripts.benchmark.sandbox import Bench
from scripts.benchmark.soak import run_soak, soak_label
from scripts.benchmark.versus import versus_phases
from scripts.toolkit.services import add_url_secret


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scripts.bench", description="Benchmark the Processor: drain throughput and end-to-end latency.",
    )
    p.add_argument("--only", choices=("drain", "latency", "membership", "soak", "peer", "growth"),
                   help="run one phase only (default: drain, membership and latency; soak, peer and growth "
                        "run only when named)")
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
    p.add_argument("--rounds", type=int, default=3,
                   help="peer and growth: interleaved rounds, medians reported (default 3)")
    p.add_argument("--growth-shards", type=int, default=2, help="growth: SHARDS of its drains (default 2)")
    p.add_argument("--profile", metavar="DIR",
                   help="drain runs: a cProfile of each shard and pg_stat_statements, summarised; files in DIR")
    p.add_argument("--no-geofences", action="store_true", help="skip the drain row with 1,000 geofences")
    p.add_argument("--quick", action="store_true", help="smoke test: backlog 20,000 and latency 5 s unless given")
    p.add_argument("--soak-minutes", type=float, default=20.0, help="soak: minutes of steady load at --rate (default 20)")
    p.add_argument("--kill-every-s", type=float, default=180.0,
                   help="soak: SIGKILL a shard (0, 1, 0, ...) this often, s (default 180; 0: never)")
    p.add_argument("--sample-every-s", type=float, default=30.0,
                   help="soak: sample memory, stream, RSS and metrics this often, s (default 30)")
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
    if args.rounds < 1 or not 1 <= args.growth_shards <= 256:
        p.error("--rounds must be 1 or more, --growth-shards 1..256")
    if args.soak_minutes <= 0 or args.kill_every_s < 0 or args.sample_every_s <= 0:
        p.error("--soak-minutes and --sample-every-s must be positive, --kill-every-s 0 or more")
    add_url_secret(args.redis_url)
    add_url_secret(args.database_url)
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
            if args.only == "soak":
                phases.append((Result("soak", soak_label(args)), lambda r: run_soak(bench, r, args)))
            if args.only == "peer":
                phases += versus_phases(bench, args)
            if args.only == "growth":
                phases += growth_phases(bench, args)
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
        print(scrub(render_report(args, cores, model, background, servers, results)))
        sys.stdout.flush()
    if args.json:
        doc = json_document(args, cores, model, background, servers, results)
        doc.update(status=status, bench_seconds=round(time.monotonic() - started, 1))
        Path(args.json).write_text(scrub(json.dumps(doc, indent=2)) + "\n")
    return status
