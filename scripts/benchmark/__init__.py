"""The Processor benchmark, run as `python -m scripts.bench` (see scripts/bench.py for what it measures).

base        settings, targets, errors, results and progress lines
machine     CPU use of the whole machine
run         `processor run` under measurement (CPU, peak RSS of each shard)
sandbox     the servers and one fresh database and stream per phase
drain       drain throughput rows and their scenarios
latency     end-to-end latency under a steady load
membership  cost of the geofence membership test
decode_micro  µs per entry of the shards' decoding (`python -m scripts.benchmark.decode_micro`)
pg_cost     Postgres CPU per fix and statement, the Processor's beside the peer's (`python -m scripts.benchmark.pg_cost`)
peer        the best-effort peer consumer (a process of its own); versus: the Processor beside it
growth      cost growth with active devices and geofences
profiles    --profile: the shards' cProfile by stage, pg_stat_statements
report      the Markdown table, "where the time goes" and the JSON document
soak        the soak (`--only soak`): soak_load (plan, device clock, sender), soak_layout
            (past partitions, the retention restart), soak_watch (samples, kills),
            soak_report (verdicts, rows, time series)
cli         options and the order of the phases
"""
