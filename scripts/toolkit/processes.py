"""Processes seen through /proc, and the one command that starts the processor.

Every script and test that starts `processor <subcommand>` takes the command from
`PROCESSOR`; every one that lists a supervisor's shards or a postmaster's backends uses
`children()`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

#: The repository root: the working directory for the processor and for `python -m scripts.…`.
ROOT = Path(__file__).resolve().parents[2]

#: The processor's command line, without its subcommand (`run`, `migrate`, ...).
PROCESSOR = [sys.executable, "-m", "ops"]

#: Clock ticks per second, the unit of the CPU times in /proc/<pid>/stat.
CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, ...]; None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """True while `pid` runs; zombies count as dead (PID 1 here may reap orphans only every second)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    """Direct children of `pid`, ascending (a supervisor's shards, a postmaster's backends)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields is not None and fields[1] == str(pid):
                found.append(int(entry.name))
    return sorted(found)


def signal_all(pids: list[int], signum: int) -> None:
    """Send `signum` to each of `pids` that still exists: a backend listed while it was exiting
    is a zombie that accepts the first signal and is reaped before the second."""
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def cpu_ticks(pid: int, with_children: bool = False) -> int:
    """utime+stime (and cutime+cstime of reaped children) in clock ticks; 0 if gone."""
    fields = stat_fields(pid)
    if fields is None:
        return 0
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks


def status(pid: int) -> dict[str, str]:
    """The fields of /proc/<pid>/status, values unparsed; empty if gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def status_kb(pid: int, *keys: str) -> dict[str, int]:
    """The named kB values of /proc/<pid>/status (VmRSS, VmHWM, ...); missing ones left out."""
    fields = status(pid)
    return {key: int(fields[key].split()[0]) for key in keys if key in fields}


def catches(pid: int, signum: int) -> bool:
    """True once `pid` has a handler for `signum` (its SigCgt mask); False if gone."""
    return bool(int(status(pid).get("SigCgt", "0"), 16) >> (signum - 1) & 1)


def proc_title(pid: int) -> str:
    """The command line (or the title a process set for itself), "?" if gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of a log file; one line saying why when it cannot be read."""
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as e:
        return [f"(no log: {e})"]
