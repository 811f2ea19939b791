"""Benchmark-only: PROCESSOR_BENCH_PROFILE=DIR runs each shard under cProfile and writes
DIR/shard-<index>.prof when the shard returns (a graceful stop; a crash or SIGKILL writes
nothing). Like PROCESSOR_TEST_CRASH it is not a setting: read once when the shard starts,
unset in production, where this costs one environment lookup.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

PROFILE_ENV = "PROCESSOR_BENCH_PROFILE"


@contextlib.contextmanager
def profiled(index: int) -> Iterator[None]:
    directory = os.environ.get(PROFILE_ENV)
    if not directory:
        yield
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        path = Path(directory) / f"shard-{index}.prof"
        path.parent.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(path)
