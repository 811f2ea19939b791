"""The status board's records read whole across processes: no counter seen going back, even mid-write."""

from __future__ import annotations

import os
import signal

from common.status import MaintenanceState, ShardStatus, SlotState, StatusBoard, SupervisorState

WRITES = 200_000


def test_a_reader_never_sees_a_counter_go_back_while_a_shard_writes() -> None:
    """A forked writer publishes processed = 1, 2, 3, … as fast as it can (as a shard does, from
    another process); the reader meanwhile sees every counter only grow, and never a record mixed
    from two writes (processed and batches are always written equal)."""
    board = StatusBoard(1)
    pid = os.fork()
    if pid == 0:  # the writer
        try:
            for n in range(1, WRITES + 1):
                board.write(0, ShardStatus(heartbeat=float(n), pid=n, processed=n, batches=n, redis_ok=True))
        finally:
            os._exit(0)
    seen, reads, mixed, backwards = 0, 0, 0, 0
    try:
        while True:
            status = board.read(0)
            reads += 1
            mixed += status.processed != status.batches or (status.processed and not status.redis_ok)
            backwards += status.processed < seen
            seen = max(seen, status.processed)
            if seen == WRITES:
                break
    finally:
        os.waitpid(pid, 0)
    assert (backwards, mixed) == (0, 0), f"{backwards} reads went back, {mixed} were mixed, of {reads}"


def test_the_supervisors_part_reads_whole_while_it_is_written() -> None:
    """The supervisor's part (its beat and every slot) is never read mixed from two writes."""
    board = StatusBoard(3)
    pid = os.fork()
    if pid == 0:
        try:
            for n in range(1, WRITES // 4 + 1):
                slots = tuple(SlotState(True, n, float(n), n) for _ in range(3))
                board.write_supervisor(SupervisorState(n, False, float(n), slots))
        finally:
            os._exit(0)
    mixed, beat = 0, 0.0
    try:
        while beat < WRITES // 4:
            state = board.read_supervisor()
            beat = state.beat
            mixed += any(slot.restarts != state.pid or slot.started_at != beat for slot in state.slots)
    finally:
        os.waitpid(pid, 0)
    assert mixed == 0


def test_a_writer_killed_mid_write_leaves_the_last_whole_record() -> None:
    """A writer stopped while it fills the next copy (SIGKILL between the fields) leaves the
    record as it last wrote it whole: the successor continues from there, not from zero."""
    board = StatusBoard(2)
    board.write(1, ShardStatus(processed=41, dead_lettered=2))
    board.write(1, ShardStatus(processed=42, dead_lettered=3))
    board.write_maintenance(MaintenanceState(lost=7, pass_at=1.0))
    pid = os.fork()
    if pid == 0:
        try:  # what a kill inside pack_into leaves: the next copy of each record half written (zeroed)
            for record in (board._slots[1], board._maintenance):  # noqa: SLF001
                sequence = record._SEQUENCE.unpack_from(board._map, record.at)[0]  # noqa: SLF001
                at = record._copy_at(sequence + 1)  # noqa: SLF001
                board._map[at : at + record.layout.size] = bytes(record.layout.size)  # noqa: SLF001
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    assert (board.read(1).processed, board.read(1).dead_lettered) == (42, 3)
    assert board.read_maintenance() == MaintenanceState(lost=7, pass_at=1.0)
    assert board.read(0) == ShardStatus()
