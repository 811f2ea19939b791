"""Fixtures of the tests of common/."""

from __future__ import annotations

import pytest

from common import logs


@pytest.fixture
def fresh_secrets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No registered secrets (common.logs._SECRETS) but this test's own: what it masks
    was registered by the test itself, not left behind by an earlier one."""
    secrets: list[str] = []
    monkeypatch.setattr(logs, "_SECRETS", secrets)
    return secrets
