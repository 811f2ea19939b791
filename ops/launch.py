"""The `processor` entry point: stop signals are held before the slow imports (common/early_signals.py)."""

from __future__ import annotations

from common import early_signals, standard_fds


def main() -> int:
    early_signals.hold()
    standard_fds.reserve()
    from ops.cli import main as run_command_line

    return run_command_line()
