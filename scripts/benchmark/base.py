"""Settings, targets, errors, results and progress lines shared by every phase."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from common.logs import scrub

POLL_S = 0.05
PROGRESS_S = 1.0
STALL_TIMEOUT_S = 90.0  # no progress for this long fails a phase
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0  # on top of the processor's own DRAIN_TIMEOUT_S
SEED = 1
PASSED_THROUGH = ("BATCH_SIZE", "DEVICE_CACHE_SIZE", "DRAIN_TIMEOUT_S")
SPEC_VARS = (
    "REDIS_URL", "DATABASE_URL", "MIGRATION_DATABASE_URL", "STREAM_KEY", "CONSUMER_GROUP", "DLQ_KEY",
    "INSTANCE_ID", "SHARDS", "BATCH_SIZE", "CLAIM_THRESHOLD_MS", "CLAIM_INTERVAL_MS", "MAX_FAILURES",
    "DRAIN_TIMEOUT_S", "DEVICE_CACHE_SIZE", "PANIC_DIR", "LOG_LEVEL", "HTTP_PORT",
)

TARGET_DRAIN = {1: 40_000, 2: 60_000}
TARGET_P99_MS = 50.0
TARGET_RSS_MB = 150.0


class BenchError(Exception):
    """A phase could not complete or a correctness check failed."""


class Interrupted(BaseException):
    """SIGTERM to the benchmark; handled like Ctrl-C."""


def say(message: str) -> None:
    """A line on stderr, without any password we know of."""
    sys.stderr.write(scrub(message) + "\n")
    sys.stderr.flush()


def fmt_int(n: float) -> str:
    return f"{n:,.0f}"


@dataclass
class Result:
    kind: str
    label: str
    values: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Progress:
    """One stderr line per second: phase, stored rows, rate."""

    def __init__(self, phase: str, total: int | None = None, noun: str = "stored") -> None:
        self.phase = phase
        self.noun = noun
        self.total = total
        self.t0 = self.last_t = time.monotonic()
        self.last_n = 0

    def due(self) -> bool:
        return time.monotonic() - self.last_t >= PROGRESS_S

    def report(self, stored: int, extra: str = "") -> None:
        now = time.monotonic()
        rate = (stored - self.last_n) / max(now - self.last_t, 1e-9)
        of = f"/{fmt_int(self.total)}" if self.total else ""
        say(f"  [{self.phase}] {now - self.t0:6.1f}s  {self.noun} {fmt_int(stored)}{of}  {fmt_int(rate)}/s{extra}")
        self.last_t, self.last_n = now, stored
