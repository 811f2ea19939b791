"""`processor run` whose log reader goes away (`processor run | jq`, the jq ended first): the
service goes on, its logs go nowhere, and a stop is still a clean one (SPEC §5: exit 0)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import orjson
import pytest

from tests.e2e.processes import PROCESSOR, ROOT, wait_for
from tests.e2e.verify import assert_exact, stored_count, wait_settled

pytestmark = pytest.mark.e2e

FIXES = 40


def test_run_outlives_the_reader_of_its_logs(env, redis_client, stream_key, database_url, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Every log line after the reader left raised BrokenPipeError: a traceback on stderr each time,
    and at the stop the final flush failed into a panic dump and exit 70."""
    read_end, write_end = os.pipe()
    stderr = tmp_path / "stderr"
    with open(stderr, "wb") as errors_file:
        proc = subprocess.Popen([*PROCESSOR, "run"], cwd=ROOT, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env},
                                stdin=subprocess.DEVNULL, stdout=write_end, stderr=errors_file, start_new_session=True)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as logs:
            for line in logs:
                if b'"shard spawned"' in line:
                    break
        now_ms = 1_700_000_000_000
        for i in range(FIXES):
            redis_client.xadd(stream_key, {b"data": orjson.dumps({"device_id": f"d{i % 4}", "ts": now_ms + i, "lat": 1.0, "lon": 2.0})})
        wait_for(lambda: stored_count(database_url) == FIXES, 60, what="every fix stored with nobody reading the logs")
        wait_settled(redis_client, database_url, stream_key, 30)
        assert_exact(redis_client, database_url, stream_key)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    errors = stderr.read_text()
    assert "Traceback" not in errors and "Logging error" not in errors, errors
    lines = errors.splitlines()
    assert lines and all("logs are dropped from now on" in line for line in lines), errors
    panic_dir = Path(env["PANIC_DIR"])
    assert not panic_dir.exists() or not list(panic_dir.iterdir())
