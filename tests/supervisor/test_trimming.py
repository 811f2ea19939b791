"""Stream trimming against a real Redis: the trim point, retention, atomic passes, and the pure computation."""

from __future__ import annotations

import time

import pytest
import redis

from common.config import Settings
from common.status import StatusBoard
from supervisor.trimming import GroupState, StreamDuty, compute_trim_point, read_stream_state
from tests.e2e.processes import wait_for


def duty(env: dict[str, str], retention: str) -> StreamDuty:
    return StreamDuty(Settings.from_env({**env, "STREAM_RETENTION_MS": retention}), StatusBoard(1))


def fill(client: redis.Redis, stream: str, n: int) -> list[bytes]:
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(stream, {"data": str(i)})
    return pipe.execute()


def read_and_ack(client: redis.Redis, stream: str, group: str, read: int, acked: int) -> list[bytes]:
    """The group reads `read` more entries and acknowledges the first `acked` of them."""
    reply = client.xreadgroup(group, f"{group}-c", {stream: ">"}, count=read)
    ids = [entry_id for entry_id, _ in reply[0][1]] if reply else []
    if acked:
        client.xack(stream, group, *ids[:acked])
    return ids


def remaining(client: redis.Redis, stream: str) -> set[bytes]:
    return {entry_id for entry_id, _ in client.xrange(stream)}


def test_nothing_a_lagging_group_has_not_read_or_acked_is_trimmed(redis_client, stream_key, env):
    """Two groups, retention 0: the trim point is the lagging group's oldest pending entry; everything from it stays."""
    ids = fill(redis_client, stream_key, 2_000)
    redis_client.xgroup_create(stream_key, "processor", id="0")
    redis_client.xgroup_create(stream_key, "analytics", id="0")
    read_and_ack(redis_client, stream_key, "processor", 2_000, 2_000)
    read_and_ack(redis_client, stream_key, "analytics", 600, 400)  # 400 done, 200 pending, 1,400 unread
    trimming = duty(env, "0")
    point = trimming.trim()
    assert point is not None and point.safe_id == ids[400].decode() and point.holder == "analytics"
    assert remaining(redis_client, stream_key) == set(ids[400:]), "exactly what every group is done with was trimmed"
    analytics = next(g for g in point.groups if g.group == "analytics")
    assert (analytics.unread, analytics.pending, analytics.needs_from) == (1_400, 200, ids[400].decode())
    # analytics finishes: the stream goes down to its newest entry, which is always kept.
    read_and_ack(redis_client, stream_key, "analytics", 2_000, 0)
    redis_client.xack(stream_key, "analytics", *ids)
    point = trimming.trim()
    assert point.safe_id == ids[-1].decode() and point.holder is None
    assert remaining(redis_client, stream_key) == {ids[-1]}


def test_retention_0_trims_a_quiet_stream_at_once(redis_client, stream_key, env):
    """Ten entries, read and acknowledged: one pass leaves only the newest (approximate trimming
    alone keeps a node of up to 100 entries until it fills, on a quiet stream for ever)."""
    ids = fill(redis_client, stream_key, 10)
    redis_client.xgroup_create(stream_key, "processor", id="0")
    read_and_ack(redis_client, stream_key, "processor", 10, 10)
    assert duty(env, "0").trim() is not None
    assert remaining(redis_client, stream_key) == {ids[-1]}
    assert redis_client.hget(f"{stream_key}:trim:last", "removed") == b"9"


@pytest.mark.parametrize("deleted", ["stream", "group"])
def test_a_stream_or_group_deleted_while_it_is_looked_at_is_looked_at_again(redis_client, stream_key, env, deleted):
    """`processor lag`, `retention` and the gauges look in several commands: the stream deleted
    between them (`no such key`) is no stream, and a group deleted between them (NOGROUP) is
    looked at again without it, rather than the command failing with Redis' refusal."""
    fill(redis_client, stream_key, 10)
    for group in ("processor", "gone"):
        redis_client.xgroup_create(stream_key, group, id="0")
        read_and_ack(redis_client, stream_key, group, 5, 2)

    class DeletingOnce(redis.Redis):
        """The real Redis, with the deletion landing between the look's first commands."""

        done = False

        def xinfo_groups(self, name):  # type: ignore[no-untyped-def]
            groups = super().xinfo_groups(name)
            if not DeletingOnce.done:
                DeletingOnce.done = True
                if deleted == "stream":
                    self.delete(stream_key)
                else:
                    self.xgroup_destroy(stream_key, "gone")
            return groups

    client = DeletingOnce(connection_pool=redis_client.connection_pool)
    state = read_stream_state(client, Settings.from_env({**env, "STREAM_RETENTION_MS": "off"}))
    if deleted == "stream":
        assert state is None
    else:
        assert state is not None and [g.group for g in state.point.groups] == ["processor"]


def test_the_script_and_the_pure_function_agree(redis_client, stream_key, env):
    """read_stream_state (plain reads + compute_trim_point) finds the safe id the script used."""
    ids = fill(redis_client, stream_key, 300)
    for group, read, acked in (("processor", 250, 100), ("a", 50, 50), ("b", 0, 0)):
        redis_client.xgroup_create(stream_key, group, id="0")
        if read:
            read_and_ack(redis_client, stream_key, group, read, acked)
    settings = Settings.from_env({**env, "STREAM_RETENTION_MS": "off"})
    state = read_stream_state(redis_client, settings)
    assert state is not None and state.point.safe_id == ids[0].decode() and state.point.holder == "b"
    point = duty(env, "off").trim()
    assert point.safe_id == state.point.safe_id and redis_client.xlen(stream_key) == 300, "off never trims"
    assert not redis_client.exists(f"{stream_key}:trim:history")


def test_without_our_group_nothing_is_trimmed(redis_client, stream_key, env):
    """Another group being done is not enough: our shards have not processed anything yet."""
    ids = fill(redis_client, stream_key, 500)
    redis_client.xgroup_create(stream_key, "analytics", id="0")
    read_and_ack(redis_client, stream_key, "analytics", 500, 500)
    point = duty(env, "0").trim()
    assert point is not None and point.safe_id is None
    assert remaining(redis_client, stream_key) == set(ids)


def test_a_deleted_pending_entry_holds_the_trim_point_until_acknowledged(redis_client, stream_key, env):
    """A pending id whose entry was XDELed still counts as needed; once ACKed, trimming goes past it."""
    ids = fill(redis_client, stream_key, 1_000)
    redis_client.xgroup_create(stream_key, "processor", id="0")
    read_and_ack(redis_client, stream_key, "processor", 1_000, 0)
    redis_client.xack(stream_key, "processor", *ids[:500], *ids[501:])
    redis_client.xdel(stream_key, ids[500])
    trimming = duty(env, "0")
    assert trimming.trim().safe_id == ids[500].decode()
    assert set(ids[501:]) <= remaining(redis_client, stream_key)
    redis_client.xack(stream_key, "processor", ids[500])
    assert trimming.trim().safe_id == ids[-1].decode()


def test_retention_keeps_entries_for_the_retention_after_they_were_done(redis_client, stream_key, env):
    """Retention 1.5 s: entries go 1.5 s after the pass that first saw every group done with them, not before."""
    ids = fill(redis_client, stream_key, 1_000)
    redis_client.xgroup_create(stream_key, "processor", id="0")
    read_and_ack(redis_client, stream_key, "processor", 500, 500)
    trimming = duty(env, "1500")
    first_seen = time.monotonic()
    trimming.trim()
    assert redis_client.xlen(stream_key) == 1_000, "nothing was done 1.5 s ago"
    wait_for(lambda: trimming.trim() and redis_client.xlen(stream_key) < 1_000, 10, what="the first half to be trimmed")
    assert time.monotonic() - first_seen >= 1.5
    assert set(ids[500:]) <= remaining(redis_client, stream_key), "entries not done yet were trimmed"
    read_and_ack(redis_client, stream_key, "processor", 500, 500)  # the rest is done now
    second_seen = time.monotonic()
    trimming.trim()
    assert set(ids[500:]) <= remaining(redis_client, stream_key), "entries just done were trimmed at once"
    wait_for(lambda: trimming.trim() and redis_client.xlen(stream_key) <= 100, 10, what="the second half to be trimmed")
    assert time.monotonic() - second_seen >= 1.5
    history = redis_client.xrange(f"{stream_key}:trim:history")
    assert len(history) == 1, "the history keeps only the record retention uses now"


def test_a_group_created_later_is_never_trimmed_past(redis_client, stream_key, env):
    """A pass with an older recorded point never trims past what a group created since needs (history vs now)."""
    ids = fill(redis_client, stream_key, 1_000)
    redis_client.xgroup_create(stream_key, "processor", id="0")
    read_and_ack(redis_client, stream_key, "processor", 1_000, 1_000)
    trimming = duty(env, "300")
    trimming.trim()  # records: everything done
    redis_client.xgroup_create(stream_key, "late", id=ids[199])  # needs ids[200:]
    wait_for(lambda: trimming.trim() and redis_client.xlen(stream_key) < 1_000, 10, what="a trim")
    assert set(ids[200:]) <= remaining(redis_client, stream_key)
    assert trimming.last is not None and trimming.last.holder == "late"


def test_a_pass_records_itself_for_processor_lag(redis_client, stream_key, env):
    """The last pass is kept in <STREAM_KEY>:trim:last; read_stream_state shows it and the next target."""
    fill(redis_client, stream_key, 10)
    redis_client.xgroup_create(stream_key, "processor", id="0")
    read_and_ack(redis_client, stream_key, "processor", 10, 10)
    duty(env, "0").trim()
    state = read_stream_state(redis_client, Settings.from_env({**env, "STREAM_RETENTION_MS": "0"}))
    assert state is not None and state.last_trim["instance"] == env["INSTANCE_ID"]
    assert state.next_target == state.point.safe_id and state.as_json()["groups"][0]["group"] == "processor"


def test_compute_trim_point_names_the_holder_and_how_far_beyond_retention() -> None:
    """Pure: the smallest needed id wins; blocked = age beyond retention; a group that is done needs nothing."""
    now = 10_000_000
    groups = [
        GroupState("processor", f"{now - 1_000}-0", 2, f"{now - 2_000}-0", f"{now - 900}-0", 10, 5),
        GroupState("analytics", f"{now - 600_000}-3", 0, None, f"{now - 500_000}-0", 1, 7_000),
        GroupState("done", f"{now}-0", 0, None, None, 20, 0),
    ]
    point = compute_trim_point(groups, "processor", f"{now}-0", now, 60_000)
    assert point.safe_id == f"{now - 500_000}-0" and point.holder == "analytics"
    holds = {g.group: g for g in point.groups}
    assert holds["analytics"].blocked_ms == 440_000 and holds["analytics"].unread == 7_000
    assert holds["processor"].blocked_ms == 0 and holds["processor"].needs_from == f"{now - 2_000}-0"
    assert holds["done"].needs_from is None and holds["done"].oldest_needed_age_ms == 0 and holds["done"].unread == 0
    assert [g.group for g in point.holding_back(60_000)] == ["analytics"]
    assert compute_trim_point(groups[1:], "processor", f"{now}-0", now, 0).safe_id is None, "our group is missing"
    off = compute_trim_point(groups, "processor", f"{now}-0", now, None)
    assert off.safe_id == f"{now - 500_000}-0" and not off.holding_back()


def test_a_group_whose_name_is_not_utf8_is_read_and_holds_back_the_trim(redis_client, stream_key, env):
    """Another application's group named b"legacy-\\xe9t\\xe9", with entries pending: the stream's state
    is read (the gauges and `processor lag` show it, escaped), and the maintenance pass trims no
    entry that group still needs."""
    ids = fill(redis_client, stream_key, 100)
    redis_client.xgroup_create(stream_key, "processor", id="0")
    read_and_ack(redis_client, stream_key, "processor", 100, 100)
    redis_client.xgroup_create(stream_key, b"legacy-\xe9t\xe9", id="0")
    read_and_ack(redis_client, stream_key, b"legacy-\xe9t\xe9", 40, 10)
    state = read_stream_state(redis_client, Settings.from_env({**env, "STREAM_RETENTION_MS": "0"}))
    assert state is not None and state.point.holder == "legacy-\\xe9t\\xe9"
    legacy = next(g for g in state.point.groups if g.group == "legacy-\\xe9t\\xe9")
    assert legacy.pending == 30 and legacy.needs_from == ids[10].decode()
    point = duty(env, "0").trim()
    assert point.safe_id == ids[10].decode() and point.holder == "legacy-\\xe9t\\xe9"
    assert [entry_id for entry_id, _ in redis_client.xrange(stream_key, min=ids[10])] == ids[10:]


def test_a_pass_forgets_the_letters_of_entries_that_can_never_be_read_again(redis_client, stream_key, env):
    """`<STREAM_KEY>:lettered` (one member per dead letter) shrinks with the stream: what lies below its
    first entry goes; an emptied stream takes the whole set with it."""
    ids = fill(redis_client, stream_key, 10)
    redis_client.xgroup_create(stream_key, "processor", id="0")
    read_and_ack(redis_client, stream_key, "processor", 10, 10)
    lettered = f"{stream_key}:lettered"
    redis_client.zadd(lettered, {b"%s processor" % i: int(i.split(b"-")[0]) for i in (ids[0], ids[-1])})
    redis_client.zadd(lettered, {b"1-0 processor": 1})  # an entry trimmed long ago
    redis_client.xdel(stream_key, *ids[:5])
    assert duty(env, "off").trim() is not None  # retention off: nothing trimmed, the set still looked after
    kept = set(redis_client.zrange(lettered, 0, -1))
    assert b"1-0 processor" not in kept and b"%s processor" % ids[-1] in kept
    redis_client.xtrim(stream_key, maxlen=0)
    duty(env, "off").trim()
    assert redis_client.exists(lettered) == 0
