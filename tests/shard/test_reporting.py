"""A shard's health in its status-board slot: a batch write that never returns is a Postgres that
does not answer (stopped, frozen, cut off without a reset), which no socket error ever reports."""

from __future__ import annotations

from common.status import StatusBoard
from shard import reporting
from shard.reporting import POSTGRES_STALLED_S, Report


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_a_write_that_hangs_turns_postgres_unhealthy_until_it_ends(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    monkeypatch.setattr(reporting.time, "monotonic", clock)
    board = StatusBoard(1)
    report = Report(board, 0, "test-0")
    report.reach.recovered("postgres", 0)
    with report.writing():
        clock.now += POSTGRES_STALLED_S - 1
        report.publish()
        assert board.read(0).postgres_ok, "a slow write is not a stalled one"
        clock.now += 2
        report.publish()
        assert not board.read(0).postgres_ok
    report.publish()
    assert board.read(0).postgres_ok
