"""Stream trimming that respects every reader (skeleton: filled in by the next commits)."""

from __future__ import annotations

from common.config import Settings
from common.status import StatusBoard
from supervisor.maintenance import Duty

TRIM_EVERY_S = 5.0


def stream_duty(settings: Settings, board: StatusBoard) -> Duty | None:
    """The stream duty of the maintenance process."""
    return Duty("stream", TRIM_EVERY_S, lambda: None)
