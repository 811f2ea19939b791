"""Panics end to end (SPEC §5): dump, exit 70, restart with backoff, hung shards, crash loops, orphans."""

from __future__ import annotations

import re
import signal
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import orjson
import psycopg
import pytest

from common.config import redact_url
from scripts.toolkit.writer import backlog
from tests.e2e.processes import ProcessorProcess, wait_for
from tests.e2e.verify import assert_exact, wait_settled

pytestmark = pytest.mark.e2e

SHARD_DUMP = re.compile(r"panic-shard-0-(?P<pid>\d+)-\d{8}T\d{6}Z\.json")
SUPERVISOR_DUMP = re.compile(r"panic-supervisor-(?P<pid>\d+)-\d{8}T\d{6}Z\.json")


# A trigger that fails every insert with an error of our own: to the shard, a bug.
# A server-side failure no row causes (internal_error, XX000): a bug to halt on. (A trigger's plain
# RAISE EXCEPTION, P0001, refuses rows instead: tests/e2e/test_dead_letters.py.)
BREAK_POSITIONS = """
CREATE FUNCTION broken() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'broken on purpose' USING ERRCODE = 'internal_error'; END $$;
CREATE TRIGGER broken BEFORE INSERT ON positions FOR EACH STATEMENT EXECUTE FUNCTION broken();
"""


def dumps(env: dict[str, str], pattern: re.Pattern[str]) -> list[tuple[Path, dict]]:
    """The panic dumps in this test's PANIC_DIR whose file name matches `pattern`."""
    folder = Path(env["PANIC_DIR"])
    if not folder.is_dir():
        return []
    return [(path, orjson.loads(path.read_bytes())) for path in sorted(folder.iterdir()) if pattern.fullmatch(path.name)]


def with_password(url: str) -> tuple[str, str | None]:
    """`url` carrying a password the server accepts (any password under trust auth), and that password."""
    parts = urlsplit(url)
    if parts.password:
        return url, parts.password
    secret = f"pw-{uuid.uuid4().hex[:12]}"
    netloc = f"{parts.username or ''}:{secret}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    candidate = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    try:
        psycopg.connect(candidate, connect_timeout=5).close()
    except psycopg.OperationalError:
        return url, None  # the server checks passwords and we do not know one: test without a secret
    return candidate, secret


def live_shards(instance_id: str) -> list[int]:
    """Pids of running (not zombie) `processor: shard N [instance_id]` processes, found by title."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("processor: shard") and f"[{instance_id}]" in title:
            found.append(int(entry.name))
    return found


def log_entries(processor: ProcessorProcess, msg: str) -> list[dict]:
    """The JSON log lines of `processor` (supervisor and shards) with exactly this message."""
    return [entry for entry in processor.logs() if entry["msg"] == msg]


@pytest.mark.parametrize("place", ["shard-uncaught", "shard-task", "shard-thread"])
def test_shard_panic_dumps_state_exits_70_and_is_restarted(
    place, redis_client, database_url, stream_key, env, start_processor
):  # type: ignore[no-untyped-def]
    """A shard's uncaught error (main task, orphan task, thread) dumps redacted state, exits 70, is restarted; nothing is lost."""
    backlog(redis_client, stream_key, 3_000, devices=60, seed=21)
    url, secret = with_password(database_url)
    run_env = {**env, "SHARDS": "1", "BATCH_SIZE": "100", "DATABASE_URL": url, "MIGRATION_DATABASE_URL": url, "PROCESSOR_TEST_CRASH": place}
    processor = start_processor(run_env)

    (path, dump), *_ = wait_for(lambda: dumps(env, SHARD_DUMP), 15, what="a shard panic dump")
    crashed = int(SHARD_DUMP.fullmatch(path.name)["pid"])
    assert dump["process"] == "shard-0" and dump["pid"] == crashed
    assert f"test crash requested at {place}" in dump["traceback"]
    config, state = dump["config"], dump["state"]
    assert config["database_url"] == config["migration_database_url"] == redact_url(url)
    assert not any("password" in str(value).lower() for value in config.values())
    assert state["consumer"].startswith(env["INSTANCE_ID"])
    assert isinstance(state["in_flight"], list) and isinstance(state["device_cache"], dict)
    stream_ids = {entry_id.decode() for entry_id, _ in redis_client.xrange(stream_key)}
    assert set(state["in_flight"]) <= stream_ids
    if place == "shard-uncaught":
        assert state["in_flight"], "the batch that raised was in flight"
    (logged,) = wait_for(lambda: log_entries(processor, "panic: uncaught exception"), 5, what="the panic log line")
    assert logged["pid"] == crashed and logged["dump"] == str(path) and logged["level"] == "CRITICAL"

    exits = wait_for(lambda: log_entries(processor, "shard exited; restarting"), 15, what="the supervisor to log the exit")
    assert [(e["child_pid"], e["exit_status"]) for e in exits] == [(crashed, 70)]
    spawned = wait_for(lambda: (e := log_entries(processor, "shard spawned")) and len(e) == 2 and e, 15, what="a respawn")
    replacement = spawned[1]["child_pid"]
    assert replacement != crashed
    wait_for(lambda: processor.shard_pids() == [replacement], 10, what="the replacement to take its title")

    wait_settled(redis_client, database_url, stream_key, 30)
    assert_exact(redis_client, database_url, stream_key)
    assert processor.proc.poll() is None, "the supervisor survives a shard's panic"
    assert len(dumps(env, SHARD_DUMP)) == 1, "the crash was one-shot"
    if secret is not None:
        assert secret not in path.read_text() and secret not in processor.log_path.read_text()
    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == 0


def test_hung_shard_is_aborted_with_a_traceback_and_replaced(
    redis_client, database_url, stream_key, env, start_processor
):  # type: ignore[no-untyped-def]
    """A shard whose event loop blocks stops beating: SIGABRT (faulthandler traceback in the log), a new shard, exact counts."""
    backlog(redis_client, stream_key, 3_000, devices=60, seed=22)
    run_env = {**env, "SHARDS": "1", "BATCH_SIZE": "100", "HEARTBEAT_TIMEOUT_S": "2", "PROCESSOR_TEST_CRASH": "shard-hang"}
    processor = start_processor(run_env)

    (aborted,) = wait_for(lambda: log_entries(processor, "shard stopped beating; aborting it"), 15, what="the abort")
    hung = aborted["child_pid"]
    (killed,) = wait_for(lambda: log_entries(processor, "shard killed by a signal; restarting"), 10, what="the kill")
    assert killed["child_pid"] == hung and killed["signal"] == "SIGABRT"
    text = processor.log_path.read_text()
    assert "Fatal Python error: Aborted" in text and "in injected_crash" in text, "faulthandler shows where it hung"
    wait_for(lambda: (pids := processor.shard_pids()) and hung not in pids, 15, what="a replacement shard")

    wait_settled(redis_client, database_url, stream_key, 30)
    assert_exact(redis_client, database_url, stream_key)
    assert not log_entries(processor, "hung shard ignored SIGABRT; killing it")
    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == 0


def test_supervisor_panic_exits_70_and_its_shards_stop_by_themselves(
    redis_client, database_url, stream_key, env, start_processor
):  # type: ignore[no-untyped-def]
    """The supervisor's uncaught error dumps its state and exits 70; orphaned shards notice and stop; a rerun completes."""
    backlog(redis_client, stream_key, 3_000, devices=60, seed=23)
    processor = start_processor({**env, "SHARDS": "2", "BATCH_SIZE": "100", "PROCESSOR_TEST_CRASH": "supervisor-uncaught"})

    assert processor.wait(15) == 70
    ((path, dump),) = dumps(env, SUPERVISOR_DUMP)
    assert int(SUPERVISOR_DUMP.fullmatch(path.name)["pid"]) == dump["pid"] == processor.pid
    assert dump["process"] == "supervisor" and "test crash requested at supervisor-uncaught" in dump["traceback"]
    orphans = {int(pid) for pid in dump["state"]["shards"]}
    assert len(orphans) == 2
    wait_for(lambda: not live_shards(env["INSTANCE_ID"]), 15, what="the orphaned shards to stop")
    assert len(log_entries(processor, "supervisor is gone; stopping")) == 2
    assert {e["pid"] for e in log_entries(processor, "shard stopped")} == orphans

    rerun = start_processor({**env, "SHARDS": "2", "BATCH_SIZE": "100"}, name="rerun")
    rerun.wait_for_shards(2)  # its signal handlers are installed: SIGTERM is graceful from here on
    wait_settled(redis_client, database_url, stream_key, 30)
    assert_exact(redis_client, database_url, stream_key)
    rerun.signal(signal.SIGTERM)
    assert rerun.wait(30) == 0


def test_crash_loop_halts_the_supervisor_with_70(redis_client, database_url, stream_key, env, start_processor):  # type: ignore[no-untyped-def]
    """Shards that panic on every batch (an internal error: a bug, not a refusal) halt the supervisor 70 after 5 crashes; nothing is lost."""
    migrate = start_processor(env, "migrate", name="migrate")
    assert migrate.wait(30) == 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(BREAK_POSITIONS)
    backlog(redis_client, stream_key, 500, devices=20, seed=24)
    processor = start_processor({**env, "SHARDS": "2", "BATCH_SIZE": "100"})

    assert processor.wait(30) == 70
    (halted,) = log_entries(processor, "supervisor halted")
    assert halted["exit_status"] == 70 and "crashed 5 times within 60s" in halted["reason"]
    (supervisor_dump,) = [dump for _, dump in dumps(env, re.compile(r"panic-supervisor-\d+-\d{8}T\d{6}Z\.json"))]
    assert supervisor_dump["where"] == "halt" and supervisor_dump["traceback"] == halted["reason"]
    assert supervisor_dump["state"]["restarts"] == 4, "five crashes, the fifth not restarted"
    assert halted["dump"] and halted["dump"].endswith(".json")
    exits = log_entries(processor, "shard exited; restarting")
    assert len(exits) == 5 and {e["exit_status"] for e in exits} == {70}
    for slot in {e["slot"] for e in exits}:
        delays = [e["restart_in_s"] for e in exits if e["slot"] == slot]
        assert delays == sorted(set(delays)), f"slot {slot} restarts with growing backoff: {delays}"
    shard_dumps = [dump for _, dump in dumps(env, re.compile(r"panic-shard-\d+-\d+-\d{8}T\d{6}Z\.json"))]
    assert len(shard_dumps) >= 5 and all("InternalError_" in d["traceback"] for d in shard_dumps)
    assert not live_shards(env["INSTANCE_ID"]), "a halting supervisor stops its shards first"
    assert redis_client.xlen(f"{stream_key}:dlq") == 0, "a bug is not poison: nothing is dead-lettered"

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP TRIGGER broken ON positions")
    rerun = start_processor({**env, "SHARDS": "2", "BATCH_SIZE": "100"}, name="rerun")
    rerun.wait_for_shards(2)  # its signal handlers are installed: SIGTERM is graceful from here on
    wait_settled(redis_client, database_url, stream_key, 30)
    assert_exact(redis_client, database_url, stream_key)
    rerun.signal(signal.SIGTERM)
    assert rerun.wait(30) == 0


def test_a_table_missing_after_migration_halts_78_without_a_crash_loop(redis_client, database_url, stream_key, env, start_processor):  # type: ignore[no-untyped-def]
    """A missing table is a schema problem, not a bug: the shard exits 78 once and the supervisor halts 78."""
    migrate = start_processor(env, "migrate", name="migrate")
    assert migrate.wait(30) == 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE positions RENAME TO positions_away")
    backlog(redis_client, stream_key, 200, devices=10, seed=25)
    processor = start_processor({**env, "SHARDS": "2", "BATCH_SIZE": "100"})

    assert processor.wait(30) == 78
    (halted,) = log_entries(processor, "supervisor halted")
    assert halted["reason"].startswith("shard ") and "cannot work with this configuration" in halted["reason"]
    assert '"positions" does not exist' in halted["reason"], "the halt names what the shard was refused"
    assert not log_entries(processor, "shard exited; restarting"), "no restarts: restarting cannot help"
    assert not dumps(env, re.compile(r"panic-.*\.json")), "a refusal is not a panic"
    assert redis_client.xlen(f"{stream_key}:dlq") == 0
    assert redis_client.xpending(stream_key, "processor")["pending"] > 0, "the entries wait, pending"
