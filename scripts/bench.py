"""Benchmark of the Processor: drain throughput and end-to-end latency.

    .venv/bin/python -m scripts.bench            # full run (a few minutes); or `make bench`
    .venv/bin/python -m scripts.bench --quick    # smoke test (backlog 20,000, latency 5 s)
    .venv/bin/python -m scripts.bench --only drain --shards 1,2,4 --json bench.json
    .venv/bin/python -m scripts.bench --only soak --json soak.json   # 20 minutes
    .venv/bin/python -m scripts.bench --only peer --rounds 3          # the Processor beside the peer
    .venv/bin/python -m scripts.bench --only growth                   # cost growth: devices, geofences
    .venv/bin/python -m scripts.bench --only drain --shards 2 --profile prof/   # where the time goes

Run it from the repository root. The code is the package scripts/benchmark/.

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
soak      Only with `--only soak` (scripts/benchmark/soak.py): SHARDS=2 and STREAM_RETENTION_MS=60000
          under a steady --rate for --soak-minutes (default 20), a shard SIGKILLed every
          --kill-every-s (180), a sample every --sample-every-s (30): Redis used_memory, XLEN,
          each child's VmRSS, the /metrics counters, the partitions of positions. Retention:
          daily partitions laid out for the last 4 days, POSITIONS_RETENTION_DAYS=0 while device
          time sweeps them fast, then a restart with POSITIONS_RETENTION_DAYS=1 at a third of the
          run whose maintenance pass drops them under load (soak_load.py says why). A bench-only
          trigger counts every row inserted, so produced = stored + expired + dead-lettered is
          exact. Reported: that sum, p50/p99 over the first and the last 2 minutes, flat
          verdicts, the time series; exit codes 0 after both SIGTERMs.
peer      Only with `--only peer` (scripts/benchmark/versus.py): --rounds rounds (default 3), each
          draining the same backlog with the Processor at SHARDS=2, with the best-effort peer
          (scripts/benchmark/peer.py: two consumers, XREADGROUP 1,000, orjson, binary COPY into
          a staging table, INSERT ... ON CONFLICT DO NOTHING, last_position upsert, XACK after
          commit; nothing else) and with the Processor at SHARDS=1, each on a fresh database
          and stream. Rates from the first entry read to the last row stored. Reported per round
          and as medians: fixes/s, Processor/peer (target >= 0.85), SHARDS=1 (target >= 40,000/s).
growth    Only with `--only growth` (scripts/benchmark/growth.py): the same --backlog drained at
          --growth-shards (default 2) from 2,000, 20,000 and 100,000 devices, and from 2,000
          devices with 0, 1,000 and 10,000 geofences, cases interleaved over --rounds; one
          Markdown table of medians: fixes/s and shard CPU µs per fix (from /proc, start-up
          apart), with ratios to 2,000 devices without geofences (targets: 100,000 devices
          within 20 %, 10,000 geofences within 25 %).
--profile DIR  For every Processor drain of the run: each shard under cProfile (benchmark-only
          PROCESSOR_BENCH_PROFILE, shard/profiling.py) writing DIR/<nn-run>/shard-<n>.prof, its
          self time summarised per stage (decode and validate, redis reply parsing, COPY
          formatting, derived state, geofences, client code, other); and the throwaway Postgres
          preloads pg_stat_statements, reset before the run, top statements printed after
          (calls, total ms, mean µs, rows). Profiled runs are slower: compare stages, not rates.

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
`drain_scenarios()` (scripts/benchmark/drain.py) lists the drain rows. A scenario may carry
a `setup(sandbox)` callback that runs after the migrations and before the backlog, e.g. a
geofence row:

    DrainScenario("drain, SHARDS=2, 1,000 geofences", shards=2, setup=import_geofences,
                  target=60_000)

where `import_geofences(sandbox)` writes rows through `sandbox.database_url`.

Exit status: 0 when every phase ran and every correctness check held (targets that are
missed are reported, not failed); 1 when a phase failed; 2 usage; 130 on Ctrl-C.
"""

import sys

from scripts.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
