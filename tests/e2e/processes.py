"""Real `processor` processes for end-to-end tests, and polling with a deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import orjson

from scripts.toolkit.processes import PROCESSOR, ROOT, catches, children, proc_title

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "") -> T:
    """Poll until `condition()` is truthy; fail with `what` when the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or condition}")
        time.sleep(interval_s)


def stop_holding(pids: list[int], holding: Callable[[], bool], timeout_s: float = 30.0, what: str = "") -> None:
    """SIGSTOP the processes at a moment they hold pending entries (`holding()`), polled with a deadline.

    A shard writing a trickle's batch alone has no read outstanding (shard/intake.py), so one
    stopped right after an ACK may hold nothing, ever: it is let go on (SIGCONT) and stopped again.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(holding, min(1.0, max(0.05, deadline - time.monotonic())), what=what)
            return
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.05)


class ProcessorProcess:
    """`processor <args>` in its own session, logging JSON lines to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.log_path = log_path
        self.log_file = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env}
        self.proc = subprocess.Popen(
            [*PROCESSOR, *(args or ("run",))],
            env=full_env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def shard_pids(self) -> list[int]:
        """The supervisor's children titled as shards (not the HTTP process, nor a child not yet titled)."""
        return [pid for pid in children(self.pid) if proc_title(pid).startswith("processor: shard ")]

    def wait_for_shards(self, count: int, timeout_s: float = 30.0) -> list[int]:
        return wait_for(lambda: len(p := self.shard_pids()) == count and p, timeout_s, what=f"{count} shards")

    def logs(self) -> list[dict]:
        # The last piece is either empty or a line some process is still writing: not yet a log line.
        *lines, _ = self.log_path.read_bytes().split(b"\n")
        return [orjson.loads(line) for line in lines if line.startswith(b"{")]

    def log_messages(self) -> list[str]:
        return [entry["msg"] for entry in self.logs()]

    def halted_reason(self) -> str:
        """The reason of the supervisor's `supervisor halted` line (there must be one)."""
        halted = [entry for entry in self.logs() if entry["msg"] == "supervisor halted"]
        assert halted, self.log_messages()[-10:]
        return str(halted[0]["reason"])

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send `signum`; SIGTERM only once the entry point holds it (ops/launch.py).

        Before the launcher's first line the interpreter is still starting (~20-30 ms), and
        SIGTERM meets the kernel's default there: death by the signal. A test that stops a
        processor whose work an earlier one had already settled would land there now and then.
        """
        if signum == signal.SIGTERM:
            wait_for(lambda: self.proc.poll() is not None or catches(self.pid, signum), 30,
                     what="the entry point to hold SIGTERM")
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float = 60.0) -> int:
        return self.proc.wait(timeout=timeout_s)

    def close(self) -> None:
        """Kill the whole process group, whatever state the test left it in."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.log_file.close()
