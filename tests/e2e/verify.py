"""Exact end-state checks: every entry once in `positions` or once in the DLQ, nothing pending."""

from __future__ import annotations

import signal
from collections.abc import Iterable
from typing import Any

import psycopg
import redis

from shard.decode import decode_entry


def entries_by_outcome(client: redis.Redis, stream: str) -> tuple[dict[bytes, Any], dict[bytes, dict]]:
    """Every entry of the stream, split into (valid fixes by id, poison fields by id)."""
    valid: dict[bytes, Any] = {}
    poison: dict[bytes, dict] = {}
    for entry_id, fields in client.xrange(stream):
        try:
            valid[entry_id] = decode_entry(fields)
        except ValueError:
            poison[entry_id] = fields
    return valid, poison


def stored_count(database_url: str) -> int:
    """Rows in `positions`; 0 while migrations have not created it yet."""
    with psycopg.connect(database_url) as conn:
        try:
            return conn.execute("SELECT count(*) FROM positions").fetchone()[0]
        except psycopg.errors.UndefinedTable:
            return 0


def pending_count(client: redis.Redis, stream: str, group: str = "processor") -> int:
    try:
        return client.xpending(stream, group)["pending"]
    except redis.ResponseError:
        return 0


def settled(client: redis.Redis, database_url: str, stream: str, expected_rows: int, expected_dead: int) -> bool:
    """True once every row and dead letter is there and nothing is pending or unread."""
    groups = {g["name"]: g for g in client.xinfo_groups(stream)} if client.exists(stream) else {}
    group = groups.get(b"processor")
    return (
        group is not None
        and group["pending"] == 0
        and group["last-delivered-id"] == (client.xinfo_stream(stream)["last-generated-id"])
        and stored_count(database_url) == expected_rows
        and client.xlen(f"{stream}:dlq") == expected_dead
    )


def wait_settled(client: redis.Redis, database_url: str, stream: str, timeout_s: float = 60.0) -> None:
    """Wait until every entry of the stream is stored or dead-lettered and nothing is pending;
    on timeout, say what is stuck where."""
    from tests.e2e.processes import wait_for

    valid, poison = entries_by_outcome(client, stream)
    distinct = len({(fix.device_id, fix.ts) for fix in valid.values()})
    try:
        wait_for(
            lambda: settled(client, database_url, stream, distinct, len(poison)),
            timeout_s,
            interval_s=0.1,
            what="every entry stored or dead-lettered, nothing pending",
        )
    except AssertionError as exc:
        summary = client.xpending(stream, "processor")
        examples = [
            (p["message_id"], p["consumer"], f"idle {p['time_since_delivered']} ms", f"delivered {p['times_delivered']}x")
            for p in client.xpending_range(stream, "processor", "-", "+", 5)
        ]
        raise AssertionError(
            f"{exc}; stored {stored_count(database_url)} of {distinct}; "
            f"pending per consumer {summary['consumers']}, e.g. {examples}"
        ) from None


def assert_exact(client: redis.Redis, database_url: str, stream: str) -> None:
    """The database and the DLQ hold exactly what the stream says they should."""
    valid, poison = entries_by_outcome(client, stream)
    expected = {(fix.device_id, fix.ts) for fix in valid.values()}
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT device_id, ts FROM positions").fetchall()
        last = dict(conn.execute("SELECT device_id, ts FROM last_position").fetchall())
    assert len(rows) == len(set(rows)) == len(expected)
    assert set(rows) == expected
    assert last == _newest_per_device(valid.values())

    letters = client.xrange(f"{stream}:dlq")
    sources = [fields[b"source_id"] for _, fields in letters]
    assert len(sources) == len(set(sources)), "an entry was dead-lettered twice"
    assert set(sources) == set(poison)
    for _, fields in letters:
        original = poison[fields[b"source_id"]]
        assert {k: fields[k] for k in original} == original, "dead letter must keep the original fields verbatim"
    assert pending_count(client, stream) == 0


def _newest_per_device(fixes: Iterable[Any]) -> dict[str, Any]:
    newest: dict[str, Any] = {}
    for fix in fixes:
        if fix.device_id not in newest or fix.ts > newest[fix.device_id]:
            newest[fix.device_id] = fix.ts
    return newest


def finish_exactly(processor: Any, client: redis.Redis, database_url: str, stream: str) -> None:
    """`processor` (a tests.e2e.processes.ProcessorProcess) finishes the stream: every entry stored or
    dead-lettered exactly once; then it stops on SIGTERM with exit 0."""
    wait_settled(client, database_url, stream, 90)
    assert_exact(client, database_url, stream)
    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == 0
