"""The benchmark's soak mode, in 18 seconds: exact accounting, a partition with fixes dropped, a kill, exit 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[1]


def test_soak_smoke(redis_url, pg_admin_url, tmp_path):
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.bench", "--only", "soak", "--soak-minutes", "0.3", "--rate", "300",
         "--kill-every-s", "6", "--sample-every-s", "3", "--redis-url", redis_url, "--database-url", pg_admin_url,
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    soak = json.loads(out.read_text())["results"][0]
    accounting = soak["accounting"]
    assert accounting["exact"] and accounting["produced"] == soak["sent"] > 0
    assert accounting["expired"] == 0 and accounting["dead_lettered"] == 0
    assert not accounting["hours_inconsistent"]
    assert any(p["rows"] for p in soak["partitions_dropped"].values()), soak["partitions_dropped"]
    assert accounting["rows_in_dropped_partitions"] > 0
    assert soak["exit_codes"] == [0, 0]
    assert soak["kills"] and all(k["restarted_after_s"] is not None for k in soak["kills"])
    assert soak["latency"][0]["not_seen"] == soak["latency"][1]["not_seen"] == 0
    assert "| t (s) |" in result.stdout
