"""Fixtures of the tests of common/."""

from __future__ import annotations

import pytest

from common import logs


@pytest.fixture
def fresh_secrets(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """An empty set of registered secrets (common.logs._SECRETS) for this test only: what it masks
    was registered by the test itself, not left behind by an earlier one."""
    secrets: set[str] = set()
    monkeypatch.setattr(logs, "_SECRETS", secrets)
    return secrets
