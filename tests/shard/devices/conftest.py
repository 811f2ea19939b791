"""Paths that must give the same result, each tested: how replays delete the visits they
rebuild (replay.delete_replayed_visits), how the state load finds stored devices (cache.py)."""

from __future__ import annotations

import pytest

from shard.devices import cache, replay


@pytest.fixture(params=["ids sent whole", "ids narrowed first"])
def visit_deletion(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Ids in more runs than any set of these tests (0: every replay narrows them first), or as these tests have them."""
    if request.param == "ids narrowed first":
        monkeypatch.setattr(replay, "_RUNS_SENT_WHOLE", 0)
    return request.param


@pytest.fixture(params=["each device looked up", "the planner's join"])
def device_lookup(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The state load finds stored devices by one of two joins (cache.FEW_DEVICES): both are tested."""
    monkeypatch.setattr(cache, "FEW_DEVICES", 1_000_000 if request.param == "each device looked up" else 0)
    return request.param
