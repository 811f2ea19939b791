"""The Processor benchmark, run as `python -m scripts.bench` (see scripts/bench.py for what it measures).

base        settings, targets, errors, results and progress lines
machine     CPU use of the whole machine
run         `processor run` under measurement (CPU, peak RSS of each shard)
sandbox     the servers and one fresh database and stream per phase
drain       drain throughput rows and their scenarios
latency     end-to-end latency under a steady load
membership  cost of the geofence membership test
report      the Markdown table, "where the time goes" and the JSON document
cli         options and the order of the phases
"""
