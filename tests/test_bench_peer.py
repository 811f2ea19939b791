"""The benchmark's best-effort peer stores a tiny backlog exactly: every fix once, the newest per device."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone

import psycopg
import pytest

from scripts.benchmark.versus import PeerRun
from scripts.toolkit.fleet import Fleet
from scripts.toolkit.harness import group_info
from scripts.toolkit.writer import produce
from tests.e2e.processes import wait_for

pytestmark = pytest.mark.e2e
DEADLINE_S = 30.0


def test_peer_stores_a_backlog_exactly(redis_url, redis_client, database_url, runtime_database_url, stream_key,
                                       tmp_path):
    """Two peer processes: 2,500 fixes of 25 devices, 40 of them sent twice and one device's
    older fix last; positions holds each fix once (speed is a real), last_position each device's
    newest, nothing pending, both exit 0 on SIGTERM."""
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": runtime_database_url,
           "MIGRATION_DATABASE_URL": database_url, "STREAM_KEY": stream_key, "CONSUMER_GROUP": "processor"}
    migrated = subprocess.run([sys.executable, "-m", "ops", "migrate"], env=env, capture_output=True, text=True,
                              timeout=120)
    assert migrated.returncode == 0, migrated.stderr
    fixes = list(Fleet(25, seed=7).fixes(2_500))
    sent = fixes + fixes[100:140] + [fixes[30]]  # redeliveries; fixes[30] is older than its device's newest
    redis_client.xgroup_create(stream_key, "processor", id="0", mkstream=True)

    peer = PeerRun(env, tmp_path / "peer.log")
    try:
        with psycopg.connect(database_url, autocommit=True) as db:

            def connected() -> bool:
                peer.check_alive()
                return db.execute("select count(*) from pg_stat_activity where datname = current_database() "
                                  "and application_name like 'peer %'").fetchone()[0] >= 2

            def drained() -> bool:
                peer.check_alive()
                group = group_info(redis_client, stream_key) or {}
                count = db.execute("select count(*) from positions").fetchone()[0]
                return group.get("entries-read") == len(sent) and group.get("pending") == 0 and count >= len(fixes)

            # Both connected (and so past their SIGTERM handler) before the backlog, so both take part.
            wait_for(connected, DEADLINE_S, what="both peers connected")
            assert produce(redis_client, stream_key, sent).valid == len(sent)
            wait_for(drained, DEADLINE_S, what=f"{len(sent)} entries read, none pending, {len(fixes)} rows stored")
            assert peer.stop() == [0, 0]

            stored = db.execute("select device_id, (extract(epoch from ts) * 1000)::bigint, lat, lon, speed::float8, "
                                "attributes from positions").fetchall()
            newest = db.execute("select device_id, ts, lat, lon from last_position").fetchall()
    finally:
        peer.close()

    expected = {(f["device_id"], f["ts"], f["lat"], f["lon"], f["speed"], f["io"]["batt_mv"]) for f in fixes}
    assert len(stored) == len(fixes) == len(expected)
    assert {(d, ts, lat, lon, round(speed, 1), attrs["batt_mv"]) for d, ts, lat, lon, speed, attrs in stored} == expected
    last = {}
    for f in fixes:
        last[f["device_id"]] = f
    assert sorted(newest) == sorted(
        (d, datetime.fromtimestamp(f["ts"] / 1000, timezone.utc), f["lat"], f["lon"]) for d, f in last.items()
    )
    assert redis_client.xpending(stream_key, "processor")["pending"] == 0
