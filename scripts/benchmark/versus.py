"""`--only peer`: the Processor beside the best-effort peer (peer.py) on the same backlog.

Each round drains the same backlog (same size, devices and seed; a fresh database and stream
each time) with the Processor at SHARDS=2, with the peer's two processes, and with the
Processor at SHARDS=1, in that order, so slow spells of a shared machine hit every side.
Rates count from the first entry read to the last row stored (start-up apart; the rate from
process start is kept too). Reported per round and as medians: fixes/s, Processor/peer
(the median of the rounds' ratios; target ≥ 0.85) and SHARDS=1 (target ≥ 40,000/s).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.benchmark.base import STOP_GRACE_S, TARGET_DRAIN, BenchError, Result, fmt_int, say
from scripts.benchmark.drain import DrainScenario, drain_values, run_drain, wait_drained, write_backlog
from scripts.benchmark.profiles import Profile
from scripts.benchmark.sandbox import Bench, Span
from scripts.toolkit.processes import CLK_TCK, ROOT, cpu_ticks, status_kb, tail

PEER_PROCESSES = 2
TARGET_RATIO = 0.85
Phase = tuple[Result, Callable[[Result], None]]
# Each round's drains in turn: (side, the Processor's SHARDS or None for the peer).
SIDES: tuple[tuple[str, int | None], ...] = (("processor-2", 2), ("peer", None), ("processor-1", 1))


class PeerRun:
    """The peer's processes, each in its own session; CPU and peak RSS from /proc."""

    def __init__(self, env: dict[str, str], log_path: Path, processes: int = PEER_PROCESSES) -> None:
        self.log_path = log_path
        self.log_file = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.started = time.monotonic()
        self.procs = [
            subprocess.Popen([sys.executable, "-m", "scripts.benchmark.peer", f"peer-{i}"], cwd=ROOT, env=env,
                             stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT,
                             start_new_session=True)
            for i in range(processes)
        ]
        self.hwm_kb = [0] * processes

    def sample(self) -> None:
        for i, proc in enumerate(self.procs):
            self.hwm_kb[i] = max(self.hwm_kb[i], status_kb(proc.pid, "VmHWM").get("VmHWM", 0))

    def check_alive(self) -> None:
        for proc in self.procs:
            code = proc.poll()
            if code is not None:
                raise BenchError(f"peer process exited early with code {code}\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        return "peer log tail:\n  " + "\n  ".join(tail(self.log_path, lines))

    def busy_cpu_s(self) -> float:
        """CPU seconds so far of the peer's processes (all of them do the work)."""
        return sum(cpu_ticks(proc.pid) for proc in self.procs) / CLK_TCK

    def stop(self) -> list[int]:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        try:
            return [proc.wait(timeout=STOP_GRACE_S) for proc in self.procs]
        except subprocess.TimeoutExpired:
            raise BenchError(f"a peer process did not exit within {STOP_GRACE_S:.0f}s of SIGTERM") from None

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        self.log_file.close()


def run_peer(bench: Bench, result: Result, n: int, devices: int) -> None:
    """One drain of the backlog by the peer, filled into `result` like a drain row."""
    result.values.update(backlog=n, devices=devices, processes=PEER_PROCESSES)
    say(f"\n{result.label}: backlog {fmt_int(n)} fixes from {fmt_int(devices)} devices")
    with bench.sandbox(result.label, PEER_PROCESSES) as box:
        bench.migrate(box)
        expected, total = write_backlog(box, result.label, n, devices)
        box.redis.xgroup_create(box.stream, box.env["CONSUMER_GROUP"], id="0", mkstream=True)
        profile = Profile(bench, box, result.label, python=False)
        span = Span(bench)
        peer = PeerRun(box.env, box.workdir / "peer.log")
        try:
            drained = wait_drained(box, peer, result.label, expected, total)
            cpu = peer.busy_cpu_s()
            span.stop(expected)
            say(f"  drained {fmt_int(expected)} in {drained.t_end - peer.started:.2f}s; stopping the peer")
            codes = peer.stop()
        finally:
            peer.close()
        result.values.update(
            **drain_values(expected, peer.started, drained),
            cpu_s=round(cpu, 2),
            cpu_us_per_fix=round(1e6 * (cpu - drained.cpu_at_first_read) / expected, 2),
            peak_rss_mb_per_process=[round(kb / 1024, 1) for kb in peer.hwm_kb],
            exit_codes=codes,
            **span.measured(),
        )
        profile.collect(result)
        if any(codes):
            raise BenchError(f"peer exit codes {codes} after SIGTERM (expected 0)\n{peer.log_tail()}")


def versus_phases(bench: Bench, args: argparse.Namespace) -> list[Phase]:
    """Every round's three drains, then the summary that compares them."""
    runs: list[Result] = []
    phases: list[Phase] = []
    for r in range(1, args.rounds + 1):
        for side, shards in SIDES:
            if shards is None:
                result = Result("run", f"round {r}: peer ({PEER_PROCESSES} processes)", {"side": side, "round": r})
                phases.append((result, lambda res: run_peer(bench, res, args.backlog, args.devices)))
            else:
                scenario = DrainScenario(f"round {r}: Processor SHARDS={shards}", shards)
                result = Result("run", scenario.label, {"side": side, "round": r})
                phases.append((result, lambda res, s=scenario: run_drain(bench, res, s, args.backlog, args.devices)))
            runs.append(result)
    summary = Result("versus", f"Processor vs peer, {args.rounds} round(s)")
    phases.append((summary, lambda res: summarise(res, runs)))
    return phases


def summarise(result: Result, runs: list[Result]) -> None:
    rounds: dict[int, dict[str, float]] = {}
    for run in runs:
        if run.error is None and "drain_per_s" in run.values:
            rounds.setdefault(run.values["round"], {})[run.values["side"]] = run.values["drain_per_s"]
    rows = []
    for r, sides in sorted(rounds.items()):
        p2, peer = sides.get("processor-2"), sides.get("peer")
        rows.append({"round": r, **sides, "ratio": round(p2 / peer, 3) if p2 and peer else None})
    result.values["rounds"] = rows
    result.values["profiled"] = any("profile" in run.values for run in runs)

    def median(key: str) -> float | None:
        values = [row[key] for row in rows if row.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    result.values["median"] = {key: median(key) for key in ("processor-2", "peer", "ratio", "processor-1")}
    if not rows:
        raise BenchError("no round completed")


def render_versus(result: Result) -> list[str]:
    v = result.values
    if "rounds" not in v:
        return []

    def rate(x: Any) -> str:
        return "n/a" if x is None else f"{fmt_int(x)}/s"

    def ratio(x: Any) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    out = [f"### {result.label}", "", "Fixes/s from the first entry read to the last row stored.", "",
           "| round | Processor SHARDS=2 | peer | Processor/peer | Processor SHARDS=1 |", "|---|---:|---:|---:|---:|"]
    for row in v["rounds"]:
        out.append(f"| {row['round']} | {rate(row.get('processor-2'))} | {rate(row.get('peer'))} | "
                   f"{ratio(row.get('ratio'))} | {rate(row.get('processor-1'))} |")
    m = v["median"]
    out.append(f"| **median** | {rate(m['processor-2'])} | {rate(m['peer'])} | {ratio(m['ratio'])} | "
               f"{rate(m['processor-1'])} |")
    ratio_met = m["ratio"] is not None and m["ratio"] >= TARGET_RATIO
    one_met = m["processor-1"] is not None and m["processor-1"] >= TARGET_DRAIN[1]
    if v.get("profiled"):
        out += ["", "**--profile was on: the Processor ran under cProfile, so these rates understate it.**"]
    out += ["", f"Targets: Processor/peer ≥ {TARGET_RATIO} ({'met' if ratio_met else '**NOT met**'}); "
            f"SHARDS=1 ≥ {fmt_int(TARGET_DRAIN[1])}/s ({'met' if one_met else '**NOT met**'}).", ""]
    return out
