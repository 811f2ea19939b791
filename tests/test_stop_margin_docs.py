"""The stop budget written in the container files and the docs is the code's.

The supervisor gives its shards DRAIN_TIMEOUT_S + STOP_MARGIN_S (common/timing.py) before
SIGKILL, so a container's stop grace period must exceed that. docker-compose.yml, the
Dockerfile, README.md and OPERATIONS.md each state the margin (and the grace period): when
the code's figure changes, the prose must change with it (a stale "+2 s" once survived).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from common.timing import STOP_MARGIN_S
from tests.test_deployment import DEFAULT_DRAIN_TIMEOUT_S, environment, parse_duration_s, service

ROOT = Path(__file__).parents[1]
FILES = ("docker-compose.yml", "Dockerfile", "README.md", "OPERATIONS.md")
SECONDS = r"(\d+(?:\.\d+)?) ?s\b"
# "4 s margin (`STOP_MARGIN_S`)", "+ 4 s (STOP_MARGIN_S)", "up to 4 s to close (STOP_MARGIN_S)"
MARGIN_BEFORE_NAME = re.compile(SECONDS + r"[^.;:\d]{0,30}?STOP_MARGIN_S")
# "DRAIN_TIMEOUT_S` + 4 s", "DRAIN_TIMEOUT_S (default 20) + 4 s", "DRAIN_TIMEOUT_S (20 s), plus up to 4 s"
MARGIN_AFTER_DRAIN = re.compile(r"DRAIN_TIMEOUT_S`?\s*(?:\([^)]*\)\s*)?,?\s*(?:\+|plus(?: up to)?)\s*" + SECONDS)
# "DRAIN_TIMEOUT_S (20 s)", "(default 20)", "`DRAIN_TIMEOUT_S` (20)", "for the default 20 s"
DRAIN_FIGURE = re.compile(r"DRAIN_TIMEOUT_S`? \((?:default )?(\d+)(?: s)?\)|for the default (\d+) ?s\b")
# "`stop_grace_period` is 30 s", "--stop-timeout 30", "The compose file uses 30 s"
GRACE_FIGURE = re.compile(r"stop_grace_period`? is " + SECONDS + r"|--stop-timeout (\d+)|compose file uses " + SECONDS)


def prose(name: str) -> str:
    """The file's text with comment markers dropped and lines joined, so a sentence may wrap."""
    lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
    if not name.endswith(".md"):  # in Markdown, `#` starts a heading, not a comment
        lines = [re.sub(r"^\s*#+\s?", "", line) for line in lines]
    return " ".join(lines)


def figures(pattern: re.Pattern[str], text: str) -> list[float]:
    return [float(next(group for group in match.groups() if group)) for match in pattern.finditer(text)]


def compose_grace_s() -> float:
    return parse_duration_s(service("processor")["stop_grace_period"])


def compose_drain_s() -> float:
    return float(environment(service("processor")).get("DRAIN_TIMEOUT_S", DEFAULT_DRAIN_TIMEOUT_S))


@pytest.mark.parametrize("name", FILES)
def test_every_stated_margin_is_stop_margin_s(name: str) -> None:
    """Each file states the margin at least once, and every figure it gives for it is STOP_MARGIN_S."""
    text = prose(name)
    stated = figures(MARGIN_BEFORE_NAME, text) + figures(MARGIN_AFTER_DRAIN, text)
    assert stated, f"{name} does not state the stop margin (`N s … STOP_MARGIN_S` or `DRAIN_TIMEOUT_S + N s`)"
    assert set(stated) == {STOP_MARGIN_S}, f"{name} gives the margin as {sorted(set(stated))} s; the code's is {STOP_MARGIN_S} s"


@pytest.mark.parametrize("name", FILES)
def test_stated_drain_and_grace_period_are_the_compose_files(name: str) -> None:
    """Where a file quotes the drain budget or the grace period, it is the compose file's value."""
    text = prose(name)
    assert set(figures(DRAIN_FIGURE, text)) <= {compose_drain_s()}, f"{name} quotes another DRAIN_TIMEOUT_S"
    assert set(figures(GRACE_FIGURE, text)) <= {compose_grace_s()}, f"{name} quotes another grace period"


def test_grace_period_covers_the_drain_and_the_margin() -> None:
    """stop_grace_period ≥ DRAIN_TIMEOUT_S + STOP_MARGIN_S: no drain is cut short by SIGKILL."""
    assert compose_grace_s() >= compose_drain_s() + STOP_MARGIN_S


def test_patterns_catch_a_stale_margin() -> None:
    """The extraction sees the phrasings that were once wrong, so a stale figure fails the tests above."""
    stale = "SIGTERM drains within DRAIN_TIMEOUT_S + 2 s; the supervisor's 2 s margin (STOP_MARGIN_S)"
    assert figures(MARGIN_AFTER_DRAIN, stale) + figures(MARGIN_BEFORE_NAME, stale) == [2.0, 2.0]
