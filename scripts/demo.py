#!/usr/bin/env python3
"""`make demo`: a simulated fleet, with geofences, through a real `processor run`; then proof that nothing was lost.

Uses REDIS_URL / DATABASE_URL when they answer, else the usual local servers, else throwaway
ones (scripts/services.py). On a reused server it touches only its own stream keys
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
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import psycopg  # noqa: E402
import redis  # noqa: E402

from common.config import redact_url  # noqa: E402
from scripts import simulate  # noqa: E402
from scripts.services import (  # noqa: E402
    ThrowawayPostgres,
    ThrowawayRedis,
    missing_binaries,
    redis_reachable,
    with_database,
)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/processor_demo"
GROUP, SHARDS, SETTLE_DEADLINE_S, STOP_WAIT_S = "processor", 2, 60.0, 30.0
PROCESSOR = [sys.executable, "-m", "common.cli"]


class Stopped(Exception):  # raised in the producer's progress callback to end simulate.steady early
    pass


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
    password = urlsplit(url).password
    return None, why.replace(password, "***") if password else why


def provide_services(stack: contextlib.ExitStack, tag: str, keep: bool) -> tuple[str, str, list[str]]:
    """(redis_url, database_url of a fresh demo database, description lines); exits 1 if impossible."""
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


def tail(path: Path, lines: int = 5) -> list[str]:
    return ["  " + line for line in path.read_text(errors="replace").splitlines()[-lines:]]


def guarded(what: str, fn, *args) -> None:  # type: ignore[no-untyped-def]
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - cleanup goes on with the next step
        say(f"warning: could not {what}: {type(exc).__name__}: {exc}", err=True)


class Producer(threading.Thread):
    def __init__(self, url: str, stream: str, args: argparse.Namespace) -> None:
        super().__init__(name="producer", daemon=True)
        self.url, self.stream, self.args = url, stream, args
        self.counts, self.error, self.stop = simulate.Counts(), None, threading.Event()
        self.finished_at: float | None = None

    def run(self) -> None:
        a = self.args
        try:
            with redis.Redis.from_url(self.url) as client:
                simulate.steady(client, self.stream, a.rate, a.seconds, devices=a.devices, seed=a.seed,
                                malformed_fraction=a.malformed, progress=self.progress)
        except Stopped:
            pass
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
        finally:
            self.finished_at = time.monotonic()

    def progress(self, counts: simulate.Counts) -> None:
        self.counts = counts
        if self.stop.is_set():
            raise Stopped


def stop_processor(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, a bounded wait for the drain, then SIGKILL of its whole session."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            say(f"processor did not stop within {STOP_WAIT_S:.0f}s; killing it", err=True)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def exit_status(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"


def snapshot(r: redis.Redis, db: psycopg.Connection, stream: str, dlq: str) -> dict:
    try:
        group = next((g for g in r.xinfo_groups(stream) if g["name"] == GROUP.encode()), {})
    except redis.ResponseError:  # no stream yet
        group = {}
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
    popen = dict(env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                 start_new_session=True)  # our Ctrl-C must not reach it: we stop it with SIGTERM ourselves
    if (code := subprocess.run([*PROCESSOR, "migrate"], **popen).returncode) != 0:
        say(f"processor migrate failed (exit {code}):", *tail(log_path), err=True)
        return 1
    geojson = workdir / "geofences.geojson"
    geojson.write_bytes(orjson.dumps(demo_geofences(args)))
    if (code := subprocess.run([*PROCESSOR, "geofences", "import", str(geojson)], **popen).returncode) != 0:
        say(f"processor geofences import failed (exit {code}):", *tail(log_path), err=True)
        return 1
    proc = subprocess.Popen([*PROCESSOR, "run"], **popen)
    stack.callback(lambda: proc.returncode is None and say(f"processor stopped ({exit_status(stop_processor(proc))})"))
    r = stack.enter_context(redis.Redis.from_url(redis_url, socket_timeout=10))
    db = stack.enter_context(psycopg.connect(db_url, autocommit=True))
    deadline = time.monotonic() + 60
    while snapshot(r, db, stream, dlq)["consumers"] < SHARDS:  # wait for both shards to join the group
        if proc.poll() is not None or time.monotonic() > deadline:
            state = "not ready after 60s" if proc.poll() is None else exit_status(proc.returncode)
            say(f"processor run did not start ({state}):", *tail(log_path), err=True)
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
            say("", f"processor exited early ({exit_status(proc.returncode)}):", *tail(log_path), err=True)
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
    starts = list(simulate.Fleet(args.devices, seed=args.seed).fixes(args.devices))[: max(1, args.devices // 5)]
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
