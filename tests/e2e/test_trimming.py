"""Stream trimming and lost entries with a real `processor run`: other readers are respected, memory stays bounded,
loss is counted."""

from __future__ import annotations

import os
import signal
import threading

import orjson
import psycopg
import pytest
import redis

from scripts.toolkit.processes import children, proc_title
from scripts.toolkit.services import free_port
from scripts.toolkit.writer import backlog, steady
from shard.decode import decode_entry
from supervisor.trimming import id_key as _id_key
from tests.e2e.processes import ProcessorProcess, wait_for
from tests.e2e.test_health import get, metric
from tests.e2e.verify import entries_by_outcome, stored_count
from tests.ops.letters import run_cli

pytestmark = pytest.mark.e2e


def id_key(entry_id: bytes | str) -> tuple[int, int]:
    return _id_key(entry_id.decode() if isinstance(entry_id, bytes) else entry_id)


def stored(database_url: str) -> set[tuple[str, object]]:
    with psycopg.connect(database_url) as conn:
        return set(conn.execute("SELECT device_id, ts FROM positions").fetchall())


def group_done(client: redis.Redis, stream: str, group: str = "processor") -> bool:
    """The group has read the stream's newest entry and holds nothing pending."""
    info = {g["name"]: g for g in client.xinfo_groups(stream)}.get(group.encode())
    return (
        info is not None and info["pending"] == 0
        and info["last-delivered-id"] == client.xinfo_stream(stream)["last-generated-id"]
    )


def passes(client: redis.Redis, stream: str) -> str:
    """When the last trimming pass of any instance ran (Redis ms), '' before the first."""
    return (client.hget(f"{stream}:trim:last", "at") or b"").decode()


def wait_passes(client: redis.Redis, stream: str, count: int, check=lambda: None) -> None:  # type: ignore[no-untyped-def]
    """Wait for `count` more trimming passes, running `check` between looks."""
    seen = {passes(client, stream)}
    wait_for(lambda: (check(), seen.add(passes(client, stream)), len(seen) > count)[2], 30, 0.1, what=f"{count} passes")


def lag_json(env: dict[str, str]) -> dict:
    done = run_cli(env, "lag", "--json")
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout)


def test_a_lagging_group_keeps_everything_it_has_not_read_or_acked(redis_client, database_url, stream_key, env, start_processor):
    """STREAM_RETENTION_MS=0 and an analytics group that read 1,000 of 6,000 entries and acked 600 of them: nothing from
    its oldest pending entry on is ever trimmed while the Processor runs; once it has read and acked all, the stream is
    trimmed down to its newest node. Every fix is stored exactly."""
    redis_client.xgroup_create(stream_key, "analytics", id="0", mkstream=True)
    backlog(redis_client, stream_key, 6_000, devices=200, seed=7)
    valid, _ = entries_by_outcome(redis_client, stream_key)
    expected = {(fix.device_id, fix.ts) for fix in valid.values()}
    ids = [entry_id for entry_id, _ in redis_client.xrange(stream_key)]
    reply = redis_client.xreadgroup("analytics", "slow-0", {stream_key: ">"}, count=1_000)
    redis_client.xack(stream_key, "analytics", *[entry_id for entry_id, _ in reply[0][1][:600]])
    needed = set(ids[600:])

    def nothing_needed_is_gone() -> None:
        present = {entry_id for entry_id, _ in redis_client.xrange(stream_key, min=ids[600])}
        assert needed <= present, f"{len(needed - present)} entries analytics still needs were trimmed"

    port = free_port()
    env = {**env, "STREAM_RETENTION_MS": "0", "HTTP_PORT": str(port)}
    processor = start_processor(env)
    wait_for(lambda: (nothing_needed_is_gone(), group_done(redis_client, stream_key))[1], 60, 0.1, what="the backlog processed")
    assert stored(database_url) == expected
    maintenance = [p for p in children(processor.pid) if proc_title(p).startswith("processor: maintenance ")]
    assert len(maintenance) == 1, "one maintenance process"
    # Trimmed as far as analytics allows, and no further, pass after pass.
    wait_for(lambda: (nothing_needed_is_gone(), redis_client.xlen(stream_key) <= 5_400 + 100)[1], 30, 0.1, what="the trim")
    wait_passes(redis_client, stream_key, 3, nothing_needed_is_gone)
    report = lag_json(env)["trimming"]
    assert report["holder"] == "analytics" and report["safe_id"] == ids[600].decode()
    analytics = next(g for g in report["groups"] if g["group"] == "analytics")
    assert (analytics["unread"], analytics["pending"], analytics["needs_from"]) == (5_000, 400, ids[600].decode())
    blocked = wait_for(lambda: metric(get(port, "/metrics")[1], "processor_stream_trim_blocked_seconds"), 10, what="gauge")
    assert blocked['{group="analytics"}'] > 0 and blocked['{group="processor"}'] == 0
    # analytics catches up: the stream goes.
    redis_client.xreadgroup("analytics", "slow-0", {stream_key: ">"}, count=10_000)
    redis_client.xack(stream_key, "analytics", *ids)
    wait_for(lambda: redis_client.xlen(stream_key) <= 100, 30, 0.1, what="the stream trimmed once analytics is done")
    assert ids[-1] in {entry_id for entry_id, _ in redis_client.xrange(stream_key)}, "the newest entry always stays"
    assert stored(database_url) == expected


def test_stream_length_stays_bounded_under_sustained_load(redis_client, database_url, stream_key, env, start_processor):
    """2,000 fixes/s for 20 s with STREAM_RETENTION_MS=2000 and only our group: XLEN sampled every 0.25 s stays near
    rate x (retention + pass interval + processing), far below the 40,000 written; every fix is stored exactly."""
    start_processor({**env, "STREAM_RETENTION_MS": "2000"})
    wait_for(lambda: redis_client.exists(stream_key) and len(redis_client.xinfo_consumers(stream_key, "processor")) == 2, 30)
    sent: list[tuple[str, object]] = []
    lengths: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        with redis.Redis.from_url(env["REDIS_URL"]) as client:
            while not stop.wait(0.25):
                lengths.append(client.xlen(stream_key))

    def keep(batch: list) -> None:  # type: ignore[type-arg]
        for fix, _ in batch:
            decoded = decode_entry([b"data", orjson.dumps(fix)])
            sent.append((decoded.device_id, decoded.ts))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    counts = steady(redis_client, stream_key, 2_000, 20, devices=500, seed=11, on_sent=keep)
    wait_for(lambda: group_done(redis_client, stream_key) and stored_count(database_url) == len(set(sent)), 60, 0.1, what="settled")
    wait_for(lambda: redis_client.xlen(stream_key) <= 100, 30, 0.1, what="the stream trimmed after the load")
    stop.set()
    sampler.join()
    assert counts.valid == 40_000 == len(sent)
    assert stored(database_url) == set(sent)
    peak = max(lengths)
    print(f"XLEN under 2,000 fixes/s, retention 2 s: peak {peak}, samples {lengths[::8]}")
    assert peak <= 16_000, f"stream grew to {peak}"
    late = lengths[len(lengths) // 2 : int(len(lengths) * 0.8)]
    assert max(late) <= 16_000 and min(late) > 0, "steady state: bounded, not emptied"


def test_lost_entries_are_counted_in_metrics_lag_and_logs(redis_client, stream_key, env, start_processor):
    """With the shards stopped: a pending entry is XDELed and a producer's MAXLEN drops unread entries. Both kinds are in
    processor_entries_lost_total (the shard's and the maintenance's), in `processor lag --json` and in the log."""
    port = free_port()
    env = {**env, "HTTP_PORT": str(port), "HEARTBEAT_TIMEOUT_S": "300", "STREAM_RETENTION_MS": "off"}
    processor: ProcessorProcess = start_processor(env)
    shards = processor.wait_for_shards(2)
    wait_for(lambda: redis_client.exists(stream_key) and len(redis_client.xinfo_consumers(stream_key, "processor")) == 2, 30)
    wait_for(lambda: get(port, "/healthz")[0] == 200, 30, what="healthy")
    wait_for(lambda: redis_client.exists(f"{stream_key}:group:processor:lost-watch"), 10, what="the loss watch's first look")
    for pid in shards:
        os.kill(pid, signal.SIGSTOP)
    try:
        backlog(redis_client, stream_key, 300, devices=50, seed=3)
        # A consumer that died holding one entry, which an operator then deletes.
        (entry_id, _), = redis_client.xreadgroup("processor", "ghost-0", {stream_key: ">"}, count=1)[0][1]
        redis_client.xdel(stream_key, entry_id)
        backlog(redis_client, stream_key, 700, devices=50, seed=4)
        position = next(g for g in redis_client.xinfo_groups(stream_key) if g["name"] == b"processor")["last-delivered-id"]
        unread = [i for i, _ in redis_client.xrange(stream_key, min=b"(" + position)]
        redis_client.xadd(stream_key, {"data": b"{}"}, maxlen=100, approximate=False)  # the producer trims
        left = {i for i, _ in redis_client.xrange(stream_key, min=b"(" + position)}
        trimmed_unread = [i for i in unread if i not in left]
    finally:
        for pid in shards:
            os.kill(pid, signal.SIGCONT)
    expected = len(trimmed_unread) + 1
    assert len(trimmed_unread) >= 800

    def lost_metric() -> dict[str, float]:
        return metric(get(port, "/metrics")[1], "processor_entries_lost_total")

    wait_for(lambda: sum(lost_metric().values()) == expected, 30, 0.2, what=f"{expected} lost entries in /metrics")
    lost = lost_metric()
    assert lost['{shard="maintenance"}'] == len(trimmed_unread) and lost['{shard="0"}'] == 1
    assert lag_json(env)["lost"] == expected
    text = run_cli(env, "lag").stdout
    assert f"lost          {expected} entries" in text and "trimming      retention off" in text
    logs = processor.logs()
    pending = [e for e in logs if e["msg"].startswith("entries lost: deleted from the stream")]
    assert [e["ids"] for e in pending] == [[entry_id.decode()]]
    undelivered = [e for e in logs if e["msg"].startswith("entries lost: trimmed or deleted")]
    assert sum(e["lost"] for e in undelivered) == len(trimmed_unread) and all(e["exact"] for e in undelivered)
    assert id_key(undelivered[0]["ids_after"]) < id_key(min(trimmed_unread, key=id_key))
    assert id_key(undelivered[0]["ids_before"]) > id_key(max(trimmed_unread, key=id_key))
    wait_passes(redis_client, stream_key, 2)
    assert sum(lost_metric().values()) == expected
