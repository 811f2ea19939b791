"""Restart backoff and crash-loop detection (clock injected as plain floats), and Backoff itself."""

from __future__ import annotations

import random

import pytest

from common.backoff import Backoff
from supervisor.restarts import RestartPolicy


class FixedRandom(random.Random):
    """A Random whose random() always returns `value`: jitter at one of its extremes."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def delays(policy: RestartPolicy, slot: int, crashes: int, start: float = 1000.0, run_s: float = 1.0) -> list[float]:
    """Crash `slot` repeatedly, each run lasting `run_s`; the delays the policy asked for."""
    found, now = [], start
    for _ in range(crashes):
        restart_at = policy.record_crash(slot, started_at=now - run_s, now=now)
        found.append(restart_at - now)
        now = restart_at + run_s
    return found


def test_restart_delay_doubles_per_crash_and_is_capped() -> None:
    """Without jitter the delays of consecutive quick crashes are base·2ⁿ, capped at cap_s."""
    policy = RestartPolicy(base_s=0.5, cap_s=8.0, jitter=0.0)
    assert delays(policy, slot=0, crashes=7) == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_restart_delay_with_default_jitter_stays_in_bounds() -> None:
    """With the default jitter every delay lies in [80 %, 100 %] of its un-jittered value, never above the cap."""
    policy = RestartPolicy()
    for n, delay in enumerate(delays(policy, slot=0, crashes=12)):
        nominal = min(policy.cap_s, policy.base_s * 2**n)
        assert nominal * (1 - policy.jitter) <= delay <= nominal


def test_slots_back_off_independently() -> None:
    """Crashes of one slot do not lengthen another slot's first delay."""
    policy = RestartPolicy(base_s=0.5, cap_s=30.0, jitter=0.0)
    assert delays(policy, slot=0, crashes=4) == [0.5, 1.0, 2.0, 4.0]
    assert delays(policy, slot=1, crashes=2) == [0.5, 1.0]
    assert delays(policy, slot=0, crashes=1) == [8.0]


def test_stable_run_resets_the_delay() -> None:
    """A crash after a run of at least stable_after_s restarts with the base delay again."""
    policy = RestartPolicy(base_s=0.5, cap_s=30.0, stable_after_s=60.0, jitter=0.0)
    assert delays(policy, slot=0, crashes=4) == [0.5, 1.0, 2.0, 4.0]
    assert policy.record_crash(0, started_at=100.0, now=160.0) == 160.5  # ran exactly 60 s
    assert delays(policy, slot=0, crashes=2, start=200.0) == [1.0, 2.0]


def test_short_run_does_not_reset_the_delay() -> None:
    """A crash after a run shorter than stable_after_s keeps growing the delay."""
    policy = RestartPolicy(base_s=0.5, cap_s=30.0, stable_after_s=60.0, jitter=0.0)
    delays(policy, slot=0, crashes=3)
    assert policy.record_crash(0, started_at=100.0, now=159.9) == pytest.approx(159.9 + 4.0)


def test_five_crashes_within_a_minute_is_a_crash_loop() -> None:
    """crash_looping turns true at the 5th crash within 60 s, counting crashes of every slot."""
    policy = RestartPolicy()
    for i, now in enumerate([10.0, 20.0, 30.0, 40.0]):
        policy.record_crash(i % 2, started_at=now - 1, now=now)
        assert not policy.crash_looping(now)
    policy.record_crash(2, started_at=49.0, now=50.0)
    assert policy.crash_looping(50.0)


def test_spread_out_crashes_are_not_a_crash_loop() -> None:
    """Crashes 20 s apart never put 5 in one 60 s window, however many there are."""
    policy = RestartPolicy()
    for n in range(20):
        now = 20.0 * n
        policy.record_crash(0, started_at=now - 1, now=now)
        assert not policy.crash_looping(now)


def test_crash_loop_ends_when_the_window_passes() -> None:
    """Once the burst of crashes is older than the window, crash_looping is false again."""
    policy = RestartPolicy()
    for now in (1.0, 2.0, 3.0, 4.0, 5.0):
        policy.record_crash(0, started_at=now - 0.5, now=now)
    assert policy.crash_looping(5.0)
    assert not policy.crash_looping(5.0 + 60.0 + 1.0)


def test_backoff_without_jitter_doubles_up_to_the_cap() -> None:
    """Backoff.next_delay is base·2ⁿ⁻¹ after n failures, never above cap_s, and counts failures."""
    backoff = Backoff(base_s=0.1, cap_s=1.0, jitter=0.0)
    assert [backoff.next_delay() for _ in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff.failures == 6


def test_backoff_reset_starts_over() -> None:
    """After reset() the next delay is the base again."""
    backoff = Backoff(base_s=0.25, cap_s=10.0, jitter=0.0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.failures == 0
    assert backoff.next_delay() == 0.25


@pytest.mark.parametrize(("draw", "factor"), [(0.0, 1.0), (0.5, 0.75), (0.999999, 0.5)])
def test_backoff_jitter_takes_off_a_random_fraction(draw: float, factor: float) -> None:
    """The jitter removes up to `jitter` of the delay: random()=0 keeps it, random()→1 halves it at 0.5."""
    backoff = Backoff(base_s=2.0, cap_s=10.0, jitter=0.5, rng=FixedRandom(draw))
    assert backoff.next_delay() == pytest.approx(2.0 * factor, rel=1e-5)


def test_backoff_jittered_delays_stay_in_bounds() -> None:
    """With a real seeded RNG, every jittered delay is within [(1-jitter)·nominal, nominal] and positive."""
    backoff = Backoff(base_s=0.1, cap_s=10.0, jitter=0.5, rng=random.Random(7))
    for n in range(1, 40):
        nominal = min(10.0, 0.1 * 2 ** (n - 1))
        assert 0 < nominal * 0.5 <= backoff.next_delay() <= nominal


def test_backoff_survives_very_many_failures() -> None:
    """Thousands of consecutive failures neither overflow nor exceed the cap."""
    backoff = Backoff(base_s=0.1, cap_s=10.0, jitter=0.0)
    for _ in range(5000):
        delay = backoff.next_delay()
    assert delay == 10.0
