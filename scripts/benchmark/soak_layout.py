"""The soak's retention set-up: daily partitions for the past days, and the restart with a shorter retention.

See soak_load.py for why. `lay_out_days` runs on the fresh database after `processor migrate`
and before the Processor starts; `Switch` restarts the Processor during the load without
stopping the load (entries written meanwhile wait in the stream).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from psycopg import sql

from scripts.benchmark.base import STOP_GRACE_S, BenchError
from scripts.benchmark.run import ProcessorRun


_MINVALUE_PARTS = """
SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'positions'::regclass
"""


def _lower(bound: str) -> str | None:
    """The lower bound literal of 'FOR VALUES FROM (x) TO (y)', None for MINVALUE."""
    inner = bound.split("FROM (", 1)[1].split(") TO (", 1)[0]
    return None if inner == "MINVALUE" else inner.strip("'")


def lay_out_days(database_url: str, first_day: float) -> list[str]:
    """Replace the (empty) partition from MINVALUE by positions_before_<D0> and one partition per day from D0.

    Returns the partitions made; [] when positions is not partitioned. Raises BenchError if the
    partition to replace holds rows (not a fresh database).
    """
    d0 = datetime.fromtimestamp(first_day, timezone.utc)
    with psycopg.connect(database_url, autocommit=True) as db:
        db.execute("SET TimeZone = 'UTC'")
        if db.execute("select relkind from pg_class where oid = 'positions'::regclass").fetchone()[0] != "p":
            return []
        parts = {name: _lower(bound) for name, bound in db.execute(_MINVALUE_PARTS).fetchall()}
        lows = sorted(datetime.fromisoformat(low) for low in parts.values() if low is not None)
        bottom = next((low for low in lows if low > d0), None)
        if bottom is None:
            raise BenchError("positions has no daily partition above the planned first day")
        made = []
        with db.transaction():
            for name, low in parts.items():
                if low is None:
                    if db.execute(sql.SQL("select exists (select from {})").format(sql.Identifier(name))).fetchone()[0]:
                        raise BenchError(f"{name} holds rows: the soak needs a fresh database")
                    db.execute(sql.SQL("ALTER TABLE positions DETACH PARTITION {}").format(sql.Identifier(name)))
                    db.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
            before = f"positions_before_{d0:%Y%m%d}"
            db.execute(sql.SQL("CREATE TABLE {} PARTITION OF positions FOR VALUES FROM (MINVALUE) TO ({})")
                       .format(sql.Identifier(before), sql.Literal(d0)))
            made.append(before)
            day = d0
            while day < bottom:
                name = f"positions_{day:%Y%m%d}"
                db.execute(sql.SQL("CREATE TABLE {} PARTITION OF positions FOR VALUES FROM ({}) TO ({})")
                           .format(sql.Identifier(name), sql.Literal(day), sql.Literal(day + timedelta(days=1))))
                made.append(name)
                day += timedelta(days=1)
        return made


class Switch:
    """At `at_s`: SIGTERM the running Processor, and once it has exited, start it again with `env2`."""

    def __init__(self, at_s: float | None, env2: dict[str, str], start: Callable[[dict[str, str]], ProcessorRun],
                 on_stop: Callable[[ProcessorRun], None], settle_s: float) -> None:
        self.at_s = at_s
        self.settle_s = settle_s  # no shard kill this long before and after the restart
        self.env2 = env2
        self.start = start
        self.on_stop = on_stop
        self.state = "waiting" if at_s is not None else "off"
        self.proc: ProcessorRun | None = None
        self.sigterm_at = 0.0
        self.exit_code: int | None = None
        self.events: dict[str, Any] = {}
        self.announced = False

    def quiet(self, t: float) -> bool:
        """False near the restart: no shard is killed then."""
        if self.state == "stopping":
            return False
        return self.at_s is None or not self.at_s - self.settle_s <= t < self.at_s + self.settle_s

    def tick(self, t: float, proc: ProcessorRun) -> ProcessorRun | None:
        """The new Processor once it has been started, else None."""
        if self.state == "waiting" and t >= self.at_s:
            self.on_stop(proc)
            self.proc = proc
            self.sigterm_at = t
            proc.proc.send_signal(signal.SIGTERM)
            self.state = "stopping"
            self.events["sigterm_at_s"] = round(t, 2)
            return None
        if self.state != "stopping":
            return None
        assert self.proc is not None
        code = self.proc.proc.poll()
        if code is None:
            budget = float(self.proc.env.get("DRAIN_TIMEOUT_S", "20")) + STOP_GRACE_S
            if t - self.sigterm_at > budget:
                raise BenchError(f"processor did not exit within {budget:.0f}s of SIGTERM at the retention switch")
            return None
        self.exit_code = code
        self.events.update(exit_code=code, exited_after_s=round(t - self.sigterm_at, 2))
        if code != 0:
            raise BenchError(f"processor exited {code} after SIGTERM at the retention switch\n{self.proc.log_tail()}")
        self.state = "done"
        started = time.monotonic()
        new = self.start(self.env2)
        self.events["restarted_at_s"] = round(t + time.monotonic() - started, 2)
        return new
