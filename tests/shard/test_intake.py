"""The intake: one batch waits for its turn, later reads join it, and the reader waits meanwhile."""

from __future__ import annotations

import asyncio

import pytest

from common.stream_pages import PAGE_BUDGET_BYTES
from shard.batch import Batch
from shard.intake import Intake


def batch(*ids: bytes, size_bytes: int = 0) -> Batch:
    return Batch(list(ids), size_bytes=size_bytes)


async def settled(task: asyncio.Task) -> bool:  # type: ignore[type-arg]
    for _ in range(5):
        await asyncio.sleep(0)
    return task.done()


def test_a_later_batch_joins_the_waiting_one_while_there_is_room() -> None:
    async def go() -> None:
        intake = Intake(batch_size=3)
        await intake.put(batch(b"1-0"))
        await intake.put(batch(b"2-0", b"3-0"))
        putting = asyncio.create_task(intake.put(batch(b"4-0")))  # no room: waits for a take
        assert not await settled(putting)
        first = await intake.take()
        assert first is not None and first.ids == [b"1-0", b"2-0", b"3-0"]
        await putting
        second = await intake.take()
        assert second is not None and second.ids == [b"4-0"]

    asyncio.run(go())


def test_a_waiting_batch_holds_no_more_of_the_stream_than_one_read_may() -> None:
    """Claimed pages of large entries join it only while their bytes fit the read budget."""

    async def go() -> None:
        intake = Intake(batch_size=500)
        half = PAGE_BUDGET_BYTES // 2
        await intake.put(batch(b"1-0", size_bytes=half))
        await intake.put(batch(b"2-0", size_bytes=half))  # fits exactly
        putting = asyncio.create_task(intake.put(batch(b"3-0", size_bytes=1)))
        assert not await settled(putting)
        first = await intake.take()
        assert first is not None and (first.ids, first.size_bytes) == ([b"1-0", b"2-0"], PAGE_BUDGET_BYTES)
        await putting

    asyncio.run(go())


def test_the_reader_reads_a_whole_batch_that_may_block_when_none_waits() -> None:
    async def go() -> None:
        assert await Intake(batch_size=500).room() == (500, True)

    asyncio.run(go())


def test_the_reader_waits_while_a_batch_waits_until_asked_for_a_top_up() -> None:
    """The top-up read may bring what the waiting batch has room for, and must not block."""

    async def go() -> None:
        intake = Intake(batch_size=10)
        await intake.put(batch(b"1-0", b"2-0"))
        room = asyncio.create_task(intake.room())
        assert not await settled(room) and intake.reader_parked
        topping = asyncio.create_task(intake.top_up())
        assert await room == (8, False)
        await intake.put(batch(b"3-0"))
        intake.read_ended()
        await topping
        taken = await intake.take()
        assert taken is not None and taken.ids == [b"1-0", b"2-0", b"3-0"]
        assert await intake.room() == (10, True)

    asyncio.run(go())


def test_a_top_up_is_not_waited_for_when_the_reader_is_busy_or_the_batch_is_full() -> None:
    async def go() -> None:
        intake = Intake(batch_size=2)
        await intake.put(batch(b"1-0"))
        await asyncio.wait_for(intake.top_up(), 0.05)  # the reader is not parked: reading already
        await intake.put(batch(b"2-0"))
        room = asyncio.create_task(intake.room())
        assert not await settled(room)
        await asyncio.wait_for(intake.top_up(), 0.05)  # full: nothing to add
        assert not room.done()
        await intake.take()
        assert await room == (2, True)

    asyncio.run(go())


def test_a_stopping_reader_is_let_go_of() -> None:
    async def go() -> None:
        intake = Intake(batch_size=5)
        await intake.put(batch(b"1-0"))
        room = asyncio.create_task(intake.room())
        assert not await settled(room)
        intake.close_reader()
        assert await room == (0, False)

    asyncio.run(go())


@pytest.mark.parametrize("reader_answers", [False, True])
def test_a_top_up_waits_no_longer_than_its_bound(monkeypatch: pytest.MonkeyPatch, reader_answers: bool) -> None:
    """A reader stuck in its read (Redis down, retrying) delays the waiting batch by TOP_UP_WAIT_S at most."""
    monkeypatch.setattr("shard.intake.TOP_UP_WAIT_S", 0.05)

    async def go() -> None:
        intake = Intake(batch_size=5)
        await intake.put(batch(b"1-0"))
        room = asyncio.create_task(intake.room())
        assert not await settled(room)
        topping = asyncio.create_task(intake.top_up())
        await room
        if reader_answers:
            intake.read_ended()
        await asyncio.wait_for(topping, 1)
        assert not intake.top_up_asked

    asyncio.run(go())


def test_while_pulling_the_reader_waits_to_be_asked_even_for_a_first_entry() -> None:
    """A trickle's batch is being written: the next is read when asked (one read, not one at
    once for the first entry and a top-up for the rest); nothing read, the reader reads on its own."""

    async def go() -> None:
        intake = Intake(batch_size=10)
        intake.pull(True)
        room = asyncio.create_task(intake.room())
        assert not await settled(room) and intake.reader_parked
        topping = asyncio.create_task(intake.top_up())
        assert await room == (10, False)
        intake.read_ended()  # found nothing
        await topping
        intake.pull(False)
        assert await intake.room() == (10, True)

    asyncio.run(go())
