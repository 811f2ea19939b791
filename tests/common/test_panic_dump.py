"""Panic dumps appear in PANIC_DIR whole or not at all (SPEC §5)."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from common import panic
from common.panic import dump_dir_problem
from common.config import Settings


def dumper(folder: Path) -> panic.Panic:
    settings = Settings.from_env({"PANIC_DIR": str(folder), "DATABASE_URL": "postgresql://app:hunter2@db/gps"})
    return panic.Panic(settings, "shard-0", state=lambda: {"in_flight": ["1-0", "2-0"]})


def test_a_dump_is_complete_json_and_leaves_nothing_else_behind(tmp_path: Path) -> None:
    path = dumper(tmp_path / "panic").dump("Traceback: boom", where="main task")

    assert path is not None
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    document = orjson.loads(path.read_bytes())
    assert document["state"] == {"in_flight": ["1-0", "2-0"]}
    assert "hunter2" not in path.read_text()


def test_a_dump_that_cannot_be_finished_leaves_no_file_a_reader_would_pick_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader polling for panic-*.json (the e2e tests, a log shipper) once read an empty
    file the shard had created but not yet written; now the name appears only when the
    bytes are all there, and a failed write is logged, not left half done."""
    observed: list[list[str]] = []

    def failing_replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        observed.append(sorted(p.name for p in (tmp_path / "panic").glob("panic-*.json")))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(panic.os, "replace", failing_replace)

    assert dumper(tmp_path / "panic").dump("Traceback: boom", where="main task") is None
    assert observed == [[]]  # the bytes were written before the dump's name existed
    assert list((tmp_path / "panic").iterdir()) == []


def test_a_dump_directory_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    """The supervisor says at start-up that dumps cannot be written (a read-only or virtual file
    system): a panic would find out too late. A directory it may make is made, and left clean."""
    made = tmp_path / "new" / "panic"
    assert dump_dir_problem(made) is None and made.is_dir() and not list(made.iterdir())
    assert dump_dir_problem(Path("/proc/processor-panic")) is not None


def test_a_panic_without_a_dump_logs_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """With PANIC_DIR unwritable the traceback went nowhere: the log line now carries it."""
    exits: list[int] = []
    monkeypatch.setattr(panic.os, "_exit", exits.append)
    monkeypatch.setattr(panic.logging, "shutdown", lambda: None)

    def unwritable(path: Path, data: bytes) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(panic, "publish", unwritable)
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        dumper(tmp_path / "panic").crash(RuntimeError, exc, exc.__traceback__, where="main task")
    [record] = [r for r in caplog.records if r.getMessage() == "panic: uncaught exception"]
    assert exits == [70] and record.dump is None  # type: ignore[attr-defined]
    assert "RuntimeError: boom" in record.traceback and "test_a_panic_without_a_dump" in record.traceback  # type: ignore[attr-defined]


def test_a_sigkill_the_supervisor_sent_is_not_blamed_on_memory() -> None:
    from supervisor.children import describe_exit

    assert describe_exit(9)[0] == "killed by SIGKILL (probably out of memory)"  # a wait status: killed by signal 9
    assert describe_exit(9, killed_by_us=True)[0] == "killed by SIGKILL (the supervisor's)"
