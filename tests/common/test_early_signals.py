"""Stop signals held while a `processor` process starts (common/early_signals.py)."""

from __future__ import annotations

import signal

import pytest

from common import early_signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_supervisor_takes_what_arrived_before_its_handlers(signum: int) -> None:
    """Held signals are handed over once (to the supervisor's queue), then nothing is held."""
    before = signal.getsignal(signum)
    early_signals.hold()
    try:
        signal.raise_signal(signum)
        assert early_signals.taken() == [signum]
        assert early_signals.taken() == []
    finally:
        early_signals.release()
    assert signal.getsignal(signum) == before
