"""`make demo`: a simulated fleet, with geofences, through a real `processor run`; then proof that nothing was lost.

Run from the repository root: `make demo`, or `.venv/bin/python -m scripts.demo [--keep] [--rate N] ...`.

Uses REDIS_URL / DATABASE_URL when they answer, else the usual local servers, else throwaway
ones (scripts/toolkit/services.py). On a reused server it touches only its own stream keys
(`demo:<tag>:*`) and a fresh database `processor_demo_<tag>`, both removed at the end unless --keep.
Ctrl-C stops everything cleanly and exits 130.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psycopg
import redis

from common.config import redact_url
from scripts.toolkit.fleet import Fleet
from scripts.toolkit.harness import (
    GROUP,
    Producer,
    delete_keys,
    exit_status,
    group_info,
    guarded,
    provide_services,
    say,
    stop_processor,
)
from scripts.toolkit.processes import PROCESSOR, ROOT, tail

SHARDS, SETTLE_DEADLINE_S = 2, 60.0


def snapshot(r: redis.Redis, db: psycopg.Connection, stream: str, dlq: str) -> dict:
    group = group_info(r, stream) or {}
    return {"stored": db.execute("select count(*) from positions").fetchone()[0], "dead": r.xlen(dlq),
            "lag": group.get("lag"), "pending": group.get("pending"), "consumers": group.get("consumers", 0)}


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    tag = time.strftime("%Y%m%d_%H%M%S") + f"_{os.getpid()}"
    redis_url, db_url, where = provide_services(stack, tag, args.keep)
    prefix = f"demo:{tag}:"
    stream, dlq = prefix + "telemetry", prefix + "telemetry:dlq"
    if args.keep:
        stack.callback(say, f"kept Redis keys {prefix}* on {redact_url(redis_url)}")
    else:
        stack.callback(guarded, "delete the demo's Redis keys", delete_keys, redis_url, prefix)
    workdir = Path(tempfile.mkdtemp(prefix=f"processor-demo-{tag}-"))
    log_path = workdir / "processor.log"
    stack.callback(say, f"processor logs: {log_path}")
    say(*where, f"stream:   {stream} (dead letters: {dlq})")
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": db_url, "MIGRATION_DATABASE_URL": db_url,
           "STREAM_KEY": stream, "DLQ_KEY": dlq, "CONSUMER_GROUP": GROUP, "SHARDS": str(SHARDS),
           "HTTP_PORT": "0", "LOG_LEVEL": "WARNING", "PANIC_DIR": str(workdir / "panic"), "INSTANCE_ID": f"demo-{tag}"}
    log = stack.enter_context(open(log_path, "ab"))

    def log_tail() -> list[str]:
        return ["  " + line for line in tail(log_path, 5)]

    popen = dict(env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                 start_new_session=True)  # our Ctrl-C must not reach it: we stop it with SIGTERM ourselves
    if (code := subprocess.run([*PROCESSOR, "migrate"], **popen).returncode) != 0:
        say(f"processor migrate failed (exit {code}):", *log_tail(), err=True)
        return 1
    geojson = workdir / "geofences.geojson"
    geojson.write_bytes(orjson.dumps(demo_geofences(args)))
    if (code := subprocess.run([*PROCESSOR, "geofences", "import", str(geojson)], **popen).returncode) != 0:
        say(f"processor geofences import failed (exit {code}):", *log_tail(), err=True)
        return 1
    proc = subprocess.Popen([*PROCESSOR, "run"], **popen)
    stack.callback(lambda: proc.returncode is None and say(f"processor stopped ({exit_status(stop_processor(proc))})"))
    r = stack.enter_context(redis.Redis.from_url(redis_url, socket_timeout=10))
    db = stack.enter_context(psycopg.connect(db_url, autocommit=True))
    deadline = time.monotonic() + 60
    while snapshot(r, db, stream, dlq)["consumers"] < SHARDS:  # wait for both shards to join the group
        if proc.poll() is not None or time.monotonic() > deadline:
            state = "not ready after 60s" if proc.poll() is None else exit_status(proc.returncode)
            say(f"processor run did not start ({state}):", *log_tail(), err=True)
            return 1
        time.sleep(0.1)

    producer = Producer(redis_url, stream, args)
    stack.callback(lambda: (producer.stop.set(), producer.join(timeout=5)))
    t0 = time.monotonic()
    producer.start()
    tty, last_plain, history = sys.stderr.isatty(), 0.0, collections.deque([(t0, 0)], maxlen=5)
    produced_at = settled_at = None
    while True:
        time.sleep(0.5 if produced_at is None else 0.1)  # poll faster once only the drain is left
        s, produced, now = snapshot(r, db, stream, dlq), producer.counts.total, time.monotonic()
        history.append((now, s["stored"]))
        rate = (history[-1][1] - history[0][1]) / max(history[-1][0] - history[0][0], 1e-9)
        lag = "?" if s["lag"] is None else f"{s['lag'] + (s['pending'] or 0):,}"
        line = (f"produced {produced:,}  stored {s['stored']:,}  dead-lettered {s['dead']:,}  "
                f"lag {lag}  {rate:,.0f} stored/s  {now - t0:5.1f}s")
        if tty:
            sys.stderr.write(f"\r{line}\x1b[K")
        elif now - last_plain >= 2.0:
            sys.stderr.write(line + "\n")
            last_plain = now
        sys.stderr.flush()
        if producer.error is not None:
            say("", f"producer failed: {type(producer.error).__name__}: {producer.error}", err=True)
            return 1
        if proc.poll() is not None:
            say("", f"processor exited early ({exit_status(proc.returncode)}):", *log_tail(), err=True)
            return 1
        if produced_at is None and producer.finished_at is not None:
            produced_at = producer.finished_at
        if produced_at is not None:
            produced = producer.counts.total
            if s["stored"] + s["dead"] >= produced and not s["pending"] and not s["lag"]:
                settled_at = now
                break
            if now - produced_at > SETTLE_DEADLINE_S:
                break
    if tty:
        sys.stderr.write("\n")
    ended_at, code = time.monotonic(), stop_processor(proc)
    return summary(args, producer.counts, snapshot(r, db, stream, dlq), r, db, dlq, t0, produced_at,
                   settled_at or ended_at, settled_at is not None, code)


def demo_geofences(args: argparse.Namespace) -> dict:
    """Circles and squares around where some simulated devices start, so visits open and close."""
    starts = list(Fleet(args.devices, seed=args.seed).fixes(args.devices))[: max(1, args.devices // 5)]
    features = []
    for n, fix in enumerate(starts):
        lat, lon = fix["lat"], fix["lon"]
        if n % 2:
            geometry, properties = {"type": "Point", "coordinates": [lon, lat]}, {"radius_m": 150 + 25 * (n % 9)}
        else:
            d = 0.002
            ring = [[lon - d, lat - d], [lon + d, lat - d], [lon + d, lat + d], [lon - d, lat + d], [lon - d, lat - d]]
            geometry, properties = {"type": "Polygon", "coordinates": [ring]}, {}
        features.append({"type": "Feature", "geometry": geometry, "properties": {"name": f"demo-{n:03d}", **properties}})
    return {"type": "FeatureCollection", "features": features}


def summary(args, counts, s, r, db, dlq, t0, produced_at, end, settled, code) -> int:  # type: ignore[no-untyped-def]
    letters = [(f.get(b"error_kind", b"?").decode(errors="replace"), f.get(b"error", b"").decode(errors="replace"))
               for _id, f in r.xrange(dlq)]
    kinds = collections.Counter(kind for kind, _error in letters)
    distinct = list(dict.fromkeys(letters))  # (kind, error) in order of first appearance
    examples = [next(p for p in distinct if p[0] == kind) for kind in kinds][:2]  # different kinds first
    examples += [p for p in distinct if p not in examples][: 2 - len(examples)]
    devices, odometer_km = db.execute("select count(*), coalesce(sum(odometer_m), 0) / 1000 from last_position").fetchone()
    visits, closed, crossed, inside, fences = db.execute(
        "select count(*), count(exited_at), count(exit_crossing_at), count(*) - count(exited_at), "
        "count(distinct geofence_id) from timing_records").fetchone()
    say("",
        f"fixes produced  {counts.total:,} ({counts.valid:,} valid, {counts.malformed:,} malformed) "
        f"from {args.devices} devices at {args.rate:,.0f}/s for {args.seconds:g}s",
        f"stored          {s['stored']:,} rows in positions",
        f"dead-lettered   {s['dead']:,} ({', '.join(f'{k} {n:,}' for k, n in kinds.most_common()) or 'none'})",
        *(f"  e.g. [{kind}] {error[:110]}" for kind, error in examples),
        f"devices         {devices:,} in last_position, {odometer_km:,.1f} km driven in all",
        f"timing          {visits:,} visits to {fences} geofences: {closed:,} closed ({crossed:,} with an "
        f"interpolated exit crossing), {inside:,} still inside",
        f"elapsed         {end - t0:.1f}s; throughput {(s['stored'] + s['dead']) / (end - t0):,.0f} fixes/s"
        + (f"; caught up within {max(end - produced_at, 0.1):.1f}s of the last fix sent" if settled else ""))
    problems = []
    if not settled:
        problems.append(f"not settled {SETTLE_DEADLINE_S:.0f}s after the producer finished "
                        f"(pending {s['pending']}, lag {s['lag']})")
    if s["stored"] != counts.valid:
        problems.append(f"stored {s['stored']:,} != valid fixes produced {counts.valid:,}")
    if s["dead"] != counts.malformed:
        problems.append(f"dead-lettered {s['dead']:,} != malformed fixes produced {counts.malformed:,}")
    if code != 0:
        problems.append(f"processor ended with {exit_status(code)} on SIGTERM, expected exit 0")
    if problems:
        say("MISMATCH: " + "; ".join(problems))
        return 1
    say("nothing lost: every fix stored once or dead-lettered")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=200, help="simulated trackers (default 200)")
    parser.add_argument("--rate", type=float, default=2000, help="fixes per second (default 2000)")
    parser.add_argument("--seconds", type=float, default=20, help="how long to produce (default 20)")
    parser.add_argument("--malformed", type=float, default=0.01, help="poison fraction 0..1 (default 0.01)")
    parser.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true",
                        help="keep the demo database and stream keys on reused servers (throwaway ones always go)")
    args = parser.parse_args()
    if args.devices < 1 or args.rate <= 0 or args.seconds <= 0 or not 0 <= args.malformed <= 1:
        parser.error("need --devices >= 1, --rate > 0, --seconds > 0 and 0 <= --malformed <= 1")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    stack = contextlib.ExitStack()
    try:
        return run(args, stack)
    except KeyboardInterrupt:
        say("", "interrupted: stopping the processor and the producer, cleaning up ...", err=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # cleanup is bounded; don't let a second Ctrl-C cut it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.close()


if __name__ == "__main__":
    sys.exit(main())
