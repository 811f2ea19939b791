"""`processor run` under measurement: CPU seconds and peak RSS of the supervisor and its shards."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from scripts.benchmark.base import POLL_S, READY_TIMEOUT_S, STOP_GRACE_S, BenchError
from scripts.toolkit.processes import (
    CLK_TCK,
    PROCESSOR,
    ROOT,
    children,
    cpu_ticks,
    proc_title,
    stat_fields,
    status_kb,
    tail,
)
from shard.devices import DERIVED_COUNTS


@dataclass
class ShardMemory:
    pid: int
    title: str
    rss_kb: int = 0  # highest VmRSS seen while sampling
    hwm_kb: int = 0  # VmHWM, the kernel's peak
    gone: bool = False  # exited (its /proc entry is gone): title and figures stay as last read


class ProcessorRun:
    """`processor run` in its own session; samples the CPU and memory of it and its shards."""

    def __init__(self, env: dict[str, str], log_path: Path, shards: int) -> None:
        self.shards_expected = shards
        self.env = env
        self.log_path = log_path
        self.log_file = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [*PROCESSOR, "run"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.memory: dict[int, ShardMemory] = {}
        self.last_scan = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise BenchError(f"processor exited early with code {code}\n{self.log_tail()}")

    def sample(self) -> None:
        """Memory of every shard; the children are re-listed at most once a second, or at every
        call while fewer live shards than expected are known."""
        now = time.monotonic()
        for mem in self.memory.values():
            mem.gone = mem.gone or stat_fields(mem.pid) is None
        # a helper (maintenance, http) is no shard: counted, it would hide a shard forked after it
        live = sum(not m.gone and (_is_shard(m.title) or not _settled(m.title)) for m in self.memory.values())
        if live < self.shards_expected or now - self.last_scan >= 1.0:
            self.last_scan = now
            for pid in children(self.pid):
                if pid not in self.memory:
                    self.memory[pid] = ShardMemory(pid, proc_title(pid))
        for mem in self.memory.values():
            if mem.gone:
                continue
            if not _settled(mem.title):  # just forked (its parent's title), or read while being rewritten
                title = proc_title(mem.pid)
                if title == "?":  # exited since: keep the title last read
                    mem.gone = True
                    continue
                mem.title = title or mem.title  # empty while it has no memory map (mid-exec, a zombie): read again
            kb = status_kb(mem.pid, "VmRSS", "VmHWM")
            mem.rss_kb = max(mem.rss_kb, kb.get("VmRSS", 0))
            mem.hwm_kb = max(mem.hwm_kb, kb.get("VmHWM", 0))

    def cpu_seconds(self) -> dict[str, float]:
        """CPU so far of the supervisor (with any reaped child) and each live child."""
        out = {"supervisor": cpu_ticks(self.pid, with_children=True) / CLK_TCK}
        for pid in children(self.pid):
            out[f"{proc_title(pid)} (pid {pid})"] = cpu_ticks(pid) / CLK_TCK
        return out

    def busy_cpu_s(self) -> float:
        """CPU seconds so far of the shard processes, the ones doing the work."""
        return shard_cpu_s(self.cpu_seconds())

    def shards(self) -> list[ShardMemory]:
        """The shard processes seen (the supervisor's helpers, such as maintenance, apart)."""
        return [m for m in self.memory.values() if _is_shard(m.title)]

    def peak_rss_mb(self) -> list[float]:
        return [round(max(m.hwm_kb, m.rss_kb) / 1024, 1) for m in self.shards()]

    def stop(self) -> int:
        """SIGTERM and wait for the graceful exit; returns the exit code."""
        drain = float(self.env.get("DRAIN_TIMEOUT_S", "20"))
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=drain + STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            raise BenchError(f"processor did not exit within {drain + STOP_GRACE_S:.0f}s of SIGTERM") from None

    def derived_counts(self) -> dict[str, int]:
        """The shards' derived-state counts (reloads, late-fix replays, visits), summed over their
        `shard stopped` lines: read after stop()."""
        totals: dict[str, int] = {}
        for line in self.log_path.read_bytes().splitlines():
            if b'"shard stopped"' not in line:
                continue
            entry = orjson.loads(line)
            for key in DERIVED_COUNTS:
                totals[key] = totals.get(key, 0) + int(entry.get(key, 0))
        return totals

    def log_tail(self, lines: int = 15) -> str:
        last = tail(self.log_path, lines)
        if last:
            return "processor log tail:\n  " + "\n  ".join(last)
        return "(processor wrote no log)"

    def close(self) -> None:
        """Kill the whole process group, whatever state it is in (by its id only)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=3)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # shards share the supervisor's group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.log_file.close()


def shard_cpu_s(cpu: dict[str, float]) -> float:
    """CPU seconds of the shard processes alone (not the supervisor or its helpers) in a
    ProcessorRun.cpu_seconds() reading."""
    return sum(v for k, v in cpu.items() if _is_shard(k))


def _is_shard(title: str) -> bool:
    return title.startswith("processor: shard ")


def _settled(title: str) -> bool:
    """A child's own whole title: `processor: <role> [<instance>]`, not the supervisor's."""
    return re.fullmatch(r"processor: (?!supervisor )[a-z]+( \d+)? \[.*\]", title) is not None


def wait_until(condition: Callable[[], bool], proc: ProcessorRun, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not condition():
        proc.check_alive()
        proc.sample()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {READY_TIMEOUT_S:.0f}s waiting for {what}\n{proc.log_tail()}")
        time.sleep(POLL_S)
