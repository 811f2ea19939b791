"""The multi-instance failover playbook: two instances, one SIGKILLed under load, exact proof.

Starts (or uses) Redis and Postgres like `make demo`, runs two instances of two shards,
offers a steady load, SIGKILLs one whole instance, prints the lag timeline second by
second until the survivor has caught up, restarts the dead instance, and verifies that
every fix was stored once (or dead-lettered once) and nothing is pending. Exit 0 only then.

Run from the repository root: `scripts/failover_test.sh [--quick]`, which runs
`.venv/bin/python -m scripts.failover`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import redis

from scripts.toolkit.harness import GROUP, Producer, delete_keys, group_info, provide_services, say, stop_processor
from scripts.toolkit.processes import PROCESSOR, ROOT
from shard.decode import decode_entry

CATCH_UP_DEADLINE_S = 120.0


def start_instance(env: dict[str, str], name: str, workdir: Path) -> subprocess.Popen[bytes]:
    log = open(workdir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        PROCESSOR + ["run"], env={**env, "INSTANCE_ID": name}, stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT,
    )


def state(r: redis.Redis, db: psycopg.Connection, stream: str, dead_instance: str) -> dict[str, int]:
    group = group_info(r, stream) or {}
    summary = r.xpending(stream, GROUP)
    orphaned = sum(c["pending"] for c in summary["consumers"] if c["name"].decode().startswith(f"{dead_instance}-"))
    return {
        "stored": db.execute("select count(*) from positions").fetchone()[0],
        "dead_letters": r.xlen(f"{stream}:dlq"),
        "lag": group.get("lag") or 0,
        "pending": group.get("pending", 0),
        "pending_on_dead": orphaned,
    }


def _group_ready(r: redis.Redis, stream: str) -> bool:
    group = group_info(r, stream)
    return group is not None and group["consumers"] >= 4


def verify(r: redis.Redis, db: psycopg.Connection, stream: str) -> list[str]:
    """Every stream entry once in positions or once in the DLQ, nothing pending; returns problems."""
    expected, poison = set(), set()
    for entry_id, fields in r.xrange(stream):
        try:
            fix = decode_entry(fields)
            expected.add((fix.device_id, fix.ts))
        except ValueError:
            poison.add(entry_id)
    rows = db.execute("select device_id, ts from positions").fetchall()
    letters = [fields[b"source_id"] for _, fields in r.xrange(f"{stream}:dlq")]
    problems = []
    if len(rows) != len(expected) or set(rows) != expected:
        problems.append(f"positions holds {len(rows)} rows, expected exactly {len(expected)} distinct fixes")
    if len(letters) != len(set(letters)) or set(letters) != poison:
        problems.append(f"DLQ holds {len(letters)} letters, expected exactly the {len(poison)} poison entries")
    pending = r.xpending(stream, GROUP)["pending"]
    if pending:
        problems.append(f"{pending} entries still pending")
    return problems


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    tag = time.strftime("%Y%m%d_%H%M%S") + f"_{os.getpid()}"
    redis_url, db_url, lines = provide_services(stack, tag, keep=False)
    stream = f"failover:{tag}:telemetry"
    stack.callback(delete_keys, redis_url, f"failover:{tag}:")
    workdir = Path(tempfile.mkdtemp(prefix="processor-failover-"))
    say(*lines, f"stream:   {stream}", f"logs:     {workdir}")
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": db_url, "STREAM_KEY": stream, "SHARDS": "2",
           "HTTP_PORT": "0", "LOG_LEVEL": "INFO", "PYTHONPATH": str(ROOT), "DRAIN_TIMEOUT_S": "10"}
    subprocess.run(PROCESSOR + ["migrate"], env=env, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    instances = {name: start_instance(env, name, workdir) for name in ("alpha", "beta")}
    for proc in instances.values():
        stack.callback(stop_processor, proc)
    r = stack.enter_context(redis.Redis.from_url(redis_url))
    db = stack.enter_context(psycopg.connect(db_url, autocommit=True))
    deadline = time.monotonic() + 60
    while not _group_ready(r, stream):
        if time.monotonic() > deadline or any(p.poll() is not None for p in instances.values()):
            say("FAIL: the instances did not start; see their logs")
            return 1
        time.sleep(0.1)
    producer = Producer(redis_url, stream, args)
    producer.start()
    stack.callback(producer.stop.set)
    started = time.monotonic()
    say(f"\nload: {args.rate:,} fixes/s for {args.seconds:.0f}s from {args.devices} devices; "
        f"SIGKILL of instance alpha at t={args.kill_at:.0f}s\n",
        f"{'t':>5} {'produced':>9} {'stored':>9} {'lag':>6} {'pending':>8} {'on dead':>8}")
    killed_at = reclaimed_at = None
    while True:
        time.sleep(1.0 - (time.monotonic() - started) % 1.0)
        t = time.monotonic() - started
        if killed_at is None and t >= args.kill_at:
            os.killpg(instances["alpha"].pid, signal.SIGKILL)
            instances["alpha"].wait()
            killed_at = t
            say(f"{t:5.1f}  -- SIGKILL instance alpha (supervisor and shards) --")
        s = state(r, db, stream, "alpha")
        say(f"{t:5.1f} {producer.counts.total:>9,} {s['stored']:>9,} {s['lag']:>6,} {s['pending']:>8,} {s['pending_on_dead']:>8,}")
        done = not producer.is_alive() and s["lag"] == 0 and s["pending"] == 0
        if killed_at is not None and s["pending_on_dead"] == 0 and reclaimed_at is None:
            reclaimed_at = t
        if done and killed_at is not None:
            break
        if t > args.seconds + CATCH_UP_DEADLINE_S:
            say("FAIL: the survivor did not catch up in time")
            return 1
    reclaimed = [line for line in (workdir / "beta.log").read_text().splitlines() if "consumer is dead" in line]
    say(f"\nalpha's pending entries were claimed and processed by beta {reclaimed_at - killed_at:.1f}s after the kill "
        f"({len(reclaimed)} claim pass(es)); everything caught up at t={t:.1f}s, after the load ended")
    instances["alpha"] = start_instance(env, "alpha", workdir)
    stack.callback(stop_processor, instances["alpha"])
    time.sleep(2.0)  # let the restarted instance join the group before the final check
    if instances["alpha"].poll() is not None:
        say(f"FAIL: restarted alpha exited with {instances['alpha'].returncode}")
        return 1
    problems = verify(r, db, stream)
    for name, proc in instances.items():
        code = stop_processor(proc)
        if code != 0:
            problems.append(f"instance {name} exited {code} after SIGTERM")
    if problems:
        say("FAIL:", *(f"  - {p}" for p in problems))
        return 1
    say(f"PASS: {producer.counts.valid:,} fixes stored exactly once, {producer.counts.malformed:,} dead-lettered once, "
        "nothing pending, both instances stopped cleanly")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=2_000, help="fixes per second offered (default 2000)")
    parser.add_argument("--seconds", type=float, default=20.0, help="load duration (default 20)")
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--kill-at", type=float, default=5.0, help="seconds into the load (default 5)")
    parser.add_argument("--malformed", type=float, default=0.005, help="fraction of poison entries")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="a short run for the test suite (8 s, kill at 3 s)")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.kill_at, args.rate = 8.0, 3.0, 1_000
    with contextlib.ExitStack() as stack:
        try:
            return run(args, stack)
        except KeyboardInterrupt:
            say("interrupted; stopping everything")
            return 130


if __name__ == "__main__":
    sys.exit(main())
