"""`--profile DIR`: a cProfile of each shard and Postgres' statement statistics, per drain run.

The shards profile themselves when PROCESSOR_BENCH_PROFILE names a directory (shard/profiling.py)
and write shard-<n>.prof at their graceful exit. Their self time is grouped into stages by
module and function; a C function without a file of its own (orjson.loads, a hiredis read)
goes to the stage of the Python code that called it, as does a helper several stages share
(haversine). cProfile measures wall time, so the
event loop's own time includes waiting for Redis and Postgres; it is shown, but the shares
are of the busy time without it. A coroutine's self time beyond its inclusive time (cProfile
charging an await wrapper, such as redis' call_with_retry, with its suspension) is waiting too.
Profiling slows the shards down: a profiled run's rates are
not the Processor's.

pg_stat_statements (the throwaway Postgres preloads it with --profile) is reset for this run's
database only (another database on a shared server keeps its statistics) right before the run;
the top statements by total execution time are kept, in this run's database only,
summed over sessions by text (a statement on a temporary table has another queryid in each).
"""

from __future__ import annotations

import pstats
import re
from pathlib import Path
from typing import Any

import psycopg

from scripts.benchmark.sandbox import Bench, Sandbox
from shard.profiling import PROFILE_ENV

TOP_STATEMENTS = 12
IDLE = "event loop (incl. waiting)"
OTHER = "other"
# First match wins, on the file name or, for C functions, the function's name.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("decode and validate", ("shard/decode", "shard/batch.py", "common/contract", "orjson.loads", "msgspec")),
    ("redis reply parsing", ("redis/_parsers", "hiredis", "shard/stream.py")),
    ("COPY formatting", ("psycopg/copy", "psycopg/_copy", "psycopg/types", "psycopg_binary", "shard/writer.py",
                         "shard/staging_rows.py", "_struct.Struct")),
    ("derived state", ("shard/devices/",)),
    ("geofences", ("shard/geo", "shapely", "numpy")),
    ("Redis client (commands, sending)", ("/redis/", "asyncio/streams.py", "common/redis_client")),
    ("Postgres client (statements, sending, results)", ("/psycopg/",)),
    (IDLE, ("asyncio/", "uvloop")),
)
TOP_FUNCTIONS = 3
# Helpers several stages call (odometer and geofences both measure distances): the caller's stage.
SHARED_HELPERS = ("haversine",)
_STATEMENTS = """
SELECT s.query, sum(s.calls)::bigint, sum(s.total_exec_time), sum(s.rows)::bigint
FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
WHERE d.datname = current_database()
  AND s.query NOT ILIKE '%%pg_stat_statements%%' AND s.query <> 'select count(*) from positions'
GROUP BY s.query
ORDER BY 3 DESC
LIMIT %s
"""


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower().replace(",", "")).strip("-")


class Profile:
    """Set up before the consumers start (after migrations and set-up), collected after they stopped."""

    def __init__(self, bench: Bench, box: Sandbox, label: str, python: bool = True) -> None:
        self.box = box
        self.dir: Path | None = None
        self.statements = False
        if bench.profile_dir is None:
            return
        self.dir = bench.profile_dir / f"{bench.serial:02d}-{_slug(label)}"
        self.dir.mkdir(parents=True, exist_ok=True)
        if python:
            box.env[PROFILE_ENV] = str(self.dir)
        self.statements = bench.statements_tracked
        if self.statements:
            with psycopg.connect(box.database_url, autocommit=True) as db:
                db.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                # userid 0 and queryid 0 are wildcards: every entry of this database, none of another's.
                db.execute("SELECT pg_stat_statements_reset(0::oid, d.oid, 0::bigint)"
                           " FROM pg_database d WHERE d.datname = current_database()")

    def collect(self, result: Any) -> None:
        """Adds `profile` to the result's values: stages (from the .prof files) and statements."""
        if self.dir is None:
            return
        out: dict[str, Any] = {"dir": str(self.dir)}
        files = sorted(self.dir.glob("shard-*.prof"))
        if files:
            out["stages"] = stage_summary(files, result.values.get("records") or 0)
        if self.statements:
            with psycopg.connect(self.box.database_url, autocommit=True) as db:
                rows = db.execute(_STATEMENTS, (TOP_STATEMENTS,)).fetchall()
            out["statements"] = [
                {"query": " ".join(q.split()), "calls": calls, "total_ms": round(total, 1),
                 "mean_us": round(1000 * total / max(calls, 1), 1), "rows": n}
                for q, calls, total, n in rows
            ]
        result.values["profile"] = out


def _stage_of_text(text: str) -> str | None:
    for stage, needles in STAGES:
        if any(needle in text for needle in needles):
            return stage
    return None


def stage_summary(files: list[Path], fixes: int) -> dict[str, Any]:
    """Self time of all shards by stage: seconds, µs per fix, share of the busy time."""
    stats = pstats.Stats(*(str(f) for f in files)).stats  # type: ignore[attr-defined]
    seconds: dict[str, float] = {}
    functions: dict[str, list[tuple[float, str]]] = {}
    memo: dict[Any, dict[str, float]] = {}
    for (file, line, func), (_cc, _nc, tottime, cumtime, _callers) in stats.items():
        if tottime > cumtime:  # a coroutine charged with time it spent suspended: that part is waiting
            seconds[IDLE] = seconds.get(IDLE, 0.0) + tottime - cumtime
            tottime = cumtime
        for stage, share in _shares((file, line, func), stats, memo).items():
            seconds[stage] = seconds.get(stage, 0.0) + tottime * share
            where = func if file == "~" else f"{'/'.join(Path(file).parts[-2:])}:{line} {func}"
            functions.setdefault(stage, []).append((tottime * share, where))
    busy = sum(v for k, v in seconds.items() if k != IDLE) or 1e-9
    order = [name for name, _ in STAGES if name != IDLE] + [OTHER, IDLE]
    return {
        "shards": len(files),
        "busy_s": round(busy, 3),
        "rows": [
            {"stage": name, "s": round(seconds[name], 3),
             "us_per_fix": round(1e6 * seconds[name] / fixes, 2) if fixes else None,
             "share": None if name == IDLE else round(seconds[name] / busy, 3),
             "largest": [f"{where} ({t:.3f} s)" for t, where in sorted(functions.get(name, []), reverse=True)[:TOP_FUNCTIONS]]}
            for name in order if name in seconds
        ],
    }


def _shares(key: tuple[str, int, str], stats: dict[Any, Any], memo: dict[Any, dict[str, float]]) -> dict[str, float]:
    """{stage: share} of one function's self time: its file's stage, else (C functions, shared
    helpers) its callers' stages, weighted by the time each call edge accounts for."""
    if key in memo:
        return memo[key]
    file, _line, func = key
    shared = any(helper in func for helper in SHARED_HELPERS)
    named = None if shared else _stage_of_text(file if file != "~" else func)
    callers = stats[key][4] if key in stats else {}
    if named is not None or not callers or (file != "~" and not shared):
        memo[key] = {named or OTHER: 1.0}
        return memo[key]
    memo[key] = {OTHER: 1.0}  # a recursive cycle ends here
    weights: dict[str, float] = {}
    for caller, edge in callers.items():
        for stage, share in _shares(caller, stats, memo).items():
            weights[stage] = weights.get(stage, 0.0) + edge[2] * share
    total = sum(weights.values())
    memo[key] = {stage: w / total for stage, w in weights.items()} if total > 0 else {OTHER: 1.0}
    return memo[key]


def render_profile(label: str, profile: dict[str, Any]) -> list[str]:
    """Markdown lines: the stages table and the top statements of one run."""
    out = [f"#### Profile: {label}", "", f"Files: `{profile['dir']}`", ""]
    stages = profile.get("stages")
    if stages:
        out += [f"Processor ({stages['shards']} shard(s), cProfile self time; busy {stages['busy_s']:.2f} s):", "",
                "| stage | s | µs per fix | share of busy | largest self times |", "|---|---:|---:|---:|---|"]
        for row in stages["rows"]:
            share = "" if row["share"] is None else f"{row['share']:.0%}"
            per_fix = "" if row["us_per_fix"] is None else f"{row['us_per_fix']:.2f}"
            largest = "; ".join(row["largest"]).replace("|", "/")
            out.append(f"| {row['stage']} | {row['s']:.2f} | {per_fix} | {share} | {largest} |")
        out.append("")
    statements = profile.get("statements")
    if statements is not None:
        out += ["Postgres, top statements by total execution time (pg_stat_statements; a COPY's time "
                "runs while the client streams its rows):", "",
                "| calls | total ms | mean µs | rows | statement |", "|---:|---:|---:|---:|---|"]
        for s in statements:
            query = s["query"] if len(s["query"]) <= 110 else s["query"][:107] + "..."
            out.append(f"| {s['calls']:,} | {s['total_ms']:,.1f} | {s['mean_us']:,.1f} | {s['rows']:,} | "
                       f"`{query.replace('|', '/')}` |")
        out.append("")
    return out
