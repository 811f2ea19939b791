"""The signals between the supervisor and its children, beyond SIGTERM (stop and drain)."""

from __future__ import annotations

import signal

# The supervisor's "cut the drain short", after a second stop signal. Not a second SIGTERM: a
# SIGTERM sent to the whole process group (systemd's KillMode, `tini -g`, `kill -- -PGID`)
# reaches each shard directly and again through the supervisor, and the two read as a hurry.
HURRY_SIGNAL = signal.SIGUSR1
# What a child ignores: the supervisor decides what a hang-up or Ctrl-\ means for them all.
IGNORED_BY_CHILDREN = (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR2)


def ignore_group_signals() -> None:
    """In a child: the signals that reach the whole process group are the supervisor's to act on."""
    for signum in IGNORED_BY_CHILDREN:
        signal.signal(signum, signal.SIG_IGN)
