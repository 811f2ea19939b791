"""The HTTP process: /healthz and /metrics, out of the supervisor's way.

The supervisor binds HTTP_PORT before its first fork and forks this process, titled
`processor: http [INSTANCE_ID]`, which inherits the listening socket and the status board.
No client and no Redis call can then delay the supervisor's handling of signals, dead
shards or heartbeats: they only ever wait in here. This process runs threads (one per
connection, one for the stream gauges, one accepting) and therefore never forks; the
supervisor, which forks, stays single-threaded. It is supervised like a shard: restarted
with backoff if it dies, stopped with SIGTERM at shutdown.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

from common.config import Settings
from common.errors import ExitCode
from common.panic import Panic
from common.status import StatusBoard
from supervisor.children import set_up_helper
from supervisor.http import HealthServer
from supervisor.observer import Observer, StreamGauges

log = logging.getLogger("processor.http")

ORPHAN_CHECK_S = 1.0  # how often the main thread looks whether the supervisor is still there
ACCEPT_POLL_S = 0.5


class HttpProcess:
    """Constructed in the child after fork; `run()` is its whole life and returns the exit status."""

    def __init__(self, settings: Settings, listener: socket.socket, board: StatusBoard) -> None:
        self.settings = settings
        self.listener = listener
        self.board = board
        self.supervisor_pid = os.getppid()
        self.panic = Panic(settings, "http", self.panic_state)

    def run(self) -> int:
        """Post-fork set-up, then serve until SIGTERM or until the supervisor is gone."""
        set_up_helper(self.settings, "http", self.panic)
        try:
            return self.serve()
        except Exception as exc:
            self.panic.crash(type(exc), exc, exc.__traceback__, where="http main thread")

    def serve(self) -> int:
        gauges = StreamGauges(self.settings)
        server = HealthServer(self.listener, Observer(self.settings, self.board, gauges))
        gauges.start()
        accept = threading.Thread(target=server.serve_forever, args=(ACCEPT_POLL_S,), name="http-accept", daemon=True)
        accept.start()
        log.info("serving /healthz and /metrics", extra={"port": self.listener.getsockname()[1]})
        while True:
            told = signal.sigtimedwait({signal.SIGTERM}, ORPHAN_CHECK_S)
            if told is None and os.getppid() != self.supervisor_pid:
                log.error("supervisor gone; http process exiting")
                return ExitCode.OK
            # Only the supervisor's: a SIGTERM to the whole process group reaches this process
            # too, and /healthz must answer (503, stopping) until the shards are gone.
            if told is not None and told.si_pid == self.supervisor_pid:
                break
        log.info("http process stopping")
        return ExitCode.OK  # connections still open end with the process

    def panic_state(self) -> dict[str, object]:
        """What a panic dump shows of the HTTP process."""
        return {"supervisor_pid": self.supervisor_pid, "threads": [t.name for t in threading.enumerate()]}
