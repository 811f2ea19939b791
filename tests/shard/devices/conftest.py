"""Replays delete the visits they rebuild by one of two paths (replay._delete_visits): both are tested."""

from __future__ import annotations

import pytest

from shard.devices import replay


@pytest.fixture(params=["ids sent whole", "ids narrowed first"])
def visit_deletion(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """As many geofences as a large fleet has (0: every replay narrows its ids first), or as few as these tests use."""
    if request.param == "ids narrowed first":
        monkeypatch.setattr(replay, "_IDS_SENT_WHOLE", 0)
    return request.param
