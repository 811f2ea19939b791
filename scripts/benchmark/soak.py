"""Soak (`--only soak`): a steady load for --soak-minutes with stream trimming, shard kills and retention.

SHARDS=2, STREAM_RETENTION_MS=60000, POSITIONS_RETENTION_DAYS chosen by the plan (soak_load.py)
so that a partition holding stored fixes falls behind the horizon during the run, HTTP_PORT
on a free port. The load runs at --rate; every --kill-every-s one shard (0, 1, 0, ...) gets
SIGKILL; every --sample-every-s a sample (soak_watch.py) is printed. Latency is measured as in
the latency phase (commit NOTIFY) over a window after the warm-up and one at the end; no
shard is killed inside them. Then the load stops, the bench waits until the group has read
everything and nothing is pending, and sends SIGTERM (exit 0 expected).

Exact accounting: a bench-only statement-level AFTER INSERT trigger with a transition table
on `positions` appends (hour of ts, rows inserted) to `bench_stored` in the inserting
transaction, so the tally counts every row that was ever committed, once, including the
rows of partitions dropped later. produced = stored + expired + dead-lettered must hold
exactly (expired from processor_fixes_expired_total when the Processor has it; the plan
keeps every fix ahead of the horizon, so it should be 0). Cross-check: per hour of ts, the
rows still in `positions` equal the tally (hour kept) or are 0 (its partition was dropped).
"""

from __future__ import annotations

import argparse
import calendar
import math
import time
from datetime import datetime
from typing import Any

import psycopg

from scripts.benchmark.base import READY_TIMEOUT_S, SEED, BenchError, Result, fmt_int, say
from scripts.benchmark.latency import _COMMIT_TRIGGER, CommitListener, percentile, wait_for_consumers
from scripts.benchmark.run import ProcessorRun, wait_until
from scripts.benchmark.sandbox import Bench, Span
from scripts.benchmark.soak_layout import Switch, lay_out_days
from scripts.benchmark.soak_load import (
    HOUR_MS,
    RETENTION_DAYS,
    STREAM_RETENTION_MS,
    Plan,
    Sent,
    Windows,
    paced_load,
    probe_settings,
)
from scripts.benchmark.soak_report import progress_line, verdicts
from scripts.benchmark.soak_watch import Killer, Observer, Sample, wait_settled
from scripts.toolkit.fleet import Fleet
from scripts.toolkit.services import free_port

SHARDS = 2
SETTLE_TIMEOUT_S = 180.0
KILL_SETTLE_S = 10.0  # no kill this long before a latency window or around the restart (less in short runs)
EXPIRED = "processor_fixes_expired_total"
PROCESSED = "processor_entries_processed_total"

_STORED_TRIGGER = """
CREATE TABLE bench_stored (hour timestamp NOT NULL, n bigint NOT NULL);
CREATE FUNCTION bench_count_stored() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
BEGIN
    INSERT INTO bench_stored (hour, n)
    SELECT date_trunc('hour', ts AT TIME ZONE 'UTC'), count(*) FROM new_rows GROUP BY 1;
    RETURN NULL;
END $$;
CREATE TRIGGER bench_stored AFTER INSERT ON positions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench_count_stored();
"""


def soak_label(args: argparse.Namespace) -> str:
    return (f"soak, SHARDS={SHARDS}, {fmt_int(args.rate)}/s x {args.soak_minutes:g} min, "
            f"kill every {args.kill_every_s:g}s")


def run_soak(bench: Bench, result: Result, args: argparse.Namespace) -> None:
    """The soak, filled into `result`; raises BenchError when it fails."""
    load_s = args.soak_minutes * 60.0
    windows = Windows.make(load_s, min(10.0, load_s / 10), args.rate)
    values = result.values
    values.update(shards=SHARDS, offered_per_s=args.rate, load_s=load_s, devices=args.devices,
                  kill_every_s=args.kill_every_s, sample_every_s=args.sample_every_s,
                  stream_retention_ms=STREAM_RETENTION_MS, windows_s=[windows.first, windows.last], samples=[])
    say(f"\n{result.label}")
    with bench.sandbox(result.label, SHARDS) as box:
        port = free_port()
        box.env.update(HTTP_PORT=str(port), STREAM_RETENTION_MS=str(STREAM_RETENTION_MS))
        knows = values["processor_knows"] = probe_settings(box.env)
        bench.migrate(box)
        with psycopg.connect(box.database_url, autocommit=True) as db:
            db.execute(_COMMIT_TRIGGER)
            db.execute(_STORED_TRIGGER)
        plan = Plan.make(load_s, knows["POSITIONS_RETENTION_DAYS"])
        env2 = dict(box.env)
        if plan.retention:
            values["partitions_laid_out"] = lay_out_days(box.database_url, plan.first_day)
            if not values["partitions_laid_out"]:
                say("  NOTE: positions is not partitioned: no retention phase")
                plan = Plan.make(load_s, False)
            else:
                box.env["POSITIONS_RETENTION_DAYS"] = "0"
                env2["POSITIONS_RETENTION_DAYS"] = str(RETENTION_DAYS)
        if not knows["STREAM_RETENTION_MS"]:
            say("  NOTE: this Processor does not read STREAM_RETENTION_MS: the stream is not trimmed")
        say(f"  plan: {plan.describe()}")
        listener = CommitListener(box.database_url, windows.capacity)
        listener.start()
        runs: list[ProcessorRun] = []
        observer: Observer | None = None
        samples: list[Sample] = []
        cpu: dict[str, float] = {}
        exit_codes: list[int] = []

        def start(env: dict[str, str]) -> ProcessorRun:
            runs.append(ProcessorRun(env, box.workdir / f"processor-{len(runs) + 1}.log", SHARDS))
            return runs[-1]

        def cpu_of(proc: ProcessorRun, before: dict[str, float]) -> None:
            for k, v in proc.cpu_seconds().items():
                cpu[f"run {len(runs)}: {k}"] = v - before.get(k, 0.0)

        def on_stop(proc: ProcessorRun) -> None:
            assert observer is not None
            observer.carry_counters()
            cpu_of(proc, cpu0)
            cpu0.clear()

        try:
            listener.ready.wait(READY_TIMEOUT_S)
            listener.check()
            proc = start(box.env)
            observer = Observer(box, proc, port)
            wait_for_consumers(box, proc, SHARDS)
            wait_until(lambda: observer.metrics() is not None, proc, f"/metrics on port {port}")
            settle = min(KILL_SETTLE_S, windows.width)
            switch = Switch(plan.switch_at_s, env2, start, on_stop, settle)
            killer = Killer(observer, args.kill_every_s, lambda t: windows.quiet(t, settle) and switch.quiet(t), SHARDS)
            next_sample = 0.0
            cpu0 = proc.cpu_seconds()
            span = Span(bench)

            def on_tick(t: float, sent: int) -> None:
                nonlocal next_sample, proc
                new = switch.tick(t, proc)
                if switch.state == "stopping" and not switch.announced:
                    switch.announced = True
                    say(f"  [soak] {t:7.1f}s  SIGTERM: restarting the processor with "
                        f"POSITIONS_RETENTION_DAYS={RETENTION_DAYS}")
                if new is not None:
                    proc = observer.proc = new
                    say(f"  [soak] {t:7.1f}s  processor exited {switch.exit_code}; started again (pid {new.pid})")
                if switch.state == "stopping":
                    return
                kill = killer.tick(t, time.monotonic())
                if kill is not None:
                    say(f"  [soak] {t:7.1f}s  SIGKILL shard {kill.slot} (pid {kill.pid})")
                if t >= next_sample:
                    next_sample += args.sample_every_s
                    samples.append(observer.sample(t, sent))
                    values["samples"].append(samples[-1].as_dict())  # kept if the run fails later
                    say(progress_line(samples[-1], killer, observer))
                    listener.check()
                    proc.check_alive()

            sent, send_s = paced_load(box.redis, box.stream, Fleet(args.devices, seed=SEED), plan, windows,
                                      args.rate, on_tick)
            if switch.state == "stopping":
                raise BenchError("the load ended while the processor was being restarted: run longer")
            say(f"  load ended: {fmt_int(sent.total)} fixes in {send_s:.1f}s; waiting until everything is processed")
            settled = wait_settled(box, proc, SETTLE_TIMEOUT_S)
            deadline = time.monotonic() + 30
            while any(k.restarted_after_s is None for k in killer.kills) and time.monotonic() < deadline:
                killer.tick(time.time() - plan.wall0, time.monotonic(), kill=False)
                time.sleep(0.1)
            final = observer.sample(time.time() - plan.wall0, sent.total)
            samples.append(final)
            say(progress_line(final, killer, observer) + "  (settled)")
            span.stop(final.stored)
            cpu_of(proc, cpu0)
            say("  stopping the processor (SIGTERM)")
            exit_codes = [c for c in (switch.exit_code, proc.stop()) if c is not None]
        finally:
            listener.close()
            if observer is not None:
                observer.close()
            for run in runs:
                run.close()
        listener.check()
        for run in runs[:-1]:
            proc.memory.update(run.memory)
        accounting, tally = account(box.database_url, box.redis.xlen(box.env["DLQ_KEY"]), sent, final, settled)
        values.update(
            plan=plan.as_dict(),
            plan_text=plan.describe(),
            restart=switch.events,
            sent=sent.total,
            achieved_per_s=round(sent.total / send_s, 1),
            max_ts_ahead_of_clock_s=round(sent.max_ahead_s, 3),
            min_ts_ahead_of_horizon_s=None if sent.min_ahead_of_horizon_s == math.inf
            else round(sent.min_ahead_of_horizon_s, 1),
            latency=[window_latency(listener, sent, w) for w in (0, 1)],
            kills=killer.as_list(),
            kills_skipped_at_s=killer.skipped,
            partitions_dropped=dropped_partitions(observer, tally),
            partitions_seen=len(observer.partitions_seen),
            metrics_scrape_failures=observer.metrics_errors,
            accounting=accounting,
            samples=[s.as_dict() for s in samples],
            rows_stored=accounting["stored"],
            exit_codes=exit_codes,
            **span.values(proc, cpu, exit_codes[-1]),
        )
        values["exit_code"] = max(exit_codes, key=abs)
        values["verdicts"] = verdicts(values)
        failures = [k for k, v in values["verdicts"].items() if v.get("hard") and v["ok"] is False]
        if values["exit_code"] != 0:
            raise BenchError(f"processor exited {exit_codes} after SIGTERM (expected 0)\n{proc.log_tail()}")
        if failures:
            raise BenchError("soak check failed: " + "; ".join(f"{k}: {values['verdicts'][k]['detail']}" for k in failures))


def window_latency(listener: CommitListener, sent: Sent, window: int) -> dict[str, Any]:
    seqs = [i for i, w in enumerate(sent.window_of) if w == window]
    lat = sorted((listener.received[i] - sent.sent_at[i]) * 1000.0 for i in seqs if listener.received[i])
    return {
        "fixes": len(seqs), "not_seen": len(seqs) - len(lat),
        "p50_ms": round(percentile(lat, 50), 2) if lat else None,
        "p99_ms": round(percentile(lat, 99), 2) if lat else None,
        "max_ms": round(lat[-1], 2) if lat else None,
    }


def account(database_url: str, dead_lettered: int, sent: Sent, final: Sample,
            settled: dict[str, Any]) -> tuple[dict[str, Any], dict[int, int]]:
    """produced = stored + expired + dead-lettered, and where the stored rows are now."""
    with psycopg.connect(database_url, autocommit=True) as db:
        tally = dict(db.execute("select hour, sum(n) from bench_stored group by 1").fetchall())
        now = dict(db.execute("select date_trunc('hour', ts AT TIME ZONE 'UTC'), count(*) from positions group by 1")
                   .fetchall())
    tally = {_epoch_hour(h): int(n) for h, n in tally.items()}
    now = {_epoch_hour(h): int(n) for h, n in now.items()}
    stored = sum(tally.values())
    metrics = final.metrics or {}
    expired = metrics.get(EXPIRED)
    kept = {h: n for h, n in tally.items() if now.get(h) == n}
    gone = {h: n for h, n in tally.items() if now.get(h, 0) == 0}
    odd = sorted(h for h in set(tally) | set(now) if h not in kept and h not in gone)
    unstored = {h: n - tally.get(h, 0) for h, n in sent.by_hour.items() if n != tally.get(h, 0)}
    return {
        "produced": sent.total,
        "stored": stored,
        "expired": None if expired is None else int(expired),
        "expired_metric_present": expired is not None,
        "dead_lettered": dead_lettered,
        "exact": sent.total == stored + int(expired or 0) + dead_lettered,
        "processed_metric": None if PROCESSED not in metrics else int(metrics[PROCESSED]),
        "rows_in_positions": sum(now.values()),
        "rows_in_dropped_partitions": sum(gone.values()),
        "hours_kept": len(kept),
        "hours_dropped": sorted(_hour_text(h) for h in gone),
        "hours_inconsistent": [_hour_text(h) for h in odd],
        "not_stored_by_hour": {_hour_text(h): n for h, n in sorted(unstored.items())},
        "pending": settled.get("pending"),
        "lag": settled.get("lag"),
        "settled": not settled.get("timed_out", False),
    }, tally


def _epoch_hour(naive_utc: datetime) -> int:
    return calendar.timegm(naive_utc.timetuple()) // 3600


def _hour_text(h: int) -> str:
    return time.strftime("%Y-%m-%d %H:00", time.gmtime(h * 3600))


def dropped_partitions(observer: Observer, tally: dict[int, int]) -> dict[str, dict[str, Any]]:
    """Each partition seen during the run and gone at its end: its bound, when it went, the stored rows it took."""
    out = {}
    for name, gone_at in observer.dropped.items():
        bound = observer.partitions_seen[name]
        low, high = _bounds(bound)
        rows = sum(n for h, n in tally.items() if (low is None or h * 3600 >= low) and (high is None or h * 3600 < high))
        out[name] = {"bound": bound, "gone_at_s": round(gone_at, 1), "rows": rows}
    return out


def _bounds(bound: str) -> tuple[float | None, float | None]:
    """Epoch seconds of 'FOR VALUES FROM (x) TO (y)' (None: MINVALUE/MAXVALUE)."""

    def one(text: str) -> float | None:
        text = text.strip().strip("'")
        return None if text in ("MINVALUE", "MAXVALUE") else datetime.fromisoformat(text).timestamp()

    inner = bound.split("FROM (", 1)[1]
    low, high = inner.split(") TO (", 1)
    return one(low), one(high.rstrip(")"))
