"""The soak's observations: a sample every --sample-every-s, a shard SIGKILLed every --kill-every-s.

A sample holds Redis `used_memory` and XLEN of the stream, the group's pending and lag, the
VmRSS of every child of the supervisor by its title (`processor: shard N [...]`, `processor:
maintenance [...]`, ...), the counters of /metrics summed over their labels, the partitions
of `positions` and their size, and the fixes stored so far (the bench's own tally, see
soak.py). Partitions seen once and gone later were dropped.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

from scripts.benchmark.run import ProcessorRun
from scripts.benchmark.sandbox import Sandbox
from scripts.toolkit.harness import group_info
from scripts.toolkit.processes import children, proc_title, status_kb

_SHARD_TITLE = re.compile(r"^processor: shard (\d+) ")
_CHILD_TITLE = re.compile(r"^processor: (\w+)")
_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


@dataclass
class Sample:
    t: float
    sent: int
    stored: int
    used_memory: int
    xlen: int
    pending: int | None
    lag: int | None
    rss_kb: dict[str, int]  # "shard 0", "maintenance", ... -> VmRSS kB
    pids: dict[str, int]
    metrics: dict[str, float] | None  # None: /metrics did not answer
    partitions: int | None  # None: positions is not partitioned
    positions_mb: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> value per metric name, summed over labels (histogram buckets left out)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_LINE.match(line)
        if m is None or m.group(1).endswith("_bucket"):
            continue
        with contextlib.suppress(ValueError):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def direct_children(pid: int) -> list[int]:
    try:
        return sorted(int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except (OSError, ValueError):
        return children(pid)


class Observer:
    """Reads everything a sample holds; its own Postgres connection."""

    def __init__(self, box: Sandbox, proc: ProcessorRun, http_port: int) -> None:
        self.box = box
        self.proc = proc
        self.url = f"http://127.0.0.1:{http_port}/metrics"
        self.db = psycopg.connect(box.database_url, autocommit=True)
        self.db.execute("SET TimeZone = 'UTC'")
        self.partitions_seen: dict[str, str] = {}  # name -> bound, every partition ever seen
        self.dropped: dict[str, float] = {}  # name -> t when first seen gone
        self.metrics_errors = 0
        self.base: dict[str, float] = {}  # counters of earlier processor runs, added to the current one's

    def carry_counters(self) -> None:
        """Before the processor is restarted: keep its counters (names ending in _total) to add them later."""
        last = self.metrics() or {}
        for name, value in last.items():
            if name.endswith("_total"):
                self.base[name] = value

    def close(self) -> None:
        self.db.close()

    def titled_children(self) -> dict[str, int]:
        """'shard 0' / 'maintenance' / 'http' -> pid, for the supervisor's live children."""
        out = {}
        for pid in direct_children(self.proc.pid):
            title = proc_title(pid)
            shard = _SHARD_TITLE.match(title)
            if shard:
                out[f"shard {shard.group(1)}"] = pid
            elif (child := _CHILD_TITLE.match(title)) and child.group(1) != "supervisor":
                out[child.group(1)] = pid
        return out

    def shard_pid(self, slot: int) -> int | None:
        return self.titled_children().get(f"shard {slot}")

    def stored(self) -> int:
        return int(self.db.execute("select coalesce(sum(n), 0) from bench_stored").fetchone()[0])

    def metrics(self) -> dict[str, float] | None:
        try:
            with urllib.request.urlopen(self.url, timeout=3) as resp:
                current = parse_metrics(resp.read().decode())
        except (OSError, ValueError):
            self.metrics_errors += 1
            return None
        for name, value in self.base.items():
            current[name] = current.get(name, 0.0) + value
        return current

    def partitions(self, t: float) -> tuple[int | None, float | None]:
        rows = self.db.execute(
            "select c.relname, pg_get_expr(c.relpartbound, c.oid), pg_total_relation_size(c.oid)"
            " from pg_inherits i join pg_class c on c.oid = i.inhrelid"
            " where i.inhparent = 'positions'::regclass").fetchall()
        kind = self.db.execute("select relkind from pg_class where oid = 'positions'::regclass").fetchone()[0]
        if kind != "p":
            size = self.db.execute("select pg_total_relation_size('positions')").fetchone()[0]
            return None, round(size / 2**20, 1)
        names = set()
        for name, bound, _size in rows:
            names.add(name)
            self.partitions_seen.setdefault(name, bound)
        for name in self.partitions_seen.keys() - names:
            self.dropped.setdefault(name, t)
        return len(rows), round(sum(r[2] for r in rows) / 2**20, 1)

    def sample(self, t: float, sent: int) -> Sample:
        r = self.box.redis
        group = group_info(r, self.box.stream) or {}
        kids = self.titled_children()
        rss = {name: status_kb(pid, "VmRSS").get("VmRSS", 0) for name, pid in kids.items()}
        self.proc.sample()
        partitions, size_mb = self.partitions(t)
        return Sample(
            t=round(t, 1), sent=sent, stored=self.stored(),
            used_memory=int(r.info("memory")["used_memory"]), xlen=int(r.xlen(self.box.stream)),
            pending=group.get("pending"), lag=group.get("lag"), rss_kb=rss, pids=kids,
            metrics=self.metrics(), partitions=partitions, positions_mb=size_mb,
        )


@dataclass
class Kill:
    t: float
    slot: int
    pid: int
    restarted_after_s: float | None = None
    new_pid: int | None = None


@dataclass
class Killer:
    """SIGKILLs shard 0, 1, 0, ... every `every_s`, except when `quiet(t)` says no (the kill is skipped)."""

    observer: Observer
    every_s: float
    quiet: Callable[[float], bool]  # False: no kill now (latency window, restart)
    shards: int
    kills: list[Kill] = field(default_factory=list)
    skipped: list[float] = field(default_factory=list)
    next_at: float = 0.0
    last_check: float = 0.0

    def __post_init__(self) -> None:
        self.next_at = self.every_s

    def tick(self, t: float, t_mono: float, kill: bool = True) -> Kill | None:
        """Kill when due; notice restarts. Returns the kill made now, if any."""
        made = None
        if kill and self.every_s > 0 and t >= self.next_at:
            self.next_at += self.every_s
            if not self.quiet(t):
                self.skipped.append(round(t, 1))
            else:
                slot = len(self.kills) % self.shards
                pid = self.observer.shard_pid(slot)
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        made = Kill(round(t, 2), slot, pid)
                        self.kills.append(made)
        waiting = [k for k in self.kills if k.restarted_after_s is None]
        if waiting and t_mono - self.last_check >= 0.1:
            self.last_check = t_mono
            for k in waiting:
                pid = self.observer.shard_pid(k.slot)
                if pid is not None and pid != k.pid:
                    k.new_pid = pid
                    k.restarted_after_s = round(t - k.t, 2)
        return made

    def as_list(self) -> list[dict[str, Any]]:
        return [asdict(k) for k in self.kills]


def wait_settled(box: Sandbox, proc: ProcessorRun, timeout_s: float) -> dict[str, Any]:
    """Until the group has read up to the stream's last entry and nothing is pending; the state then."""
    deadline = time.monotonic() + timeout_s
    state: dict[str, Any] = {}
    while True:
        proc.check_alive()
        try:
            info = box.redis.xinfo_stream(box.stream)
        except redis.ResponseError:
            info = {}
        group = group_info(box.redis, box.stream) or {}
        last, delivered = _text(info.get("last-generated-id")), _text(group.get("last-delivered-id"))
        state = {"last_id": last, "last_delivered": delivered, "pending": group.get("pending"),
                 "lag": group.get("lag"), "entries_read": group.get("entries-read")}
        if last is not None and delivered == last and group.get("pending") == 0:
            return state
        if time.monotonic() > deadline:
            state["timed_out"] = True
            return state
        time.sleep(0.2)


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value
