"""Throwaway Redis and PostgreSQL servers for tests, the demo and the benchmark.

There is no Docker here, so real server binaries are started on free ports in private
temp dirs. We usually run as root, which Postgres refuses, so its tools run as the
`postgres` OS user via runuser. The shared services on :6379 and :5432 are never touched.
"""
from __future__ import annotations

import atexit
import contextlib
import math
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis

from common.logs import add_secret
from scripts.toolkit.certificates import Certificates, postgres_options, redis_arguments
from scripts.toolkit.processes import alive, children, tail

_OPEN: set[_Throwaway] = set()  # strong refs on purpose: a dropped-but-open server must still die at exit
_PG_ROOT = Path("/usr/lib/postgresql")


def with_database(url: str, database: str) -> str:
    """The same server URL, naming another database."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def postgres_owner() -> tuple[int, int] | None:
    """(uid, gid) of the `postgres` OS user when we are root (Postgres then runs as it), else None."""
    if os.geteuid() != 0:
        return None
    user = pwd.getpwnam("postgres")
    return user.pw_uid, user.pw_gid


def free_port() -> int:
    """An unused local port, so throwaway servers never collide with the shared ones."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_url_secret(url: str | None) -> None:
    """Have `common.logs.scrub` mask the password of `url` wherever it appears, not only inside URLs."""
    with contextlib.suppress(ValueError):
        add_secret(urlsplit(url).password if url else None)


def redis_reachable(url: str, timeout_s: float = 1.0) -> bool:
    """True if Redis at `url` answers PING; errors are swallowed so no URL or secret gets echoed."""
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s) as r:
            return bool(r.ping())
    except Exception:
        return False


def postgres_reachable(url: str, timeout_s: float = 2.0) -> bool:
    """True if Postgres at `url` accepts a connection and runs a query; errors are swallowed likewise."""
    try:
        # libpq's connect_timeout is whole seconds
        with psycopg.connect(url, connect_timeout=max(1, math.ceil(timeout_s))) as conn:
            conn.execute("select 1")
        return True
    except Exception:
        return False


def _pg_tools() -> tuple[str, str] | None:
    """(initdb, pg_ctl) from the newest /usr/lib/postgresql/<v>/bin, else from PATH."""
    def version(d: Path) -> tuple[int, ...]:
        return tuple(int(x) if x.isdigit() else -1 for x in d.parent.name.split("."))

    dirs = [d for d in _PG_ROOT.glob("*/bin") if (d / "initdb").is_file() and (d / "pg_ctl").is_file()]
    if dirs:
        newest = max(dirs, key=version)
        return str(newest / "initdb"), str(newest / "pg_ctl")
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    return (initdb, pg_ctl) if initdb and pg_ctl else None


def _runuser() -> str | None:
    return shutil.which("runuser", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def missing_binaries() -> list[str]:
    """Advice lines for whatever prevents starting the servers; empty when all is present."""
    advice = []
    if not shutil.which("redis-server"):
        advice.append("redis-server not found: install it (Debian: apt-get install redis-server)")
    if _pg_tools() is None:
        advice.append(f"PostgreSQL initdb/pg_ctl not found in {_PG_ROOT}/<version>/bin or on PATH: "
                      "install them (Debian: apt-get install postgresql)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            advice.append("running as root but there is no 'postgres' OS user to run PostgreSQL as "
                          "(Debian: apt-get install postgresql creates it)")
        if not _runuser():
            advice.append("running as root but runuser not found (Debian: apt-get install util-linux)")
    return advice


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(tail(path, lines))


@atexit.register
def _close_open() -> None:
    for server in list(_OPEN):
        with contextlib.suppress(Exception):
            server.close()


class _Throwaway:
    """Lifecycle shared by both servers: a private port and temp dir that survive stop()/start()."""

    def __init__(self) -> None:
        self.port: int | None = None
        self.dir: Path | None = None
        self._closed = False

    def _workdir(self, prefix: str) -> Path:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} already closed")
        if self.dir is None:
            self.dir, self.port = Path(tempfile.mkdtemp(prefix=prefix)), free_port()
            _OPEN.add(self)
        return self.dir

    def _require_port(self) -> int:
        if self.port is None:
            raise RuntimeError(f"{type(self).__name__} not started")
        return self.port

    def start(self) -> Self:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def _shutdown(self) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def _starting(self) -> Iterator[None]:
        """Undo a failed start: kill what was started and, on a first start, delete the temp dir."""
        fresh = self.dir is None
        try:
            yield
        except BaseException:
            self.kill()
            if fresh:
                self.close()
            raise

    @staticmethod
    def _wait(ready: Callable[[], bool], timeout_s: float, interval_s: float, failure: Callable[[], str],
              gave_up: Callable[[], bool] = lambda: False) -> None:
        """Poll `ready` until it holds; RuntimeError(failure()) when `gave_up` or the time is up."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if gave_up() or time.monotonic() > deadline:
                raise RuntimeError(failure())
            time.sleep(interval_s)

    def close(self) -> None:
        """Stop the server and delete its temp dir; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        try:
            self._shutdown()
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class ThrowawayRedis(_Throwaway):
    """A private redis-server; stop()/start() keep port and dir so restarts with persistence can be tested.

    With `tls`, it also listens on a TLS-only `tls_port`; `url` stays plaintext (set-up, readiness).
    """

    def __init__(self, *, appendonly: bool = False, tls: Certificates | None = None) -> None:
        super().__init__()
        self.appendonly = appendonly
        self.tls, self.tls_port = tls, None
        self._tls_arguments: list[str] = []
        if tls is not None:
            self.tls_port = free_port()
            self._tls_arguments = redis_arguments(tls, self.tls_port)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._require_port()}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start (or restart on the same port and dir) and wait until it answers PING."""
        if self.running:
            return self
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(missing_binaries()[0])
        with self._starting():
            d = self._workdir("throwaway-redis-")
            log = d / "redis.log"
            cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(d), "--save", "",
                   "--appendonly", "yes" if self.appendonly else "no", "--daemonize", "no"]
            cmd += self._tls_arguments
            with open(log, "ab") as out:
                # own session: a Ctrl-C aimed at the test run must not kill it mid-test
                proc = self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                                     stderr=subprocess.STDOUT, start_new_session=True)
            self._wait(lambda: self._ready(proc.pid), 10, 0.05,
                       lambda: f"redis-server on port {self.port} not ready "
                               f"(exit code {proc.poll()}); log tail:\n{_tail(log)}",
                       gave_up=lambda: proc.poll() is not None)
        return self

    def _ready(self, pid: int) -> bool:
        # compare pids: a bare PING could be answered by another server already on this port
        try:
            with redis.Redis(port=self._require_port(), socket_connect_timeout=0.5, socket_timeout=0.5) as r:
                return bool(r.ping()) and r.info("server").get("process_id") == pid
        except Exception:
            return False

    def _signal(self, sig: int) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            # the whole group on SIGKILL so an AOF-rewrite child cannot outlive the server
            os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        """Graceful SIGTERM (flushes the AOF); port and dir are kept for start()."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, to simulate a crash."""
        self._signal(signal.SIGKILL)

    _shutdown = stop


class ThrowawayPostgres(_Throwaway):
    """A private PostgreSQL cluster; stop()/start() keep port and data so restarts and crashes can be tested.

    With `tls`, ssl=on; `url` still connects (libpq's default sslmode=prefer verifies nothing).
    """

    def __init__(self, *, fsync: bool = True, tls: Certificates | None = None,
                 settings: dict[str, str] | None = None) -> None:
        super().__init__()
        self.fsync = fsync
        self.tls = tls
        self.settings = settings or {}  # more `-c name=value` server settings
        self._tools: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self._require_port()}/postgres"

    @property
    def data_dir(self) -> Path:
        if self.dir is None:
            raise RuntimeError("ThrowawayPostgres not started")
        return self.dir / "data"

    @property
    def running(self) -> bool:
        return self._postmaster_pid() is not None

    def _postmaster_pid(self) -> int | None:
        """Pid of our live postmaster, or None; checks comm so a recycled pid is never signalled."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError, RuntimeError):
            return None
        return pid if comm == "postgres" and alive(pid) else None

    def _run(self, *cmd: str, timeout: float) -> subprocess.CompletedProcess[str]:
        if os.geteuid() == 0:  # Postgres refuses to run as root
            cmd = (_runuser() or "runuser", "-u", "postgres", "--", *cmd)
        # cwd in our dir: the postgres user cannot enter root's cwd and initdb would complain
        return subprocess.run(cmd, cwd=self.dir, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def start(self) -> Self:
        """initdb on first use, then start (or restart on the same port and data) and wait for a connection."""
        if self.running:
            return self
        self._tools = self._tools or _pg_tools()
        if self._tools is None:
            raise RuntimeError("; ".join(missing_binaries()))
        initdb, pg_ctl = self._tools
        fresh = self.dir is None
        with self._starting():
            d = self._workdir("throwaway-pg-")
            data, log = self.data_dir, d / "log"
            if fresh:
                os.chmod(d, 0o755)  # the postgres user must reach it
                if (owner := postgres_owner()) is not None:
                    os.chown(d, *owner)  # it holds data dir, log and socket
                r = self._run(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                              "--no-instructions", timeout=120)
                if r.returncode:
                    raise RuntimeError(f"initdb failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")
            # after kill() the lock files name a dead (maybe still zombie) postmaster: postgres would refuse
            (data / "postmaster.pid").unlink(missing_ok=True)
            (d / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)
            opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {shlex.quote(str(d))} "
                    f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=200 -c shared_buffers=256MB")
            if self.tls:
                opts += " " + postgres_options(self.tls, d, postgres_owner())
            opts += "".join(f" -c {name}={shlex.quote(value)}" for name, value in self.settings.items())
            r = self._run(pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "30", "-o", opts, "start",
                          timeout=60)
            if r.returncode:
                raise RuntimeError(f"pg_ctl start failed (exit {r.returncode}): {r.stderr.strip()}\n"
                                   f"log tail:\n{_tail(log)}")
            self._wait(lambda: postgres_reachable(self.url, 2.0), 30, 0.1,
                       lambda: f"postgres on port {self.port} not accepting connections; log tail:\n{_tail(log)}")
        return self

    def run_tool(self, name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run one of the server's programs (pg_resetwal, ...) as the user the cluster belongs to."""
        self._tools = self._tools or _pg_tools()
        if self._tools is None:
            raise RuntimeError("; ".join(missing_binaries()))
        return self._run(str(Path(self._tools[1]).with_name(name)), *args, timeout=timeout)

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop (smart|fast|immediate), falling back to kill(); port and data are kept for start()."""
        if not self.running or self._tools is None:
            return
        try:
            r = self._run(self._tools[1], "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop",
                          timeout=90)
            failed = r.returncode != 0
        except subprocess.TimeoutExpired:
            failed = True
        if failed:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the postmaster and its children, to simulate a crash."""
        pid = self._postmaster_pid()
        if pid is None:
            return
        # Backends too, not only the postmaster: each postgres child setsid()s (so killpg misses
        # them), and an orphan still attached to the old shared memory would block the restart.
        victims = {pid, *children(pid)}
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(map(alive, victims)) and time.monotonic() < deadline:
            time.sleep(0.02)

    def _shutdown(self) -> None:
        self.stop("immediate")
