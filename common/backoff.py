"""Capped exponential backoff with full jitter, shared by restarts and reconnects."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delay before attempt n+1 after n consecutive failures: base·2ⁿ⁻¹, capped, jittered.

    Jitter keeps many shards (and instances) from reconnecting in lock-step after an outage.
    """

    base_s: float = 0.1
    cap_s: float = 10.0
    jitter: float = 0.5  # fraction of the delay that is randomised
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        """Record one more failure and return how long to wait before retrying."""
        self.failures += 1
        delay = min(self.cap_s, self.base_s * 2 ** min(self.failures - 1, 32))
        return delay * (1 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self.failures = 0
