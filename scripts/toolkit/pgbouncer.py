"""A throwaway PgBouncer in transaction pooling mode, in front of a Postgres server, for tests.

Each transaction may run on another server connection, and its pool is kept small so that
they do: what a session keeps (prepared statements, session settings, temporary tables)
does not follow a client from one transaction to the next. PgBouncer refuses to run as
root, so it runs as the `postgres` OS user, as the throwaway Postgres does.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

from scripts.toolkit.processes import alive
from scripts.toolkit.services import _runuser, _tail, _Throwaway, postgres_owner, postgres_reachable


def pgbouncer_binary() -> str | None:
    """The pgbouncer executable (Debian installs it in /usr/sbin), or None."""
    return shutil.which("pgbouncer", path=f"{os.environ.get('PATH', '')}:/usr/sbin")


class ThrowawayPgBouncer(_Throwaway):
    """PgBouncer on a free port, pooling every database of `server_url`'s server for `users` (trust)."""

    def __init__(self, server_url: str, users: list[str], pool_size: int = 2) -> None:
        super().__init__()
        self.server_url = server_url
        self.users = users
        self.pool_size = pool_size

    def url(self, user: str, database: str) -> str:
        return f"postgresql://{user}@127.0.0.1:{self._require_port()}/{database}"

    def _pid(self) -> int | None:
        try:
            pid = int((self.dir / "pgbouncer.pid").read_text().strip())  # type: ignore[operator]
        except (OSError, ValueError, TypeError):
            return None
        return pid if alive(pid) else None

    def start(self) -> Self:
        binary = pgbouncer_binary()
        if binary is None:
            raise RuntimeError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
        server = urlsplit(self.server_url)
        with self._starting():
            d = self._workdir("throwaway-pgbouncer-")
            (d / "users.txt").write_text("".join(f'"{user}" ""\n' for user in self.users))
            (d / "pgbouncer.ini").write_text(
                "[databases]\n"
                f"* = host={server.hostname} port={server.port or 5432}\n"
                "[pgbouncer]\n"
                f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
                f"auth_type = trust\nauth_file = {d / 'users.txt'}\n"
                f"pool_mode = transaction\ndefault_pool_size = {self.pool_size}\nmax_client_conn = 200\n"
                f"logfile = {d / 'pgbouncer.log'}\npidfile = {d / 'pgbouncer.pid'}\n"
            )
            if (owner := postgres_owner()) is not None:
                for path in (d, *d.iterdir()):
                    os.chown(path, *owner)
            command = [binary, "-d", str(d / "pgbouncer.ini")]
            if os.geteuid() == 0:
                command = [_runuser() or "runuser", "-u", "postgres", "--", *command]
            done = subprocess.run(command, cwd=d, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=30, check=False)
            if done.returncode:
                raise RuntimeError(f"pgbouncer failed to start (exit {done.returncode}): {done.stderr.strip()}")
            self._wait(lambda: postgres_reachable(self.url(self.users[0], "postgres")), 30, 0.1,
                       lambda: f"pgbouncer on port {self.port} not answering; log tail:\n{_tail(d / 'pgbouncer.log')}")
        return self

    def kill(self) -> None:
        if (pid := self._pid()) is not None:
            os.kill(pid, signal.SIGKILL)

    def _shutdown(self) -> None:
        # SIGTERM is an immediate shutdown up to 1.22; from 1.23 on it waits for every client
        # to leave, so a straggler (a killed test's connection) gets SIGKILL after a few seconds.
        if (pid := self._pid()) is not None:
            os.kill(pid, signal.SIGTERM)
            try:
                self._wait(lambda: not alive(pid), 5, 0.05, lambda: f"pgbouncer {pid} did not exit")
            except RuntimeError:
                self.kill()
