"""Standard input, output and error kept open, on /dev/null if the caller closed them.

A process started with one of them closed (`processor claim 0<&-`, a supervisor that closes
stdin) has that descriptor free, and the next file opened takes it: uvloop's epoll handle
became fd 0, and libuv aborts the process (SIGABRT, exit 134) when it closes a loop whose
handle is not above stderr. Python has already noted which ones were closed (sys.stdin and
friends are None then), so the commands still tell a closed stream from /dev/null.
"""

from __future__ import annotations

import os

_MODES = {0: os.O_RDONLY, 1: os.O_WRONLY, 2: os.O_WRONLY}


def reserve() -> None:
    """Open /dev/null on each of fds 0-2 that is closed."""
    for fd, mode in _MODES.items():
        try:
            os.fstat(fd)
        except OSError:
            placeholder = os.open(os.devnull, mode)
            if placeholder != fd:
                os.dup2(placeholder, fd)
                os.close(placeholder)
            os.set_inheritable(fd, True)
