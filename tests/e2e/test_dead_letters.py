"""Dead letters: rows Postgres rejects are isolated, counted, retried and dead-lettered alone."""

from __future__ import annotations

import orjson
import psycopg
import pytest

from common.keys import failures_key
from scripts.toolkit.fleet import Fleet
from scripts.toolkit.writer import produce
from supervisor.migrations import apply_migrations
from tests.e2e.processes import wait_for
from tests.e2e.verify import stored_count

pytestmark = pytest.mark.e2e


def reject_device(database_url: str, device_id: str, how: str = "check") -> None:
    """A rule only Postgres knows: its rows pass decoding and validation but fail the write, by a
    CHECK constraint or by a trigger that raises (which was a panic, and a crash loop: exit 70)."""
    apply_migrations(database_url)
    name = f"no_{device_id.replace('-', '_')}"
    with psycopg.connect(database_url) as conn:
        if how == "check":
            conn.execute(f"ALTER TABLE positions ADD CONSTRAINT {name} CHECK (device_id <> '{device_id}')")
            return
        conn.execute(f"""CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.device_id = '{device_id}' THEN RAISE EXCEPTION '{name}: % refused', NEW.device_id; END IF;
            RETURN NEW; END $$""")
        conn.execute(f"CREATE TRIGGER {name} BEFORE INSERT ON positions FOR EACH ROW EXECUTE FUNCTION {name}()")


@pytest.mark.parametrize("how", ["check", "trigger"])
def test_rejected_rows_are_dead_lettered_and_the_rest_commits(redis_client, database_url, stream_key, env, start_processor, how):
    """Each rejected row fails MAX_FAILURES times and is dead-lettered as `write`; every other row is stored."""
    reject_device(database_url, "reject-me", how)
    fixes = list(Fleet(40, seed=31).fixes(4_000))
    for n in range(0, 4_000, 400):
        fixes[n] = {**fixes[n], "device_id": "reject-me"}
    produce(redis_client, stream_key, fixes)
    start_processor({**env, "MAX_FAILURES": "3"})
    wait_for(lambda: redis_client.xlen(f"{stream_key}:dlq") == 10 and stored_count(database_url) == 3_990, 60)
    letters = [fields for _, fields in redis_client.xrange(f"{stream_key}:dlq")]
    assert {f[b"error_kind"] for f in letters} == {b"write"}
    assert {f[b"failures"] for f in letters} == {b"3"}
    assert all(b"no_reject_me" in f[b"error"] for f in letters)
    assert all(orjson.loads(f[b"data"])["device_id"] == "reject-me" for f in letters)
    wait_for(lambda: redis_client.xpending(stream_key, "processor")["pending"] == 0, 10)
    assert not redis_client.exists(failures_key(stream_key, "processor")), "counts of dead-lettered entries are removed"


def test_failure_counts_survive_a_restart(redis_client, database_url, stream_key, env, start_processor):
    """A count left by an earlier life is continued, not restarted: the entry dies at its next failure."""
    reject_device(database_url, "reject-me")
    [entry_id] = [redis_client.xadd(stream_key, {"data": orjson.dumps({"device_id": "reject-me", "ts": 1, "lat": 1, "lon": 1})})]
    redis_client.hset(failures_key(stream_key, "processor"), entry_id, 7)
    start_processor({**env, "MAX_FAILURES": "5"})
    wait_for(lambda: redis_client.xlen(f"{stream_key}:dlq") == 1, 30)
    [(_, fields)] = redis_client.xrange(f"{stream_key}:dlq")
    assert fields[b"failures"] == b"8" and fields[b"source_id"] == entry_id


def test_oversized_entry_is_dead_lettered_without_decoding(redis_client, database_url, stream_key, env, start_processor):
    """An entry over 1 MiB is dead-lettered as `validate`, verbatim, and the entries around it are stored."""
    produce(redis_client, stream_key, list(Fleet(5, seed=32).fixes(50)))
    huge = b'{"device_id":"big","ts":1,"lat":1,"lon":1,"io":{"blob":"' + b"x" * (1 << 20) + b'"}}'
    big_id = redis_client.xadd(stream_key, {"data": huge, "extra": b"kept"})
    produce(redis_client, stream_key, list(Fleet(5, seed=33, start_ms=1_750_000_000_000).fixes(50)))
    start_processor(env)
    wait_for(lambda: redis_client.xlen(f"{stream_key}:dlq") == 1 and stored_count(database_url) == 100, 30)
    [(_, fields)] = redis_client.xrange(f"{stream_key}:dlq")
    assert fields[b"error_kind"] == b"validate" and fields[b"source_id"] == big_id
    assert fields[b"data"] == huge and fields[b"extra"] == b"kept"


def test_rows_written_by_hand_do_not_turn_fixes_into_dead_letters(redis_client, database_url, stream_key, env, start_processor):
    """A positions row nobody told last_position about makes the fast insert fail; the safe path stores the rest."""
    apply_migrations(database_url)
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO positions (device_id, ts, lat, lon) VALUES ('manual', to_timestamp(1767225601), 1, 1)")
    fixes = [{"device_id": "manual", "ts": 1_767_225_600_000 + n * 1000, "lat": 2.0, "lon": 2.0} for n in range(3)]
    produce(redis_client, stream_key, fixes)
    processor = start_processor(env)
    wait_for(lambda: stored_count(database_url) == 3 and redis_client.xpending(stream_key, "processor")["pending"] == 0, 30)
    assert redis_client.xlen(f"{stream_key}:dlq") == 0
    with psycopg.connect(database_url) as conn:
        kept = conn.execute("SELECT lat FROM positions WHERE device_id = 'manual' AND ts = to_timestamp(1767225601)").fetchone()
        last = conn.execute("SELECT extract(epoch FROM ts)::bigint FROM last_position WHERE device_id = 'manual'").fetchone()
    assert kept == (1.0,) and last == (1_767_225_602,)
    assert "positions held rows newer than their devices' state; batch written the safe way" in processor.log_messages()
