"""Postgres CPU per fix, statement by statement: the Processor's batch transaction beside the peer's.

Run as `python -m scripts.benchmark.pg_cost [--fixes N] [--devices N] [--batch N] [--peer-batch N] [--writers N]`.

The drain benchmark runs shards and Postgres on the same cores, and pg_stat_statements
reports wall time: a statement waiting for a lock, for the client's COPY data or for a CPU
counts as working. Here one batch runs at a time on a throwaway server (fsync on) and each
statement is charged the CPU its backend used meanwhile, read from the kernel's
/proc/<pid>/schedstat in nanoseconds: a figure the load of the machine barely moves.

The Processor's batches go through the shards' own writer (shard/writer.py), in turn
through --writers writers with caches of their own: with two (the default), as a device's
fixes alternate between two shards, every cached state is stale by its next batch; with
one, as with SHARDS=1, the cache holds. The peer's are the statements of
scripts/benchmark/peer.py. Both store the same fleet's fixes into a database of their own.
The client's own CPU over the batches is shown too: the writer path from decoded fixes on
(COPY formatting, statements, derived state; not reading or decoding entries).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import psycopg

from common.config import Settings
from scripts.benchmark import peer
from scripts.toolkit.fleet import Fleet
from scripts.toolkit.services import ThrowawayPostgres, with_database
from shard.decode import Fix, decode_entry
from shard.geofences import GeofenceSource
from shard.writer import PositionWriter
from supervisor.migrations import apply_migrations
from supervisor.partitions import maintain

WHOLE = "whole batch (statements, COPY, commit)"


def backend_cpu_ns(pid: int) -> int:
    """CPU time the process has run for, in ns (the first field of schedstat)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


class Ledger:
    """CPU ns and calls per statement, keyed by the statement's first words."""

    def __init__(self) -> None:
        self.cpu: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.client_ns = 0  # the client process' own CPU over the batches (one at a time: nothing else runs)

    def charge(self, label: str, ns: int) -> None:
        self.cpu[label] += ns
        self.calls[label] += 1

    @contextlib.contextmanager
    def measuring(self, pid: int, label: str) -> Any:
        started = backend_cpu_ns(pid)
        try:
            yield
        finally:
            self.charge(label, backend_cpu_ns(pid) - started)


def label_of(query: object) -> str:
    text = query.decode(errors="replace") if isinstance(query, bytes) else str(query)
    return " ".join(text.split())[:70]


def measured_cursor(ledger: Ledger) -> type[psycopg.AsyncCursor]:
    """An async cursor class that charges each execute and COPY its backend's CPU."""

    class MeasuredCursor(psycopg.AsyncCursor):  # type: ignore[type-arg]
        async def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            with ledger.measuring(self.connection.info.backend_pid, label_of(query)):
                return await super().execute(query, *args, **kwargs)

        @contextlib.asynccontextmanager
        async def copy(self, statement: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            with ledger.measuring(self.connection.info.backend_pid, label_of(statement)):
                async with super().copy(statement, *args, **kwargs) as copy:
                    yield copy

    return MeasuredCursor


def fleet_fixes(count: int, devices: int) -> list[Fix]:
    not_after = datetime.now(timezone.utc) + timedelta(days=365 * 50)
    return [decode_entry([b"data", orjson.dumps(fix)], not_after) for fix in Fleet(devices).fixes(count)]


def batches(fixes: Sequence[Fix], size: int) -> list[Sequence[Fix]]:
    return [fixes[start : start + size] for start in range(0, len(fixes), size)]


async def processor_cost(url: str, fixes: Sequence[Fix], size: int, count: int = 2) -> Ledger:
    """The shards' writer stores every batch; `count` writers take turns, as that many shards would."""
    ledger = Ledger()
    writers = [PositionWriter(_settings(url), f"pg_cost {n}", GeofenceSource(url, f"pg_cost {n}")) for n in range(count)]
    try:
        connections = []
        for writer in writers:
            # The writer's own connection (its pool of idle ones), measured by a cursor class of ours.
            conn = await writer._take()  # noqa: SLF001 - a benchmark reaching in on purpose
            conn.cursor_factory = measured_cursor(ledger)
            writer._idle.append(conn)  # noqa: SLF001
            connections.append(conn)
        for n, batch in enumerate(batches(fixes, size)):
            started = time.process_time_ns()
            with ledger.measuring(connections[n % count].info.backend_pid, WHOLE):
                await writers[n % count].write(batch)
            ledger.client_ns += time.process_time_ns() - started
    finally:
        for writer in writers:
            await writer.close()
            await writer.geofences.close()
    return ledger


def peer_cost(url: str, fixes: Sequence[Fix], size: int) -> Ledger:
    """The peer's transaction for every batch: COPY into its staging table, then its two statements."""
    ledger = Ledger()
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    with psycopg.connect(url, autocommit=True) as db:
        db.adapters.register_dumper(None, peer._JsonbBytes)  # noqa: SLF001
        db.execute(peer._STAGING)  # noqa: SLF001
        pid = db.info.backend_pid
        for batch in batches(fixes, size):
            rows = [
                (f.device_id, (f.ts - epoch) // timedelta(milliseconds=1), f.lat, f.lon, f.alt, f.speed, f.heading,
                 f.sats, None if f.attributes is None else orjson.dumps(f.attributes))
                for f in batch
            ]
            started = time.process_time_ns()
            with ledger.measuring(pid, WHOLE), db.transaction(), db.cursor() as cur:
                with ledger.measuring(pid, label_of(peer._COPY)), cur.copy(peer._COPY) as copy:  # noqa: SLF001
                    copy.set_types(peer._TYPES)  # noqa: SLF001
                    for row in rows:
                        copy.write_row(row)
                for statement in filter(str.strip, peer._STORE.split(";")):  # noqa: SLF001
                    with ledger.measuring(pid, label_of(statement)):
                        cur.execute(statement)
            ledger.client_ns += time.process_time_ns() - started
    return ledger


def _settings(url: str) -> Settings:
    return Settings.from_env({"DATABASE_URL": url})  # the writer needs no Redis


def prepare(url: str) -> str:
    """Migrate an empty database and create its partitions, as `processor run` would."""
    apply_migrations(url)
    maintain(url, 0, 86_400.0)
    return url


def fresh_database(server_url: str, name: str) -> str:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return prepare(with_database(server_url, name))


def render(title: str, ledger: Ledger, fixes: int, say: Callable[[str], None]) -> None:
    say(f"\n{title}: {ledger.cpu[WHOLE] / 1e3 / fixes:.1f} µs of Postgres CPU per fix\n")
    say("| µs/fix | calls | statement |\n|---:|---:|---|")
    for label, ns in ledger.cpu.most_common():
        if label != WHOLE:
            say(f"| {ns / 1e3 / fixes:.2f} | {ledger.calls[label]:,} | `{label}` |")
    rest = ledger.cpu[WHOLE] - sum(ns for label, ns in ledger.cpu.items() if label != WHOLE)
    say(f"| {rest / 1e3 / fixes:.2f} | | (the rest: BEGIN, COMMIT, between statements) |")
    say(f"\nThe client's own CPU over the same batches: {ledger.client_ns / 1e3 / fixes:.1f} µs per fix")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixes", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=500, help="the Processor's batch (BATCH_SIZE's default)")
    parser.add_argument("--peer-batch", type=int, default=peer.BATCH)
    parser.add_argument("--writers", type=int, default=2, help="shards taking turns (2: every cached state goes stale)")
    args = parser.parse_args(argv)
    if min(args.fixes, args.devices, args.batch, args.peer_batch, args.writers) < 1:
        parser.error("every figure must be positive")
    fixes = fleet_fixes(args.fixes, args.devices)
    with ThrowawayPostgres(fsync=True) as pg:
        ours = asyncio.run(processor_cost(fresh_database(pg.url, "pg_cost_processor"), fixes, args.batch, args.writers))
        theirs = peer_cost(fresh_database(pg.url, "pg_cost_peer"), fixes, args.peer_batch)
    print(f"{len(fixes):,} fixes of {args.devices:,} devices, one batch at a time; CPU of the backend per statement")
    render(f"Processor, batches of {args.batch:,} through {args.writers} writer(s)", ours, len(fixes), print)
    render(f"peer, batches of {args.peer_batch:,}", theirs, len(fixes), print)
    print(f"\nProcessor/peer, Postgres CPU per fix: {ours.cpu[WHOLE] / max(theirs.cpu[WHOLE], 1):.2f}")


if __name__ == "__main__":
    main()
