"""Latency rows: SHARDS=2 under a steady load, receipt of each fix's commit notice minus its send time."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import orjson
import psycopg
import redis

from scripts.benchmark.base import POLL_S, READY_TIMEOUT_S, SEED, TARGET_P99_MS, BenchError, Progress, Result, fmt_int, say
from scripts.benchmark.run import ProcessorRun, wait_until
from scripts.benchmark.sandbox import Bench, Sandbox, Span
from scripts.toolkit.fleet import Fleet
from scripts.toolkit.writer import produce

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


def paced_send(box: Sandbox, fleet: Fleet, rate: float, seconds: float, sent_at: list[float] | None,
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
            produce(box.redis, box.stream, payloads, pipeline_size=len(payloads))
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
                wait_for_consumers(box, proc, shards)
                fleet = Fleet(devices, seed=SEED, start_ms=time.time_ns() // 1_000_000)
                if warmup_s > 0:
                    warm, _ = paced_send(box, fleet, rate, warmup_s, None, lambda _n: proc.sample())
                    wait_until(lambda: stored() >= warm, proc, f"the {warm} warm-up fixes to be stored")
                    say(f"  warm-up: {fmt_int(warm)} fixes in {warmup_s:g}s stored")
                base = stored()
                sent_at = [0.0] * total
                progress = Progress(label, total)

                def on_tick(sent: int) -> None:
                    proc.sample()
                    if progress.due():
                        progress.report(listener.seen, f"  (sent {fmt_int(sent)})")

                cpu0 = proc.cpu_seconds()
                span = Span(bench)
                sent, send_s = paced_send(box, fleet, rate, seconds, sent_at, on_tick)
                deadline = time.monotonic() + 15.0
                while listener.seen < sent and time.monotonic() < deadline:
                    listener.check()
                    proc.check_alive()
                    proc.sample()
                    if progress.due():
                        progress.report(listener.seen, "  (all sent)")
                    time.sleep(POLL_S)
                span.stop(lambda: stored() - base)
                count = span.fixes
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
            **span.values(proc, cpu, exit_code),
        )
        if unseen:
            raise BenchError(f"{unseen} of {sent} fixes were never seen committed within 15 s")
        if count != sent:
            raise BenchError(f"positions gained {count} rows during the measured load, expected {sent}")
        if exit_code != 0:
            raise BenchError(f"processor exited {exit_code} after SIGTERM (expected 0)\n{proc.log_tail()}")


def wait_for_consumers(box: Sandbox, proc: ProcessorRun, shards: int) -> None:
    def ready() -> bool:
        try:
            return len(box.redis.xinfo_consumers(box.stream, "processor")) >= shards
        except redis.ResponseError:
            return False

    wait_until(ready, proc, f"{shards} consumers in the group")
