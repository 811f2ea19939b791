"""Geofence changes while fixes flow: each takes effect at one point of each device's history.

A device drives inside an area that is imported, deactivated and reactivated (each a
committed transaction) while two shards process its fixes and, the whole time, other
devices' fixes. Before each change every fix of the device produced so far is stored, and
the first fix after it is stored before the rest of its phase is produced: so each change
commits between known fixes of the device, and the result must equal a serial replay that
applies each change there (`timeline_replay`). Other devices' batches race with the
changes; they drive through a geofence that never changes, far from the area.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import orjson
import psycopg
import pytest
import redis

from supervisor.migrations import apply_migrations
from tests.e2e.fleet import Timeline, assert_same_result, insert_geofences, stored_result, timeline_replay
from tests.e2e.processes import wait_for
from tests.e2e.test_timing import produce
from tests.e2e.verify import wait_settled

pytestmark = pytest.mark.e2e

T0_MS = 1_772_352_000_000  # 2026-03-01T08:00:00Z
SUBJECT = "subject"
PHASE = 12  # the subject's fixes between two changes


def square(name: str, lat: float, lon: float, half: float) -> dict[str, Any]:
    ring = [[lon - half, lat - half], [lon + half, lat - half], [lon + half, lat + half], [lon - half, lat + half]]
    return {"name": name, "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}, "radius_m": None}


AREA = square("area", 50.0, 10.0, 0.005)  # the one that changes
DEPOT = square("depot", 51.0, 11.0, 0.005)  # the other devices', never changed


def subject_fix(k: int) -> dict[str, Any]:
    """Inside the area, but for an excursion east in the middle of each phase (crossings)."""
    step = k % PHASE
    if 4 <= step <= 6:
        lat, lon = 50.001, 10.004 + 0.002 * (step - 3)
    else:
        lat, lon = 50.0 + 0.003 * math.cos(k * 0.5), 10.0 + 0.003 * math.sin(k * 0.5)
    return {"device_id": SUBJECT, "ts": T0_MS + k * 1000, "lat": lat, "lon": lon, "speed": 20.0 + k % 7}


class OtherDevices(threading.Thread):
    """Four devices driving in and out of the depot, a fix each every 20 ms, until stopped.

    Also watches, at every round, that no device has two open visits of one geofence.
    """

    def __init__(self, redis_url: str, database_url: str, stream: str) -> None:
        super().__init__(daemon=True)
        self.redis_url, self.database_url, self.stream = redis_url, database_url, stream
        self.fixes: list[dict[str, Any]] = []
        self.doubly_open: list[tuple] = []
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with redis.Redis.from_url(self.redis_url) as client, psycopg.connect(self.database_url, autocommit=True) as db:
                n = 0
                while not self.halt.is_set():
                    fixes = [
                        {"device_id": f"other-{d}", "ts": T0_MS + n * 1000, "lat": 51.0 + 0.001 * d,
                         "lon": 11.0 + 0.008 * math.sin(n * 0.2 + d), "speed": 30.0 + d}
                        for d in range(4)
                    ]
                    produce(client, self.stream, [orjson.dumps(f) for f in fixes])
                    self.fixes.extend(fixes)
                    self.doubly_open.extend(doubly_open(db))
                    n += 1
                    time.sleep(0.02)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        assert self.error is None, self.error


def doubly_open(db: psycopg.Connection) -> list[tuple]:
    return db.execute(
        "SELECT device_id, geofence_id, count(*) FROM timing_records WHERE exited_at IS NULL"
        " GROUP BY 1, 2 HAVING count(*) > 1"
    ).fetchall()


def stored_of_subject(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM positions WHERE device_id = %s", (SUBJECT,)).fetchone()[0]  # type: ignore[index]


# Each step: the statements, each committed on its own, then the active set they leave.
# "flicker" deactivates and reactivates with no fix of the subject between.
DEACTIVATE = "UPDATE geofences SET active = false WHERE name = 'area'"
REACTIVATE = "UPDATE geofences SET active = true WHERE name = 'area'"
IMPORT = "INSERT INTO geofences (name, geometry) VALUES ('area', '%s')" % orjson.dumps(AREA["geometry"]).decode()
CHANGES = [
    ([IMPORT], [DEPOT, AREA]),
    ([DEACTIVATE], [DEPOT]),
    ([REACTIVATE], [DEPOT, AREA]),
    ([DEACTIVATE, REACTIVATE], [DEPOT, AREA]),  # flicker: the visit goes on
    ([DEACTIVATE], [DEPOT]),
    ([REACTIVATE], [DEPOT, AREA]),
]


def test_geofence_changes_while_fixes_flow_equal_a_replay_that_applies_each_at_its_commit(
    redis_url, redis_client, database_url, stream_key, env, start_processor
):
    apply_migrations(database_url)
    insert_geofences(database_url, [DEPOT])
    start_processor({**env, "SHARDS": "2", "BATCH_SIZE": "8"}).wait_for_shards(2)
    others = OtherDevices(redis_url, database_url, stream_key)
    others.start()
    subject: list[dict[str, Any]] = []
    timeline: Timeline = [(None, [DEPOT])]

    def drive(count: int) -> None:
        """The subject's next fixes, a few at a time, among the other devices' flow."""
        for _ in range(count):
            subject.append(subject_fix(len(subject)))
            produce(redis_client, stream_key, [orjson.dumps(subject[-1])])
            if len(subject) % 3 == 0:
                time.sleep(0.03)

    def all_stored() -> None:
        wait_for(lambda: stored_of_subject(database_url) == len(subject), 30, 0.01, what="the subject's fixes stored")

    try:
        drive(PHASE)
        for statements, active in CHANGES:
            all_stored()
            for statement in statements:
                with psycopg.connect(database_url) as conn:
                    conn.execute(statement)
            timeline.append((T0_MS + len(subject) * 1000, active))
            drive(1)  # the first fix after the change, alone
            all_stored()
            drive(PHASE - 1)
        all_stored()
    finally:
        others.stop()
    wait_settled(redis_client, database_url, stream_key, 60)

    expected = timeline_replay(subject + others.fixes, timeline)
    changes_at = {since for since, _ in timeline[1:]}
    subject_rows = [row for row in expected[0] if row[0] == SUBJECT]
    at_changes = [row for row in subject_rows if _ms(row[2]) in changes_at or (row[3] and _ms(row[3]) in changes_at)]
    assert len(at_changes) == 5, "visits opened by the import and reactivations, closed by the deactivations"
    assert any(row[0] != SUBJECT for row in expected[0]), "the other devices are timed too"
    assert_same_result(stored_result(database_url), expected)
    assert others.doubly_open == []
    with psycopg.connect(database_url) as db:
        assert doubly_open(db) == []


def _ms(ts: Any) -> int:
    return round(ts.timestamp() * 1000)
