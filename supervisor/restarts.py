"""When to restart a crashed shard, and when crashes mean the whole instance must go."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from common.backoff import Backoff

CRASH_LOOP_CRASHES = 5
CRASH_LOOP_WINDOW_S = 60.0
RESTART_BASE_S = 0.5
RESTART_CAP_S = 30.0
# A shard that ran this long without crashing starts again from the shortest delay.
STABLE_AFTER_S = 60.0


@dataclass
class RestartPolicy:
    """Per-slot backoff between restarts, and crash-loop detection over all slots.

    Time is passed in (monotonic seconds), so tests drive it without sleeping.
    """

    crash_loop_crashes: int = CRASH_LOOP_CRASHES
    crash_loop_window_s: float = CRASH_LOOP_WINDOW_S
    base_s: float = RESTART_BASE_S
    cap_s: float = RESTART_CAP_S
    stable_after_s: float = STABLE_AFTER_S
    jitter: float = 0.2
    _crashes: deque[float] = field(default_factory=deque)
    _backoffs: dict[int, Backoff] = field(default_factory=dict)

    def record_crash(self, slot: int, started_at: float, now: float) -> float:
        """Note a crash of `slot`; returns the monotonic time at which to restart it."""
        self._crashes.append(now)
        return self.restart_time(slot, started_at, now)

    def restart_time(self, slot: int, started_at: float, now: float) -> float:
        """When to restart `slot`, which exited at `now`: its backoff, without counting a crash."""
        backoff = self._backoffs.setdefault(slot, Backoff(self.base_s, self.cap_s, self.jitter))
        if now - started_at >= self.stable_after_s:
            backoff.reset()
        return now + backoff.next_delay()

    def crash_looping(self, now: float) -> bool:
        """True when too many crashes fell inside the window: restarting here will not help."""
        while self._crashes and now - self._crashes[0] > self.crash_loop_window_s:
            self._crashes.popleft()
        return len(self._crashes) >= self.crash_loop_crashes
