"""Writing fixes to a Redis Stream: pipelined XADD (`produce`), a backlog, a steady paced load.

``produce(client, stream, fixes, *, malformed_fraction=0.0, seed=1, pipeline_size=1000,
devices=100, progress=None) -> Counts``
    Pipelined XADD of ``{"data": orjson.dumps(fix)}`` entries.
``backlog(client, stream, n, devices=100, seed=1, malformed_fraction=0.0, ...)``
    Write ``n`` entries as fast as possible.
``steady(client, stream, rate_per_s, seconds, devices=100, seed=1, malformed_fraction=0.0,
on_sent=None, ...)``
    Paced writer (10 ms ticks on ``time.monotonic()``) with wall-clock ``ts``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import orjson

from scripts.toolkit.fleet import Fleet
from scripts.toolkit.poison import malformed, poison_rng

_dumps = orjson.dumps


@dataclass(slots=True)
class Counts:
    valid: int = 0
    malformed: int = 0

    @property
    def total(self) -> int:
        return self.valid + self.malformed

    def as_dict(self) -> dict[str, int]:
        return {"valid": self.valid, "malformed": self.malformed, "total": self.total}


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


class _Writer:
    """Sends batches of ``XADD stream * data <payload>``.

    Fast path: commands are packed by hand into one buffer, written with a
    single ``sendall`` on a pooled connection and the replies read back one by
    one.  Clients without a standard connection pool fall back to a
    non-transactional redis-py pipeline.
    """

    def __init__(self, client: Any, stream: str | bytes) -> None:
        self.client = client
        key = stream.encode() if isinstance(stream, str) else bytes(stream)
        self.stream = key
        self.prefix = b"*5\r\n$4\r\nXADD\r\n" + _bulk(key) + b"$1\r\n*\r\n$4\r\ndata\r\n"
        pool = getattr(client, "connection_pool", None)
        self.raw = pool is not None and hasattr(pool, "get_connection") and hasattr(pool, "release")
        self.conn: Any = None

    def send(self, payloads: Sequence[bytes]) -> int:
        """XADD every payload; returns how many were added.  Raises the first
        error reply after having drained all replies of the batch."""
        if not payloads:
            return 0
        if not self.raw:
            return self._send_pipeline(payloads)
        prefix = self.prefix
        buf = b"".join([b"%s$%d\r\n%s\r\n" % (prefix, len(p), p) for p in payloads])
        if self.conn is None:
            self.conn = self.client.connection_pool.get_connection()
        conn = self.conn
        try:
            conn.send_packed_command([buf])
            read = conn.read_response
            first_error = None
            ok = 0
            for _ in range(len(payloads)):
                try:
                    read(disable_decoding=True)
                    ok += 1
                except Exception as exc:  # error reply: keep draining
                    if first_error is None:
                        first_error = exc
                    if not _is_reply_error(exc):
                        raise
        except BaseException:
            # Unknown number of unread replies: never reuse this connection.
            self._drop()
            raise
        if first_error is not None:
            raise first_error
        return ok

    def _send_pipeline(self, payloads: Sequence[bytes]) -> int:
        pipe = self.client.pipeline(transaction=False)
        key = self.stream
        for p in payloads:
            pipe.execute_command("XADD", key, "*", "data", p)
        results = pipe.execute(raise_on_error=False)
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise errors[0]
        return len(results)

    def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.disconnect()
            finally:
                self.client.connection_pool.release(conn)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            self.client.connection_pool.release(conn)


def _is_reply_error(exc: BaseException) -> bool:
    try:
        from redis.exceptions import ConnectionError as RConnErr
        from redis.exceptions import ResponseError, TimeoutError as RTimeout
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, ResponseError) and not isinstance(exc, (RConnErr, RTimeout))


def produce(
    client: Any,
    stream: str,
    fixes: Iterable[dict[str, Any] | bytes] | int,
    *,
    malformed_fraction: float = 0.0,
    seed: int = 1,
    pipeline_size: int = 1000,
    devices: int = 100,
    progress: Callable[[Counts], None] | None = None,
) -> Counts:
    """XADD ``{"data": orjson.dumps(fix)}`` for every fix, pipelined.

    ``fixes`` is an iterable of fix dicts (``bytes`` items are sent verbatim
    and counted as valid) or an int ``n`` meaning ``Fleet(devices, seed).fixes(n)``.
    With ``malformed_fraction`` > 0, each entry is replaced by
    :func:`malformed` data with that probability (seeded by ``seed``); the
    replaced fix is consumed, so the number of entries is unchanged.
    ``progress(counts)`` is called after every acknowledged batch.
    """
    if isinstance(fixes, int):
        fixes = Fleet(devices, seed=seed).fixes(fixes)
    if not 0.0 <= malformed_fraction <= 1.0:
        raise ValueError("malformed_fraction must be within [0, 1]")
    pipeline_size = max(1, int(pipeline_size))
    prng = poison_rng(seed)
    prnd = prng.random
    mf = float(malformed_fraction)
    dumps = _dumps
    counts = Counts()
    writer = _Writer(client, stream)
    batch: list[bytes] = []
    append = batch.append
    bad = 0
    try:
        for fix in fixes:
            if mf and prnd() < mf:
                append(malformed(prng))
                bad += 1
            elif type(fix) is bytes:
                append(fix)
            else:
                append(dumps(fix))
            if len(batch) >= pipeline_size:
                writer.send(batch)
                counts.malformed += bad
                counts.valid += len(batch) - bad
                batch.clear()
                bad = 0
                if progress is not None:
                    progress(counts)
        if batch:
            writer.send(batch)
            counts.malformed += bad
            counts.valid += len(batch) - bad
            batch.clear()
            if progress is not None:
                progress(counts)
    finally:
        writer.close()
    return counts


def backlog(
    client: Any,
    stream: str,
    n: int,
    devices: int = 100,
    seed: int = 1,
    malformed_fraction: float = 0.0,
    *,
    start_ms: int | None = None,
    pipeline_size: int = 1000,
    progress: Callable[[Counts], None] | None = None,
) -> Counts:
    """Write ``n`` entries as fast as possible (deterministic ``ts``)."""
    fleet = Fleet(devices, seed=seed, start_ms=start_ms)
    return produce(
        client,
        stream,
        fleet.fixes(n),
        malformed_fraction=malformed_fraction,
        seed=seed,
        pipeline_size=pipeline_size,
        progress=progress,
    )


def steady(
    client: Any,
    stream: str,
    rate_per_s: float,
    seconds: float,
    devices: int = 100,
    seed: int = 1,
    malformed_fraction: float = 0.0,
    on_sent: Callable[[list[tuple[dict[str, Any], float]]], None] | None = None,
    *,
    tick_s: float = 0.01,
    pipeline_size: int = 1000,
    progress: Callable[[Counts], None] | None = None,
) -> Counts:
    """Offer ``rate_per_s`` entries/s for ``seconds`` s (``round(rate*seconds)`` total).

    Every ``tick_s`` the entries due by ``time.monotonic()`` are generated
    (``ts`` = wall clock ms) and sent in one pipelined batch, so the load is
    smooth.  If the writer falls behind it catches up in batches of at most
    ``pipeline_size``.  ``on_sent`` receives ``[(fix, t_send_monotonic), ...]``
    for the valid fixes of each batch once the batch is acknowledged
    (``t_send`` is taken just before the write).
    """
    if rate_per_s <= 0 or seconds < 0:
        raise ValueError("rate_per_s must be > 0 and seconds >= 0")
    if not 0.0 <= malformed_fraction <= 1.0:
        raise ValueError("malformed_fraction must be within [0, 1]")
    total = int(round(rate_per_s * seconds))
    pipeline_size = max(1, int(pipeline_size))
    fleet = Fleet(devices, seed=seed, start_ms=time.time_ns() // 1_000_000)
    gen = fleet.fixes(total, live=True)
    prng = poison_rng(seed)
    prnd = prng.random
    mf = float(malformed_fraction)
    dumps = _dumps
    monotonic = time.monotonic
    sleep = time.sleep
    counts = Counts()
    writer = _Writer(client, stream)
    sent = 0
    try:
        t0 = monotonic()
        next_tick = t0
        while sent < total:
            now = monotonic()
            due = int((now - t0) * rate_per_s) + 1  # the first entry goes at t0
            if due > total:
                due = total
            while sent < due:
                k = min(due - sent, pipeline_size)
                payloads: list[bytes] = []
                fixes_sent: list[dict[str, Any]] = []
                bad = 0
                for _ in range(k):
                    fix = next(gen)
                    if mf and prnd() < mf:
                        payloads.append(malformed(prng))
                        bad += 1
                    else:
                        payloads.append(dumps(fix))
                        if on_sent is not None:
                            fixes_sent.append(fix)
                t_send = monotonic()
                writer.send(payloads)
                sent += k
                counts.malformed += bad
                counts.valid += k - bad
                if on_sent is not None and fixes_sent:
                    on_sent([(f, t_send) for f in fixes_sent])
                if progress is not None:
                    progress(counts)
            if sent >= total:
                break
            next_tick += tick_s
            now = monotonic()
            if next_tick > now:
                sleep(next_tick - now)
            else:
                next_tick = now  # behind schedule: don't accumulate a burst of ticks
    finally:
        writer.close()
    return counts
