"""The fleet simulator's command line: fill a Redis Stream with simulated GPS fixes.

Run from the repository root::

    .venv/bin/python -m scripts.simulate backlog 200000 --devices 2000 [--seed S] [--malformed F]
    .venv/bin/python -m scripts.simulate steady --rate 5000 --seconds 30 [--devices D] ...

Common options: ``--stream`` (env ``STREAM_KEY``, default ``telemetry:t``),
``--redis-url`` (env ``REDIS_URL``, default ``redis://localhost:6379/0``).
Progress goes to stderr (at most every 0.5 s); one JSON summary line goes to
stdout at the end.

The simulator itself is importable from ``scripts.toolkit``: ``fleet`` (``Fleet``, the
fix format), ``poison`` (``malformed``, ``MALFORMED_KINDS``) and ``writer``
(``produce``, ``backlog``, ``steady``, ``Counts``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from common.config import redact_url
from common.logs import scrub
from scripts.toolkit.fleet import DEFAULT_START_MS
from scripts.toolkit.progress import Progress
from scripts.toolkit.services import add_url_secret
from scripts.toolkit.writer import Counts, backlog, steady


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--devices", type=int, default=1000, help="number of simulated trackers (default 1000)")
    common.add_argument("--seed", type=int, default=1, help="RNG seed (default 1)")
    common.add_argument(
        "--malformed", type=float, default=0.0, metavar="F", help="fraction of poison entries, 0..1 (default 0)"
    )
    common.add_argument(
        "--stream",
        default=os.environ.get("STREAM_KEY", "telemetry:t"),
        help="stream key (env STREAM_KEY, default telemetry:t)",
    )
    common.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", "redis://localhost:6379/0"),
        help="Redis URL (env REDIS_URL, default redis://localhost:6379/0)",
    )
    common.add_argument("--pipeline", type=int, default=1000, help="commands per pipelined batch (default 1000)")

    p = argparse.ArgumentParser(prog="python -m scripts.simulate", description="GPS-tracker fleet simulator for a Redis Stream.")
    sub = p.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("backlog", parents=[common], help="write N entries as fast as possible")
    b.add_argument("n", type=int, help="number of entries")
    b.add_argument(
        "--start-ms",
        default=None,
        help=f"ts of the first round: epoch ms or 'now' (default {DEFAULT_START_MS})",
    )
    s = sub.add_parser("steady", parents=[common], help="offer a steady rate with live timestamps")
    s.add_argument("--rate", type=float, required=True, help="entries per second")
    s.add_argument("--seconds", type=float, required=True, help="duration in seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if not 0.0 <= args.malformed <= 1.0:
        print("error: --malformed must be within [0, 1]", file=sys.stderr)
        return 2
    if args.devices < 1:
        print("error: --devices must be >= 1", file=sys.stderr)
        return 2

    import redis

    try:
        client = redis.Redis.from_url(args.redis_url)
    except ValueError:
        print(f"error: invalid Redis URL {redact_url(args.redis_url)}", file=sys.stderr)
        return 2

    if args.mode == "backlog":
        total = max(0, args.n)
        start_ms = None
        if args.start_ms is not None:
            start_ms = time.time_ns() // 1_000_000 if args.start_ms == "now" else int(args.start_ms)
    else:
        total = int(round(args.rate * args.seconds))
    prog = Progress(args.mode, total)
    interrupted = False
    counts = Counts()
    t0 = time.monotonic()
    try:
        if args.mode == "backlog":
            counts = backlog(
                client,
                args.stream,
                total,
                devices=args.devices,
                seed=args.seed,
                malformed_fraction=args.malformed,
                start_ms=start_ms,
                pipeline_size=args.pipeline,
                progress=prog,
            )
        else:
            counts = steady(
                client,
                args.stream,
                args.rate,
                args.seconds,
                devices=args.devices,
                seed=args.seed,
                malformed_fraction=args.malformed,
                pipeline_size=args.pipeline,
                progress=prog,
            )
    except KeyboardInterrupt:
        interrupted = True
        counts = prog.counts or counts
    except redis.RedisError as exc:
        prog.finish()
        add_url_secret(args.redis_url)
        print(f"error: {type(exc).__name__}: {scrub(str(exc))} ({redact_url(args.redis_url)})", file=sys.stderr)
        return 1
    finally:
        client.close()
    seconds = time.monotonic() - t0
    prog.finish()
    out: dict[str, Any] = {
        "mode": args.mode,
        "stream": args.stream,
        "devices": args.devices,
        "seed": args.seed,
        **counts.as_dict(),
        "seconds": round(seconds, 3),
        "rate": round(counts.total / seconds, 1) if seconds > 0 else None,
    }
    if args.mode == "steady":
        out["target_rate"] = args.rate
    if interrupted:
        out["interrupted"] = True
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
