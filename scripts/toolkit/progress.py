"""A rate-limited progress line on stderr for the simulator's command line."""

from __future__ import annotations

import sys
import time

from scripts.toolkit.writer import Counts


class Progress:
    """Rate-limited progress line on stderr (``\\r`` on a TTY)."""

    def __init__(self, label: str, total: int, interval: float = 0.5) -> None:
        self.label = label
        self.total = total
        self.interval = interval
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.last = 0.0
        self.counts: Counts | None = None
        self.dirty = False

    def __call__(self, counts: Counts) -> None:
        self.counts = counts
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._emit(now)

    def _emit(self, now: float) -> None:
        c = self.counts
        if c is None:
            return
        el = max(now - self.t0, 1e-9)
        pct = 100.0 * c.total / self.total if self.total else 100.0
        line = (
            f"{self.label}: {c.total}/{self.total} ({pct:5.1f}%) "
            f"valid={c.valid} malformed={c.malformed} {el:6.1f}s {c.total / el:,.0f}/s"
        )
        if self.tty:
            sys.stderr.write("\r" + line + "\x1b[K")
            self.dirty = True
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty and self.dirty:
            self._emit(time.monotonic())
            sys.stderr.write("\n")
            sys.stderr.flush()
