"""Replays delete the visits they rebuild by one of two paths (replay.delete_replayed_visits): both are tested."""

from __future__ import annotations

import pytest

from shard.devices import replay


@pytest.fixture(params=["ids sent whole", "ids narrowed first"])
def visit_deletion(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Ids in more runs than any set of these tests (0: every replay narrows them first), or as these tests have them."""
    if request.param == "ids narrowed first":
        monkeypatch.setattr(replay, "_RUNS_SENT_WHOLE", 0)
    return request.param
