"""The operator's failover playbook, in its short form, passes on this machine."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
SCRIPT = Path(__file__).parents[2] / "scripts" / "failover_test.sh"


def test_failover_playbook_quick(redis_url, pg_admin_url):
    """Two instances, one SIGKILLed under load: the script prints the lag timeline and proves exact counts."""
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": pg_admin_url}
    result = subprocess.run([str(SCRIPT), "--quick"], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SIGKILL instance alpha" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("PASS:")
