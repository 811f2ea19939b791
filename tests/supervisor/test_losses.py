"""Entries removed before they were delivered to our group: counted once, as exactly as Redis allows."""

from __future__ import annotations

import logging

import pytest
import redis

from common.config import Settings
from supervisor.losses import LossWatch, lost_range, parse

from tests.supervisor.test_trimming import fill, read_and_ack


def watch(settings: Settings, client: redis.Redis) -> LossWatch:
    return LossWatch(settings, client)


def watched(client: redis.Redis, settings: Settings, n: int, read: int, acked: int) -> tuple[list[bytes], LossWatch]:
    """`n` entries, our group has read `read` and acked `acked` of them, and a watch that took its first look."""
    ids = fill(client, settings.stream_key, n)
    client.xgroup_create(settings.stream_key, "processor", id="0")
    read_and_ack(client, settings.stream_key, "processor", read, acked)
    looker = watch(settings, client)
    looker.check()
    return ids, looker


def lost_total(client: redis.Redis, stream: str) -> int:
    return int(client.get(f"{stream}:group:processor:lost") or 0)


def test_a_producer_maxlen_past_unread_entries_is_counted_exactly_once(redis_client, stream_key, settings, caplog):
    """MAXLEN drops 150 entries the group never read: counted 150 at the next look, by one of two instances, once."""
    ids = fill(redis_client, stream_key, 100)
    redis_client.xgroup_create(stream_key, "processor", id="0")
    read_and_ack(redis_client, stream_key, "processor", 50, 50)
    one, two = watch(settings, redis_client), watch(settings, redis.Redis.from_url(settings.redis_url))
    assert one.check() == 0, "the first look only records"
    fill(redis_client, stream_key, 150)
    redis_client.xadd(stream_key, {"data": "x"}, maxlen=51, approximate=False)  # keeps the last 51
    with caplog.at_level(logging.WARNING, logger="processor.maintenance"):
        counted = one.check() + two.check()
    assert counted == 150 and lost_total(redis_client, stream_key) == 150
    record = next(r for r in caplog.records if r.getMessage().startswith("entries lost"))
    assert record.ids_after == ids[49].decode() and record.exact is True
    # The group reads on past the gap: Redis keeps its counter in step, nothing more is counted.
    read_and_ack(redis_client, stream_key, "processor", 1_000, 1_000)
    assert one.check() + two.check() == 0 and lost_total(redis_client, stream_key) == 150


def test_a_trim_the_group_already_skipped_is_still_counted(redis_client, stream_key, settings):
    """Trimmed, then read past before the look: Redis' read counter stays short by the skipped entries."""
    _, looker = watched(redis_client, settings, 20, 10, 10)
    redis_client.xtrim(stream_key, maxlen=4, approximate=False)  # 6 unread entries go
    read_and_ack(redis_client, stream_key, "processor", 100, 100)
    assert looker.check() == 6


def test_an_xdel_of_an_unread_entry_is_counted(redis_client, stream_key, settings):
    """An operator deletes an entry the group has not read: counted exactly while Redis keeps the group's read counter, at least one a hole while it has none."""
    ids, looker = watched(redis_client, settings, 30, 10, 10)
    redis_client.xdel(stream_key, ids[20], ids[21])
    assert looker.check() == 2, "Redis still counts the group's reads: exact"
    read_and_ack(redis_client, stream_key, "processor", 5, 5)  # stops before the hole: Redis drops its counter
    redis_client.xdel(stream_key, ids[25])
    assert looker.check() == 1  # a lower bound while Redis has no counter
    read_and_ack(redis_client, stream_key, "processor", 100, 100)
    assert looker.check() == 0 and lost_total(redis_client, stream_key) == 3


def test_deleting_delivered_entries_and_our_own_trimming_count_nothing(redis_client, stream_key, settings):
    """XDEL of a pending or acknowledged entry is not a loss here (the shards count pending ones)."""
    ids, looker = watched(redis_client, settings, 50, 40, 30)
    redis_client.xdel(stream_key, ids[5], ids[35])
    redis_client.xtrim(stream_key, minid=ids[20])
    assert looker.check() == 0


def test_a_group_created_again_starts_the_watch_over(redis_client, stream_key, settings):
    """The group deleted and created at 0 (a shard does that after NOGROUP): no loss is invented."""
    fill(redis_client, stream_key, 50)
    redis_client.xgroup_create(stream_key, "processor", id="0")
    read_and_ack(redis_client, stream_key, "processor", 50, 50)
    redis_client.xtrim(stream_key, maxlen=10, approximate=False)
    looker = watch(settings, redis_client)
    looker.check()
    redis_client.xgroup_destroy(stream_key, "processor")
    redis_client.xgroup_create(stream_key, "processor", id="0")
    assert looker.check() == 0
    read_and_ack(redis_client, stream_key, "processor", 100, 100)
    assert looker.check() == 0 and lost_total(redis_client, stream_key) == 0


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ([b"counted", 3, 1, b"5-0", b"5-0", b"9-0", b"0-0", 3], {"ids_after": "5-0", "ids_before": "9-0"}),
        ([b"counted", 1, 0, b"5-0", b"7-0", b"1-0", b"8-0", -1], {"ids_after": "5-0", "ids_up_to": "8-0"}),
        ([b"counted", 4, 1, b"5-0", b"5-0", b"9-0", b"12-0", 4], {"ids_after": "5-0", "ids_up_to": "12-0"}),
        ([b"counted", 3, 1, b"5-0", b"5-0", b"9-0", b"3-0", 3], {"ids_after": "5-0", "ids_before": "9-0"}),
    ],
)
def test_the_logged_range(reply, expected) -> None:
    """A trim is reported as ids between the group's position and the first entry; a deletion up to the
    largest deleted id; both in one pass (a deletion beyond the trimmed range) up to the largest deleted id."""
    assert lost_range(parse(reply)) == expected


def test_two_groups_count_their_losses_apart(redis_client, stream_key, settings):
    """Two deployments read one stream through two groups: a trim past entries neither had read is a
    loss of each. With one watch for both, each look reset the other's, and the second group's
    loss went uncounted."""
    import dataclasses

    fill(redis_client, stream_key, 20)
    other = dataclasses.replace(settings, consumer_group="archive")
    lookers = []
    for group_settings in (settings, other):
        redis_client.xgroup_create(stream_key, group_settings.consumer_group, id="0")
        read_and_ack(redis_client, stream_key, group_settings.consumer_group, 5, 5)
        lookers.append(watch(group_settings, redis_client))
    assert [looker.check() for looker in lookers] == [0, 0], "the first looks only record"
    redis_client.xtrim(stream_key, maxlen=5, approximate=False)  # 10 entries neither group read
    assert [looker.check() for looker in lookers] == [10, 10]
    assert lost_total(redis_client, stream_key) == 10
    assert int(redis_client.get(f"{stream_key}:group:archive:lost")) == 10


def test_an_upgrade_starts_from_the_watch_of_earlier_releases(redis_client, stream_key, settings):
    """The watch an earlier release kept for all groups under `<STREAM_KEY>:lost:watch` is where the
    group's own starts: losses that one counted are not counted again."""
    ids, looker = watched(redis_client, settings, 30, 10, 10)
    redis_client.xtrim(stream_key, maxlen=10, approximate=False)  # 10 unread entries go
    assert looker.check() == 10
    watch_key = f"{stream_key}:group:processor:lost-watch"
    redis_client.copy(watch_key, f"{stream_key}:lost:watch")  # as the earlier release left it
    redis_client.delete(watch_key)
    assert watch(settings, redis_client).check() == 0, "nothing counted twice"
    redis_client.delete(watch_key, f"{stream_key}:lost:watch")
    assert watch(settings, redis_client).check() == 10, "without it, the first look counts what Redis shows lost"
