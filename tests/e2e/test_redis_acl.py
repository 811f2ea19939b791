"""The Processor as the Redis ACL user of OPERATIONS.md, on a throwaway Redis: the whole pipeline and every
operator command work, Redis' ACL LOG shows no denial; one permission less is one line and exit 78."""

from __future__ import annotations

import os
import re
import secrets
import signal
import threading
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit

import orjson
import psycopg
import pytest
import redis

from common.errors import ExitCode
from scripts.toolkit.fleet import Fleet
from scripts.toolkit.processes import proc_title
from scripts.toolkit.services import ThrowawayRedis, free_port
from scripts.toolkit.writer import backlog, produce, steady
from supervisor.migrations import apply_migrations
from tests.e2e.acl import acl_rule, create_user, denials, user_url
from tests.e2e.processes import stop_holding, wait_for
from tests.e2e.verify import assert_exact, entries_by_outcome, stored_count, wait_settled
from tests.e2e.verify import settled as all_settled
from tests.files import collection, feature, geojson_file
from tests.ops.letters import one_line, run_cli

pytestmark = pytest.mark.e2e

REJECTED_DEVICE = "reject-me"
REFUSED = ("shard cannot work with this configuration", "maintenance cannot work with this configuration")


@pytest.fixture(scope="module")
def acl_server() -> Iterator[ThrowawayRedis]:
    with ThrowawayRedis() as server:
        yield server


@pytest.fixture
def admin(acl_server: ThrowawayRedis) -> Iterator[redis.Redis]:
    """The default user, which may do everything: set-up, the producer, checks, ACL LOG."""
    with redis.Redis.from_url(acl_server.url) as client:
        client.acl_log_reset()
        yield client


@pytest.fixture
def acl_env(env: dict[str, str], acl_server: ThrowawayRedis) -> dict[str, str]:
    """The processor as user `processor` on the throwaway Redis (created by each test from the rule)."""
    return {**env, "REDIS_URL": user_url(acl_server.port or 0, secrets.token_hex(12))}


def password_of(env: dict[str, str]) -> str:
    return urlsplit(env["REDIS_URL"]).password or ""


def rule_for(env: dict[str, str]) -> str:
    return acl_rule(env["STREAM_KEY"], f"{env['STREAM_KEY']}:dlq", password_of(env))


def ok(result):  # type: ignore[no-untyped-def]
    assert result.returncode == 0, result.stderr
    return result


def json_of(result):  # type: ignore[no-untyped-def]
    return orjson.loads(ok(result).stdout)


def outcomes(admin: redis.Redis, stream: str) -> tuple[set[tuple[str, object]], set[bytes]]:
    """(the distinct fixes to be stored, the ids of entries to be dead-lettered): poison, and rows Postgres rejects."""
    valid, poison = entries_by_outcome(admin, stream)
    rejected = {entry_id for entry_id, fix in valid.items() if fix.device_id == REJECTED_DEVICE}
    stored = {(fix.device_id, fix.ts) for entry_id, fix in valid.items() if entry_id not in rejected}
    return stored, set(poison) | rejected


def settled(admin: redis.Redis, database_url: str, stream: str, letters: int) -> bool:
    stored, _ = outcomes(admin, stream)
    return all_settled(admin, database_url, stream, len(stored), letters)


def consumers(admin: redis.Redis, stream: str) -> dict[str, int]:
    return {c["name"].decode(): c["pending"] for c in admin.xinfo_consumers(stream, "processor")}


def prepare_database(env: dict[str, str], database_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`processor migrate`, a rule only Postgres knows (rows of REJECTED_DEVICE fail), geofences imported and listed."""
    ok(run_cli(env, "migrate"))
    with psycopg.connect(database_url) as conn:
        conn.execute(f"ALTER TABLE positions ADD CONSTRAINT no_reject CHECK (device_id <> '{REJECTED_DEVICE}')")
    depot = feature("Depot", {"type": "Point", "coordinates": [4.9, 52.37]}, radius_m=500)
    path = geojson_file(tmp_path / "depots.geojson", collection(depot))
    ok(run_cli(env, "geofences", "import", str(path)))
    assert "Depot" in ok(run_cli(env, "geofences", "list")).stdout


def test_the_pipeline_and_every_operator_command_run_as_the_acl_user(
    admin, acl_env, database_url, start_processor, tmp_path
):
    """Claiming (by command, after a dead consumer, after a SIGKILL), dead letters of every path, rehydrate,
    trimming, metrics and every operator command as `processor`: no ACL denial, every entry once."""
    stream, dlq = acl_env["STREAM_KEY"], f"{acl_env['STREAM_KEY']}:dlq"
    create_user(admin, rule_for(acl_env))
    http_port = free_port()
    env = {**acl_env, "SHARDS": "2", "BATCH_SIZE": "50", "MAX_FAILURES": "2", "CLAIM_THRESHOLD_MS": "500",
           "CLAIM_INTERVAL_MS": "500", "STREAM_RETENTION_MS": "1", "HTTP_PORT": str(http_port)}
    prepare_database(env, database_url, tmp_path)

    # A consumer that died holding entries, one of them deleted since; a second group that never
    # reads, so trimming runs every command of its pass yet may remove nothing the checks need.
    admin.xgroup_create(stream, "processor", id="0", mkstream=True)
    admin.xgroup_create(stream, "audit", id="0")
    produce(admin, stream, list(Fleet(10, seed=41).fixes(40)))
    [(_, held)] = admin.xreadgroup("processor", "ghost", {stream: ">"}, count=40)
    admin.xdel(stream, held[7][0])
    claimed = json_of(run_cli(env, "claim", "--from", "ghost", "--min-idle-ms", "0", "--json"))
    assert (claimed["claimed"], claimed["stored"], claimed["gone"]) == (39, 39, 1)
    # Rows Postgres rejects (failure counts) and a letter too large for a script (WATCH/MULTI/EXEC).
    produce(admin, stream, [{**fix, "device_id": REJECTED_DEVICE} for fix in Fleet(3, seed=42).fixes(3)])
    huge_id = admin.xadd(stream, {"data": b"{}", **{f"f{n}": b"x" for n in range(4_000)}})

    processor = start_processor(env)
    processor.wait_for_shards(2)
    producer = threading.Thread(target=steady, args=(admin, stream, 500, 4.0),
                                kwargs={"devices": 20, "seed": 43, "malformed_fraction": 0.02})
    producer.start()
    try:
        wait_for(lambda: stored_count(database_url) > 300, what="the first rows")
        # Shard 1 stopped holding entries: shard 0 claims them past CLAIM_THRESHOLD_MS; then it is killed.
        [victim] = [pid for pid in processor.shard_pids() if proc_title(pid).startswith("processor: shard 1 ")]
        stopped = f"{env['INSTANCE_ID']}-1"
        stop_holding([victim], lambda: consumers(admin, stream).get(stopped, 0) > 0, what="shard 1 holding entries")
        wait_for(lambda: consumers(admin, stream).get(stopped, 0) == 0, 20, what="shard 1's entries claimed")
        os.kill(victim, signal.SIGKILL)
    finally:
        producer.join()

    device = "dev-00003"
    rehydrated = json_of(run_cli(env, "rehydrate", device, "--json"))
    assert rehydrated["shards_notified"] >= 1
    wait_for(lambda: "device state dropped on request" in processor.log_messages(), 10, what="a shard dropping the device")
    lag = json_of(run_cli(env, "lag", "--json"))
    assert (lag["stream"], lag["group"], lag["dlq"], lag["stream_exists"], lag["group_exists"]) == (
        stream, "processor", dlq, True, True)
    assert f"{env['INSTANCE_ID']}-0" in {consumer["name"] for consumer in lag["consumers"]}, lag["consumers"]
    assert lag["lost"] == 1, "the entry deleted while the ghost held it, counted by the claim"
    ok(run_cli(env, "retention"))
    _, dead = outcomes(admin, stream)
    wait_for(lambda: settled(admin, database_url, stream, len(dead)), 30, interval_s=0.2, what="everything settled")
    wait_for(lambda: "ghost" not in consumers(admin, stream), 15, what="the idle dead consumer removed")
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert re.search(r"^processor_dead_letters (\S+)$", metrics, re.M)[1] in (str(len(dead)), f"{len(dead)}.0")

    # Dead letters: list, show, replay a small and the large letter (each comes back as a new
    # entry and is dead-lettered again), purge a rejected row's letter.
    letters = {fields[b"source_id"]: letter_id for letter_id, fields in admin.xrange(dlq)}
    assert len(json_of(run_cli(env, "dlq", "list", "--limit", "1000", "--json"))["letters"]) == len(dead)
    _, poison = entries_by_outcome(admin, stream)
    small = next(i for i in dead if i != huge_id and i in poison)
    ok(run_cli(env, "dlq", "show", letters[small].decode()))
    ok(run_cli(env, "dlq", "replay", letters[small].decode(), letters[huge_id].decode()))
    rejected = next(i for i in dead if i not in poison)
    ok(run_cli(env, "dlq", "purge", "--yes", letters[rejected].decode()))
    _, dead_now = outcomes(admin, stream)
    expected_letters = dead_now - {small, huge_id, rejected}
    wait_for(lambda: settled(admin, database_url, stream, len(expected_letters)), 30, interval_s=0.2,
             what="the replayed letters dead-lettered again")

    processor.signal(signal.SIGTERM)
    assert processor.wait(30) == ExitCode.OK
    stored, _ = outcomes(admin, stream)
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT device_id, ts FROM positions").fetchall()
    assert len(rows) == len(set(rows)) and set(rows) == stored
    sources = [fields[b"source_id"] for _, fields in admin.xrange(dlq)]
    assert len(sources) == len(set(sources)) and set(sources) == expected_letters
    assert admin.xpending(stream, "processor")["pending"] == 0
    assert admin.get(f"{stream}:group:processor:lost") == b"1", "the entry deleted while pending is counted once"
    assert processor.log_messages().count("shard spawned") == 3, "the killed shard alone was restarted"
    assert denials(admin) == []


@pytest.mark.parametrize(
    ("missing", "named"),
    [
        ("+xack", "may not run XACK: "),  # the shards' ACK, at the end of their first batch
        ("+xpending", "inside a Lua script"),  # shard 0's claimer's idle pass, once its own pending entries are done
        ("+time", "inside a Lua script"),  # the maintenance process's trimming pass
    ],
)
def test_a_user_missing_one_permission_halts_78_without_restarts(
    admin, acl_env, database_url, start_processor, missing, named
):
    """One line naming the user and the refusal, exit 78, no shard restarted, nothing dead-lettered;
    with the rule whole again, every entry is stored once."""
    stream = acl_env["STREAM_KEY"]
    create_user(admin, rule_for(acl_env), without=(missing,))
    backlog(admin, stream, 300, devices=10, seed=51)
    env = {**acl_env, "SHARDS": "2", "BATCH_SIZE": "50"}
    processor = start_processor(env)
    assert processor.wait(30) == ExitCode.CONFIG
    refusals = [entry for entry in processor.logs() if entry["msg"] in REFUSED]
    assert refusals, processor.log_messages()[-10:]
    assert all(e["error"].startswith("Redis user processor may not ") and named in e["error"] for e in refusals), refusals
    assert password_of(acl_env) not in processor.log_path.read_text()
    assert processor.log_messages().count("shard spawned") == 2, "a refused shard must not be restarted"
    assert not any("restarting" in message for message in processor.log_messages())
    assert not admin.exists(f"{stream}:dlq")

    create_user(admin, rule_for(acl_env))
    again = start_processor(env, name="again")
    wait_settled(admin, database_url, stream, 60)
    assert_exact(admin, database_url, stream)
    again.signal(signal.SIGTERM)
    assert again.wait(30) == ExitCode.OK


@pytest.mark.parametrize(
    ("missing", "command", "named"),
    [("+publish", ("rehydrate", "dev-00001"), "may not run PUBLISH"), ("+xinfo|groups", ("lag",), "may not run XINFO|GROUPS")],
)
def test_an_operator_command_missing_a_permission_exits_78_with_one_line(
    admin, acl_env, database_url, missing, command, named
):
    apply_migrations(database_url)
    backlog(admin, acl_env["STREAM_KEY"], 10, devices=2, seed=52)
    admin.xgroup_create(acl_env["STREAM_KEY"], "processor", id="0")
    create_user(admin, rule_for(acl_env), without=(missing,))
    result = run_cli(acl_env, *command)
    assert result.returncode == ExitCode.CONFIG, result.stderr
    line = one_line(result)
    assert "Redis user processor " in line and named in line, line
    assert password_of(acl_env) not in result.stderr
