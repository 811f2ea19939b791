"""`--only growth`: how the Processor's cost grows with active devices and with geofences.

The same number of fixes (--backlog) drained at --growth-shards from 2,000, 20,000 and 100,000
devices (no geofences; with 100,000 most fixes are a device's first, so state loads dominate),
and from 2,000 devices with 0, 1,000 and 10,000 geofences. The cases take turns within each of
--rounds rounds; medians are reported. Cost is the CPU of the shard processes (/proc) per fix.
Targets: 100,000 devices within 20 % of 2,000, 10,000 geofences within 25 % of none, on both
the rate and the CPU per fix.

Geofences are scattered at the density of the 1,000 case, over an area that grows with their
number (a fleet's geofence set grows with its territory): so each fix is inside about as many
geofences whatever their number, and the row measures what a larger set costs — the index
lookup — rather than ten times the visits. A second 10,000 row packs them all into the
fleet's area (about ten times the visits per fix, so ten times the derived output); it is
reported without a target.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from typing import Any

from scripts.benchmark.base import BenchError, Result, fmt_int
from scripts.benchmark.drain import DrainScenario, import_geofences, run_drain
from scripts.benchmark.sandbox import Bench
from scripts.benchmark.versus import Phase

BASELINE = (2_000, 0)  # (devices, geofences): the case the others are compared with
DENSE = "dense"  # all geofences within the fleet's area, whatever their number
# (devices, geofences, layout) -> allowed growth over BASELINE (None: no target)
CASES: dict[tuple[int, int, str], float | None] = {
    (2_000, 0, ""): None,
    (20_000, 0, ""): None,
    (100_000, 0, ""): 0.20,
    (2_000, 1_000, ""): None,
    (2_000, 10_000, ""): 0.25,
    (2_000, 10_000, DENSE): None,
}


def growth_phases(bench: Bench, args: argparse.Namespace) -> list[Phase]:
    runs: list[Result] = []
    phases: list[Phase] = []
    for r in range(1, args.rounds + 1):
        for devices, fences, layout in CASES:
            label = f"round {r}: {fmt_int(devices)} devices, {fmt_int(fences)} geofences" + (f" ({layout})" if layout else "")
            spread = 1.0 if layout == DENSE else (fences / 1_000) ** 0.5
            setup = functools.partial(import_geofences, count=fences, spread=spread) if fences else None
            scenario = DrainScenario(label, args.growth_shards, setup=setup)
            result = Result("run", label, {"case": [devices, fences, layout], "round": r})
            phases.append((result, lambda res, s=scenario, d=devices: run_drain(bench, res, s, args.backlog, d)))
            runs.append(result)
    summary = Result("growth", f"cost growth, SHARDS={args.growth_shards}, {fmt_int(args.backlog)} fixes, "
                               f"{args.rounds} round(s)")
    phases.append((summary, lambda res: summarise(res, runs)))
    return phases


def summarise(result: Result, runs: list[Result]) -> None:
    by_case: dict[tuple[int, int, str], list[Result]] = {}
    for run in runs:
        if run.error is None and "drain_per_s" in run.values:
            by_case.setdefault(tuple(run.values["case"]), []).append(run)  # type: ignore[arg-type]
    rows = []
    for case, allowed in CASES.items():
        done = by_case.get(case)
        if not done:
            continue
        rows.append({
            "devices": case[0], "active_devices": min(case[0], done[0].values["records"]), "geofences": case[1],
            "layout": case[2] or "same density", "runs": len(done), "allowed_growth": allowed,
            "drain_per_s": round(statistics.median(r.values["drain_per_s"] for r in done), 1),
            "shard_cpu_us_per_fix": round(statistics.median(r.values["shard_cpu_us_per_fix"] for r in done), 2),
            "replays_per_1000": round(statistics.median(
                1000 * r.values.get("derived", {}).get("devices_replayed", 0) / r.values["records"] for r in done), 1),
            "visits_per_1000": round(statistics.median(
                1000 * r.values.get("derived", {}).get("visits_written", 0) / r.values["records"] for r in done), 1),
        })
    base = next((row for row in rows if (row["devices"], row["geofences"]) == BASELINE), None)
    for row in rows:
        if base is not None:
            row["rate_vs_base"] = round(row["drain_per_s"] / base["drain_per_s"], 3)
            row["cpu_vs_base"] = round(row["shard_cpu_us_per_fix"] / base["shard_cpu_us_per_fix"], 3)
            if row["allowed_growth"] is not None:
                row["met"] = (row["rate_vs_base"] >= 1 - row["allowed_growth"]
                              and row["cpu_vs_base"] <= 1 + row["allowed_growth"])
    result.values["rows"] = rows
    if base is None:
        raise BenchError("the baseline (2,000 devices, no geofences) did not complete")


def render_growth(result: Result) -> list[str]:
    rows: list[dict[str, Any]] = result.values.get("rows") or []
    if not rows:
        return []
    out = [f"### {result.label}", "", "Medians; rates and the shards' CPU (from /proc) from the first entry read to "
           "the last row stored, start-up apart. Ratios are to 2,000 devices without geofences.", "",
           "| devices (active) | geofences | fixes/s | shard CPU µs/fix | rate ÷ baseline | CPU ÷ baseline | target | met "
           "| late replays / 1,000 fixes | visits written / 1,000 fixes |",
           "|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for row in rows:
        allowed = row["allowed_growth"]
        target = "" if allowed is None else f"rate ≥ {1 - allowed:.2f}, CPU ≤ {1 + allowed:.2f}"
        met = "" if "met" not in row else ("yes" if row["met"] else "**NO**")
        out.append(f"| {fmt_int(row['devices'])} ({fmt_int(row['active_devices'])}) | {fmt_int(row['geofences'])}{' (dense)' if row['layout'] == DENSE else ''} | {fmt_int(row['drain_per_s'])} | "
                   f"{row['shard_cpu_us_per_fix']:.1f} | {row.get('rate_vs_base', 0):.2f} | "
                   f"{row.get('cpu_vs_base', 0):.2f} | {target} | {met} | {row['replays_per_1000']:.1f} | "
                   f"{row['visits_per_1000']:.1f} |")
    out.append("")
    return out
