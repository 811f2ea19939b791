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


def test_only_the_letters_written_are_logged_and_counted_as_dead_lettered(caplog) -> None:  # type: ignore[no-untyped-def]
    """A poison entry no longer pending here (another consumer wrote its letter, or acknowledged it)
    was logged 'entry dead-lettered' though no letter was written: the log and the counter disagreed."""
    from shard.batch import Batch
    from shard.dead_letters import DeadLetter

    report = Report(StatusBoard(1), 0, "test-0")
    batch = Batch([b"1-0", b"2-0"], dead=[DeadLetter(b"1-0", [b"data", b"x"], "not JSON", "decode", 1),
                                          DeadLetter(b"2-0", [b"data", b"y"], "not JSON", "decode", 1)])
    caplog.set_level("INFO", logger="processor")
    report.lettered(1)  # as ConsumerStream.settle says of the one letter it wrote
    report.settled(batch, {b"2-0"})
    assert report.dead_lettered == 1
    written = [r for r in caplog.records if r.getMessage() == "entry dead-lettered"]
    assert [r.source_id for r in written] == ["2-0"]  # type: ignore[attr-defined]
    assert any("letter not written here" in r.getMessage() and r.source_id == "1-0" for r in caplog.records)  # type: ignore[attr-defined]
