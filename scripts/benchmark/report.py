"""The report: the Markdown table, where the CPU time went, and the JSON document."""

from __future__ import annotations

import argparse
import os
from typing import Any

from scripts.benchmark.base import PASSED_THROUGH, TARGET_DRAIN, TARGET_P99_MS, TARGET_RSS_MB, Result, fmt_int
from scripts.benchmark.growth import render_growth
from scripts.benchmark.profiles import render_profile
from scripts.benchmark.soak_report import soak_rows, soak_series
from scripts.benchmark.versus import render_versus


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def _met(ok: bool | None) -> str:
    return "" if ok is None else ("yes" if ok else "**NO**")


def render_table(cores: int, model: str, results: list[Result]) -> str:
    rows: list[tuple[str, str, str, str]] = []
    for r in results:
        v = r.values
        if r.kind == "drain" and "records_per_s" in v:
            target = v.get("target_per_s")
            rss = max(v["peak_rss_mb_per_shard"] or [0.0])
            rows += [
                (f"{r.label}: throughput", f"{fmt_int(v['records_per_s'])} records/s",
                 f"≥ {fmt_int(target)}/s" if target else "", _met(v["records_per_s"] >= target if target else None)),
                (f"{r.label}: after start-up", f"{fmt_int(v.get('drain_per_s', 0))} records/s "
                 f"(first entry read to last row stored)", "", ""),
                (f"{r.label}: wall time", f"{v['wall_s']:.2f} s ({v['startup_s']:.2f} s start-up) "
                 f"for {fmt_int(v['records'])}", "", ""),
                (f"{r.label}: processor CPU", f"{v['cpu_s']:.1f} s ({v['cpu_s'] / v['wall_s']:.2f} cores)", "", ""),
                (f"{r.label}: peak RSS per shard", " / ".join(f"{x:.0f}" for x in v["peak_rss_mb_per_shard"]) + " MB",
                 f"≤ {TARGET_RSS_MB:.0f} MB", _met(rss <= TARGET_RSS_MB)),
                (f"{r.label}: exit after SIGTERM", str(v["exit_code"]), "0", _met(v["exit_code"] == 0)),
            ]
        elif r.kind == "latency" and "p99_ms" in v:
            rss = max(v["peak_rss_mb_per_shard"] or [0.0])
            rows += [
                (f"{r.label}: p50", _ms(v["p50_ms"]), "", ""),
                (f"{r.label}: p99", _ms(v["p99_ms"]), f"≤ {TARGET_P99_MS:.0f} ms",
                 _met(v["p99_ms"] is not None and v["p99_ms"] <= TARGET_P99_MS)),
                (f"{r.label}: max", _ms(v["max_ms"]), "", ""),
                (f"{r.label}: achieved rate", f"{fmt_int(v['achieved_per_s'])}/s ({fmt_int(v['sent'])} sent)",
                 f"{fmt_int(v['offered_per_s'])}/s offered", ""),
                (f"{r.label}: fixes not seen committed", str(v["not_seen"]), "0", _met(v["not_seen"] == 0)),
                (f"{r.label}: processor CPU", f"{v['cpu_s']:.1f} s ({v['cpu_s'] / v['machine']['span_s']:.2f} cores)",
                 "", ""),
                (f"{r.label}: peak RSS per shard", " / ".join(f"{x:.0f}" for x in v["peak_rss_mb_per_shard"]) + " MB",
                 f"≤ {TARGET_RSS_MB:.0f} MB", _met(rss <= TARGET_RSS_MB)),
                (f"{r.label}: exit after SIGTERM", str(v["exit_code"]), "0", _met(v["exit_code"] == 0)),
            ]
        elif r.kind == "membership":
            rows += [
                (f"{r.label}: {n} geofences", f"{v[key]:.2f} µs per fix "
                 f"({v[key.replace('us_per_fix', 'inside_share')]:.0%} of fixes inside one)", "", "")
                for key in sorted((k for k in v if k.startswith("us_per_fix_")), key=lambda k: int(k.rsplit("_", 1)[1]))
                for n in [f"{int(key.rsplit('_', 1)[1]):,}"]
            ]
        elif r.kind == "soak":
            rows += soak_rows(r.label, v)
        if r.error:
            rows.append((f"{r.label}: FAILED", r.error.splitlines()[0][:160].replace("|", "/"), "", "**NO**"))
    head = f"{cores} cores, {model}"
    lines = [f"| {head} | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def where_time_goes(results: list[Result]) -> list[str]:
    notes = []
    for r in results:
        v = r.values
        if "cpu_s" not in v:
            continue
        span = v["machine"]["span_s"]
        parts = [f"{'peer' if v.get('side') == 'peer' else 'processor'} {v['cpu_s']:.1f} s"]
        if v.get("postgres_cpu_s") is not None:
            parts.append(f"Postgres {v['postgres_cpu_s']:.1f} s")
        parts.append(f"Redis {v['redis_cpu_s']:.1f} s")
        m = v["machine"]
        parts.append(f"bench itself {m['bench_process_cpu_s']:.1f} s")
        b = v.get("batches")
        batches = ""
        if b and b["batches"]:
            per_batch_ms = 1000.0 * v["cpu_s"] / b["batches"]
            batches = (f" {fmt_int(b['batches'])} batches of {b['mean_batch']:g} fixes on average "
                       f"({per_batch_ms:.2f} ms processor CPU per batch, {1e6 * v['cpu_s'] / max(1, v.get('records') or v.get('rows_stored') or 1):.0f} µs per fix).")
        if v.get("postgres_cpu_s") is not None:
            known = v["cpu_s"] + v["postgres_cpu_s"] + v["redis_cpu_s"] + m["bench_process_cpu_s"]
            other = max(0.0, m["busy_cores"] * span - known)
            flag = " (**other load on the machine: this row is not representative**)" if other > 0.25 * span else ""
            parts.append(f"everything else {other:.1f} s{flag}")
        notes.append(f"- {r.label}: {', '.join(parts)} over {span:.1f} s. Machine: {m['busy_cores']:.2f} of "
                     f"{os.cpu_count()} cores busy (user {m['user_cores']:.2f}, system {m['system_cores']:.2f}, "
                     f"softirq {m['irq_softirq_cores']:.2f}, steal {m['steal_cores']:.2f}), iowait {m['iowait_cores']:.2f}."
                     + batches)
    return notes


def render_report(args: argparse.Namespace, cores: int, model: str, background: float | None,
                  servers: dict[str, str], results: list[Result]) -> str:
    """The Markdown report printed at the end (not yet scrubbed of passwords)."""
    title = f"## Processor benchmark: {cores} cores, {model}"
    # growth sets the devices of each case itself (its table gives them), whatever --devices says
    devices = "" if args.only == "growth" else f" / {fmt_int(args.devices)} devices"
    settings = (f"backlog {fmt_int(args.backlog)} fixes{devices}; latency "
                f"{fmt_int(args.rate)}/s x {args.latency_seconds:g} s" + ("; --quick" if args.quick else ""))
    if args.only == "soak":
        settings = (f"soak: {fmt_int(args.rate)} fixes/s from {fmt_int(args.devices)} devices for "
                    f"{args.soak_minutes:g} min, a shard SIGKILLed every {args.kill_every_s:g} s, "
                    f"a sample every {args.sample_every_s:g} s")
    out = [title, "", settings, ""]
    if background is not None:
        quiet = "quiet" if background <= 0.15 else "**NOT quiet: figures understate the processor**"
        out += [f"Background load before the run: {background:.2f} of {cores} cores busy ({quiet}).", ""]
    if servers:
        out += [f"Servers: Redis {servers['redis']}; Postgres {servers['postgres']}", ""]
    out += [render_table(cores, model, results), ""]
    for r in results:
        if r.kind == "soak":
            out += soak_series(r.label, r.values)
        elif r.kind == "versus":
            out += render_versus(r)
        elif r.kind == "growth":
            out += render_growth(r)
    for r in results:
        if "profile" in r.values:
            out += render_profile(r.label, r.values["profile"])
    notes = where_time_goes(results)
    if notes:
        out += ["Where the time goes (CPU seconds during each measured span):", *notes, ""]
    return "\n".join(out)


def json_document(args: argparse.Namespace, cores: int, model: str, background: float | None,
                  servers: dict[str, str], results: list[Result]) -> dict[str, Any]:
    """The --json document, without `status` and `bench_seconds`, which the caller adds."""
    return {
        "machine": {"cores": cores, "cpu_model": model},
        "servers": servers,
        "background_busy_cores": background,
        "settings": {k: getattr(args, k) for k in ("backlog", "devices", "rate", "latency_seconds",
                                                  "latency_shards", "warmup_seconds", "shards", "quick",
                                                  "soak_minutes", "kill_every_s", "sample_every_s",
                                                  "rounds", "growth_shards", "profile")},
        "processor_env": {k: os.environ[k] for k in PASSED_THROUGH if k in os.environ},
        "targets": {"drain_per_s": TARGET_DRAIN, "p99_ms": TARGET_P99_MS, "rss_mb_per_shard": TARGET_RSS_MB},
        "results": [{"kind": r.kind, "label": r.label, **r.values, "error": r.error} for r in results],
    }
