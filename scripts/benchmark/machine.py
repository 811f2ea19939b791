"""CPU use of the whole machine and of the benchmark itself, from /proc/stat and os.times()."""

from __future__ import annotations

import os
import time
from pathlib import Path

from scripts.toolkit.processes import CLK_TCK


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


_STAT_COLUMNS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_ticks() -> dict[str, int]:
    """Jiffies of all CPUs from the first line of /proc/stat, by column."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return dict(zip(_STAT_COLUMNS, values + [0] * (8 - len(values))))


class MachineMeter:
    """CPU use of the whole machine and of this benchmark process between start() and stop(), in cores."""

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.ticks0 = machine_ticks()
        self.self0 = _own_cpu_s()

    def stop(self) -> dict[str, float]:
        seconds = max(time.monotonic() - self.t0, 1e-9)
        ticks1 = machine_ticks()
        d = {k: (ticks1[k] - self.ticks0[k]) / CLK_TCK / seconds for k in _STAT_COLUMNS}
        busy = d["user"] + d["nice"] + d["system"] + d["irq"] + d["softirq"] + d["steal"]
        return {
            "span_s": round(seconds, 2),
            "busy_cores": round(busy, 2),
            "user_cores": round(d["user"] + d["nice"], 2),
            "system_cores": round(d["system"], 2),
            "irq_softirq_cores": round(d["irq"] + d["softirq"], 2),
            "steal_cores": round(d["steal"], 2),
            "iowait_cores": round(d["iowait"], 2),
            "bench_process_cpu_s": round(_own_cpu_s() - self.self0, 2),
        }


def background_load(seconds: float = 1.0) -> float:
    """Cores kept busy by other processes while the benchmark does nothing."""
    meter = MachineMeter()
    meter.start()
    time.sleep(seconds)
    return meter.stop()["busy_cores"]


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system
