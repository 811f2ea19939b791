"""The soak's load: what the Processor supports, the retention plan with its device clock, the sender.

Why a restart with a shorter retention
--------------------------------------
With POSITIONS_RETENTION_DAYS = N, a shard stores a fix only if its `ts` is within N days of
its clock, and maintenance drops a daily partition only once its upper bound is at or before
the start of the UTC day of now − N − 1 days (supervisor/partitions.py). So a partition that
received fixes while N was in force is dropped a day or more later: never during a soak of
minutes. A partition dropped during the run must hold fixes stored under a longer retention,
which is what happens when an operator shortens it. The plan does exactly that:

1. Layout: on the fresh database the migration leaves one partition for everything before
   the day after tomorrow; the bench replaces it (empty) by `positions_before_<D0>` and one
   partition per UTC day from D0 = 00:00 UTC four days ago, as if the installation had been
   partitioned for days.
2. Phase 1 (POSITIONS_RETENTION_DAYS=0, keep for ever): device time starts at D0 and runs
   fast (about 3.5 days in `ramp_until_s`), so the fixes fill the daily partitions of the past
   days; then it rides the line `wall clock − 1 day + margin_s` at 1x wall time.
3. At `switch_at_s` (a third of the run) the Processor gets SIGTERM (exit 0 expected) and is
   started again with POSITIONS_RETENTION_DAYS=1; its maintenance process runs a pass at
   once, which drops the partitions ending at or before 00:00 UTC two days ago, while the load
   goes on (and again every 10 minutes). Device time stays `margin_s` ahead of the new
   horizon (now − 1 day), so no fix expires, and a day behind the clock, far from MAX_FUTURE_S.
Without POSITIONS_RETENTION_DAYS in the Processor (older code) there is neither layout nor
restart, and device time rides the same line from the start.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from scripts.toolkit.fleet import Fleet
from scripts.toolkit.writer import produce

DAY_S = 86_400.0
HOUR_MS = 3_600_000
STREAM_RETENTION_MS = 60_000
RETENTION_DAYS = 1  # phase 2
DAYS_BACK = 4  # device time starts at 00:00 UTC this many days ago
MARGIN_S = 120.0  # device time ahead of the phase-2 horizon
SETTINGS = ("STREAM_RETENTION_MS", "POSITIONS_RETENTION_DAYS")


def probe_settings(env: dict[str, str]) -> dict[str, bool]:
    """Which of the issue-10 settings this Processor reads (it names them when they are malformed)."""
    from common.config import Settings
    from common.errors import ConfigError

    known = {}
    for name in SETTINGS:
        try:
            Settings.from_env({**env, name: "bench-probe"})
            known[name] = False
        except ConfigError as exc:
            known[name] = name in str(exc)
    return known


def day_floor(epoch_s: float) -> float:
    return math.floor(epoch_s / DAY_S) * DAY_S


@dataclass
class Plan:
    """Device time and the retention switch of one soak; times are epoch seconds, offsets seconds after load start."""

    load_s: float
    retention: bool  # the Processor reads POSITIONS_RETENTION_DAYS
    switch_at_s: float | None = None
    ramp_until_s: float = 0.0
    margin_s: float = MARGIN_S
    wall0: float = 0.0  # wall clock at load start
    device0: float = 0.0  # ts of the first fix
    first_day: float = 0.0  # D0: the first daily partition the layout makes

    @classmethod
    def make(cls, load_s: float, retention: bool, now: float | None = None) -> Plan:
        now = time.time() if now is None else now
        if not retention:
            return cls(load_s, False)
        switch = load_s / 3
        plan = cls(load_s, True, switch_at_s=switch, ramp_until_s=switch - min(60.0, switch / 3), wall0=now)
        plan.first_day = plan.device0 = day_floor(now) - DAYS_BACK * DAY_S
        return plan

    def line(self, t: float) -> float:
        """The 1x part of device time: a day behind the wall clock, margin_s ahead of the phase-2 horizon."""
        return self.wall0 + t - RETENTION_DAYS * DAY_S + self.margin_s

    def start(self, wall: float) -> None:
        self.wall0 = wall
        self.device0 = self.first_day if self.retention else self.line(0.0)

    def device_s(self, t: float) -> float:
        if not self.retention or t >= self.ramp_until_s:
            return self.line(t)
        end = self.line(self.ramp_until_s)
        return self.device0 + (end - self.device0) * t / self.ramp_until_s

    @property
    def speed(self) -> float:
        """Device seconds per wall second during the ramp."""
        if not self.retention or self.ramp_until_s <= 0:
            return 1.0
        return (self.line(self.ramp_until_s) - self.device0) / self.ramp_until_s

    def horizon(self, wall: float, t: float) -> float | None:
        """The shards' horizon at `t` (None while everything is kept)."""
        if not self.retention or self.switch_at_s is None or t < self.switch_at_s:
            return None
        return wall - RETENTION_DAYS * DAY_S

    def describe(self) -> str:
        if not self.retention:
            return ("POSITIONS_RETENTION_DAYS unknown to this Processor: no retention, device time a day behind the "
                    "clock at 1x")
        day = time.strftime("%Y-%m-%d", time.gmtime(self.first_day))
        return (f"daily partitions from {day}; phase 1 POSITIONS_RETENTION_DAYS=0, device time from {day} 00:00 UTC "
                f"at ~{self.speed:,.0f}x until {self.ramp_until_s:.0f} s, then 1x a day behind the clock; at "
                f"{self.switch_at_s:.0f} s restart with POSITIONS_RETENTION_DAYS={RETENTION_DAYS} (drops the "
                f"partitions ending by 00:00 UTC {RETENTION_DAYS + 1} days ago); fixes {self.margin_s:.0f} s "
                "ahead of the horizon")

    def as_dict(self) -> dict[str, Any]:
        return {"retention": self.retention, "switch_at_s": self.switch_at_s, "ramp_until_s": self.ramp_until_s,
                "ramp_speed": round(self.speed, 1), "margin_s": self.margin_s, "first_day": self.first_day,
                "device_start": self.device0, "retention_days_after_switch": RETENTION_DAYS}


@dataclass
class Windows:
    """The two latency windows (seconds after load start) and the bench_seq numbers of their fixes."""

    first: tuple[float, float]
    last: tuple[float, float]
    capacity: int

    @classmethod
    def make(cls, load_s: float, warmup_s: float, rate: float) -> Windows:
        width = max(1.0, min(120.0, (load_s - warmup_s) / 6))
        first = (warmup_s, warmup_s + width)
        last = (max(first[1], load_s - width), load_s)
        capacity = int(math.ceil(rate * (first[1] - first[0] + last[1] - last[0]))) + 2 * int(rate) + 1000
        return cls(first, last, capacity)

    @property
    def width(self) -> float:
        return self.first[1] - self.first[0]

    def which(self, t: float) -> int | None:
        if self.first[0] <= t < self.first[1]:
            return 0
        if self.last[0] <= t < self.last[1]:
            return 1
        return None

    def quiet(self, t: float, settle_s: float) -> bool:
        """False inside a window, `settle_s` before one, or after the last one starts: no shard is killed then."""
        return not (self.first[0] - settle_s <= t < self.first[1] or t >= self.last[0] - settle_s)


@dataclass
class Sent:
    """What the sender wrote: totals, per UTC hour of ts, and the send time and window of each bench_seq."""

    total: int = 0
    by_hour: Counter = field(default_factory=Counter)
    sent_at: list[float] = field(default_factory=list)
    window_of: list[int] = field(default_factory=list)
    max_ahead_s: float = -math.inf  # greatest ts - wall clock at send
    min_ahead_of_horizon_s: float = math.inf  # smallest ts - horizon at send


def paced_load(client: Any, stream: str, fleet: Fleet, plan: Plan, windows: Windows, rate: float,
               on_tick: Callable[[float, int], None]) -> tuple[Sent, float]:
    """Offer `rate` fixes/s for plan.load_s in 10 ms ticks; ts follows the plan's device clock.

    Fixes sent inside a latency window carry io.bench_seq (consecutive from 0). `on_tick(t,
    sent)` runs after every tick (kills, samples). Returns (what was sent, seconds taken).
    """
    total = int(round(rate * plan.load_s))
    gen = fleet.fixes(total)
    dumps, monotonic, wall = orjson.dumps, time.monotonic, time.time
    sent = Sent()
    last_ts: dict[str, int] = {}
    seq = 0
    t0 = next_tick = monotonic()
    plan.start(wall())
    while sent.total < total:
        now = monotonic()
        t = now - t0
        due = min(total, int(t * rate) + 1)
        window = windows.which(t)
        while sent.total < due:
            k = min(due - sent.total, 1000)
            device_ms = int(plan.device_s(monotonic() - t0) * 1000.0)
            payloads = []
            first_seq = seq
            for _ in range(k):
                fix = next(gen)
                dev = fix["device_id"]
                ts = max(device_ms, last_ts.get(dev, 0) + 1)
                last_ts[dev] = fix["ts"] = ts
                sent.by_hour[ts // HOUR_MS] += 1
                if window is not None and seq < windows.capacity:
                    fix["io"]["bench_seq"] = seq
                    seq += 1
                payloads.append(dumps(fix))
            now_wall = wall()
            sent.max_ahead_s = max(sent.max_ahead_s, ts / 1000.0 - now_wall)
            horizon = plan.horizon(now_wall, t)
            if horizon is not None:
                sent.min_ahead_of_horizon_s = min(sent.min_ahead_of_horizon_s, device_ms / 1000.0 - horizon)
            t_send = monotonic()
            produce(client, stream, payloads, pipeline_size=len(payloads))
            if seq > first_seq:
                sent.sent_at.extend([t_send] * (seq - first_seq))
                sent.window_of.extend([window] * (seq - first_seq))
            sent.total += k
        on_tick(t, sent.total)
        if sent.total >= total:
            break
        next_tick += 0.01
        now = monotonic()
        if next_tick > now:
            time.sleep(next_tick - now)
        else:
            next_tick = now
    return sent, monotonic() - t0
