"""Stopping asyncio tasks for certain, on a Python that can drop a cancellation.

Python 3.11's `asyncio.wait_for` returns its result and drops a cancellation that arrives as
the future it waits for completes (fixed in 3.12). redis-py sends every command through it
(with a socket timeout), so a task cancelled while a short command is on its way carries on
as if never cancelled: a loop that keeps a liveness key, say, which a shutdown then waits
for until it is killed. Every task the Processor stops is stopped here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

# A task still running this long after its cancellation is cancelled again. Short: a loop of
# commands (a SET, then the next) can drop several in a row, each one landing in a send.
CANCEL_AGAIN_S = 0.1


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel the tasks and return once every one has ended (their outcomes are left on them)."""
    pending = {task for task in tasks if task is not None and not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_AGAIN_S)


async def end_other_tasks() -> None:
    """Before a process's main coroutine (the loop's first task: no other awaits it) returns:
    end every other task of its loop, so that asyncio.run, which cancels what is left once
    and waits for it, never waits for ever."""
    current = asyncio.current_task()
    await cancel_and_wait(task for task in asyncio.all_tasks() if task is not current)
