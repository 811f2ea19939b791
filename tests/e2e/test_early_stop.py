"""A stop signal sent while `processor` is still importing (0.3-1 s) is honoured, not fatal."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from common.errors import ExitCode
from supervisor.migrations import MIGRATION_LOCK_KEY
from tests.e2e.processes import ROOT, wait_for

pytestmark = pytest.mark.e2e


# Loaded by the child as its sitecustomize: the import of psycopg (the first slow one, after
# the launcher's first line) waits for the gate file, so the test signals at a known point
# of start-up however busy the machine is.
GATE = """
import os, sys, time

class _Gate:
    def find_spec(self, name, path=None, target=None):
        if name == "psycopg":
            while not os.path.exists(os.environ["IMPORT_GATE"]):
                time.sleep(0.01)
        return None

sys.meta_path.insert(0, _Gate())
"""


def gated(env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], Path]:
    """`env` with imports held at psycopg until the returned file exists."""
    site = tmp_path / "gate"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(GATE)
    gate = tmp_path / "open"
    return {**env, "PYTHONPATH": f"{site}:{ROOT}", "IMPORT_GATE": str(gate)}, gate


def signal_while_importing(processor, gate: Path) -> None:  # type: ignore[no-untyped-def]
    processor.signal(signal.SIGTERM)  # once the launcher holds it (ProcessorProcess.signal)
    gate.touch()


def test_sigterm_during_start_up_stops_run_with_exit_0(env, start_processor, tmp_path) -> None:  # type: ignore[no-untyped-def]
    gated_env, gate = gated(env, tmp_path)
    processor = start_processor(gated_env)
    signal_while_importing(processor, gate)
    assert processor.wait(30) == ExitCode.OK
    messages = processor.log_messages()
    assert "supervisor starting" in messages and "shard spawned" not in messages, messages


def test_an_operator_command_keeps_the_default_stop(env, start_processor, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Only `run` takes over the signals: a command stopped while starting still dies by the signal."""
    gated_env, gate = gated(env, tmp_path)
    processor = start_processor(gated_env, "lag")
    signal_while_importing(processor, gate)
    assert processor.wait(30) == -signal.SIGTERM


def test_sigterm_while_waiting_for_the_migration_lock_exits_0_and_applies_nothing(env, database_url, start_processor) -> None:  # type: ignore[no-untyped-def]
    """A container stopped while another instance migrates must not wait out the lock (or be SIGKILLed)."""
    with psycopg.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        processor = start_processor(env)
        wait_for(lambda: "waiting for the migration lock" in processor.log_messages(), what="the wait for the lock")
        processor.signal(signal.SIGTERM)
        assert processor.wait(15) == ExitCode.OK
        holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0] is None, "nothing applied"


def test_sigterm_while_a_migration_waits_for_a_table_lock_exits_0(env, database_url, start_processor) -> None:  # type: ignore[no-untyped-def]
    """Another session holds a lock migration 0006 needs: the supervisor, blocked in its statement,
    looked at no signal until the lock was released, however often it was asked to stop."""
    from supervisor.migrations import apply_migrations, load_migrations

    migrations = load_migrations()
    assert migrations[5].name == "geofence_history"
    apply_migrations(database_url, migrations[:5])
    with psycopg.connect(database_url) as holder:
        holder.execute("LOCK TABLE geofences IN ROW EXCLUSIVE MODE")
        processor = start_processor(env)
        wait_for(lambda: "migration waiting for a lock another session holds; trying again" in processor.log_messages(),
                 30, what="the wait for the table lock")
        processor.signal(signal.SIGTERM)
        assert processor.wait(15) == ExitCode.OK
        holder.rollback()
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == 5, "0006 not applied"


# `processor run` stopped by a signal held from its first line; then what the stop signals do.
AFTER_RUN = """
import os, signal, sys
from common import early_signals
early_signals.hold()
os.kill(os.getpid(), signal.SIGTERM)
from ops.cli import main
sys.argv = ["processor", "run"]
status = main()
print(status, all(signal.getsignal(s) == signal.SIG_IGN for s in early_signals.STOP_SIGNALS))
"""


def test_stop_signals_are_ignored_once_run_has_returned(env) -> None:  # type: ignore[no-untyped-def]
    """Python hands handlers back to the default while it shuts down: a late second SIGTERM was death (-15), not 0."""
    result = subprocess.run([sys.executable, "-c", AFTER_RUN], cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env},
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.split()[-2:] == ["0", "True"], result.stdout + result.stderr
