"""cancel_and_wait ends tasks that a single cancellation does not: Python 3.11's wait_for drops
cancellations that redis-py's commands then never see."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio

from common import tasks
from common.tasks import cancel_and_wait


def test_a_task_that_drops_two_cancellations_is_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task that carries on after two cancellations (as one inside wait_for may) ends at the third."""
    monkeypatch.setattr(tasks, "CANCEL_AGAIN_S", 0.05)
    dropped = []

    async def stubborn() -> None:
        for _ in range(2):
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                dropped.append(True)
        await asyncio.sleep(10)

    async def go() -> asyncio.Task[None]:
        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_and_wait([task, None]), 5)
        return task

    task = asyncio.run(go())
    assert task.cancelled() and len(dropped) == 2


def test_tasks_inside_redis_commands_are_ended_every_time(redis_url: str, stream_key: str) -> None:
    """A loop of SETs (as the liveness duty is) cancelled at points along a command's way out:
    cancel_and_wait returns every time, within the deadline, with the task ended."""

    async def go() -> list[float]:
        client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=5)
        await client.ping()
        took = []
        try:
            for steps in range(40):
                async def setting() -> None:
                    while True:  # a liveness duty that refreshes often
                        await client.set(f"{stream_key}:alive:t", b"1", ex=5)
                        await asyncio.sleep(0.001)

                task = asyncio.create_task(setting())
                for _ in range(steps % 8):
                    await asyncio.sleep(0)
                started = time.monotonic()
                await asyncio.wait_for(cancel_and_wait([task]), 10)
                took.append(time.monotonic() - started)
                assert task.done()
        finally:
            await client.aclose()
        return took

    took = asyncio.run(go())
    assert max(took) < 10
