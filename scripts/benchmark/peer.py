"""The best-effort peer: a tuned consumer that stores positions and last_position, nothing else.

Issue 12 measures the Processor beside it. One process is one consumer of the group; the
benchmark starts two. Each batch: XREADGROUP COUNT 1,000 (raw reply, no per-entry dict),
orjson decode, a binary COPY into a temporary staging table, then one round trip with
`INSERT … ON CONFLICT DO NOTHING` into positions and the `last_position` upsert (greatest ts
wins), commit, and the XACK sent together with the next XREADGROUP. No validation beyond what
the simulated fleet needs, no derived state, no geofences, no dead letters, no claiming.

    python -m scripts.benchmark.peer CONSUMER     # REDIS_URL, DATABASE_URL, STREAM_KEY, CONSUMER_GROUP

SIGTERM: the batch in hand is committed and acknowledged, then exit 0.
"""

from __future__ import annotations

import signal

# Before the slow imports: a SIGTERM from then on stops the peer cleanly (exit 0).
_STOP: list[bool] = []
signal.signal(signal.SIGTERM, lambda _signum, _frame: _STOP.append(True))

import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import orjson  # noqa: E402
import psycopg  # noqa: E402
import redis  # noqa: E402

BATCH = 1_000
BLOCK_MS = 100

# ts stays epoch milliseconds until Postgres turns it into a timestamptz (exact, no float).
_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS peer_staging (
    device_id text COLLATE "C", ts_ms bigint, lat double precision, lon double precision,
    alt real, speed real, heading real, sats smallint, attributes jsonb
) ON COMMIT DELETE ROWS
"""
_COPY = "COPY peer_staging FROM STDIN (FORMAT BINARY)"
_TYPES = ("text", "int8", "float8", "float8", "float4", "float4", "float4", "int2", "jsonb")
# The last_position upsert goes in device order (DISTINCT ON ... ORDER BY device_id), so two peers
# upserting the same devices lock those rows in the same order. The positions insert is unordered:
# a deadlock between two peers inserting the same fixes there is retried by store().
_STORE = """
INSERT INTO positions (device_id, ts, lat, lon, alt, speed, heading, sats, attributes)
SELECT device_id, timestamptz 'epoch' + ts_ms * interval '1 millisecond', lat, lon, alt, speed, heading, sats, attributes
FROM peer_staging
ON CONFLICT DO NOTHING;
INSERT INTO last_position AS l (device_id, ts, lat, lon, alt, speed, heading, sats, attributes, updated_at)
SELECT DISTINCT ON (device_id) device_id, timestamptz 'epoch' + ts_ms * interval '1 millisecond',
       lat, lon, alt, speed, heading, sats, attributes, now()
FROM peer_staging
ORDER BY device_id, ts_ms DESC
ON CONFLICT (device_id) DO UPDATE SET
    ts = excluded.ts, lat = excluded.lat, lon = excluded.lon, alt = excluded.alt, speed = excluded.speed,
    heading = excluded.heading, sats = excluded.sats, attributes = excluded.attributes, updated_at = excluded.updated_at
WHERE l.ts < excluded.ts
"""


def _row(data: bytes) -> tuple[Any, ...]:
    fix = orjson.loads(data)
    io = fix.get("io")
    return (fix["device_id"], fix["ts"], fix["lat"], fix["lon"], fix.get("alt"), fix.get("speed"),
            fix.get("heading"), fix.get("sats"), None if io is None else orjson.dumps(io))


class Peer:
    def __init__(self, consumer: str) -> None:
        self.stream = os.environ["STREAM_KEY"].encode()
        self.group = os.environ.get("CONSUMER_GROUP", "processor")
        self.consumer = consumer
        self.redis = redis.Redis.from_url(os.environ["REDIS_URL"])
        self.redis.set_response_callback("XREADGROUP", lambda reply, **_: reply)
        self.db = psycopg.connect(os.environ["DATABASE_URL"], autocommit=True, application_name=f"peer {consumer}")
        self.db.adapters.register_dumper(None, _JsonbBytes)  # COPY's jsonb column: the io object, already JSON
        self.db.execute(_STAGING)

    def run(self) -> int:
        acks: list[bytes] = []
        while True:
            pipe = self.redis.pipeline(transaction=False)
            if acks:
                pipe.xack(self.stream, self.group, *acks)
            if _STOP:
                pipe.execute()
                return 0
            pipe.execute_command("XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", BATCH,
                                 "BLOCK", BLOCK_MS, "STREAMS", self.stream, ">")
            reply = pipe.execute()[-1]
            entries = _entries(reply)
            acks = [entry_id for entry_id, _ in entries]
            if entries:
                self.store([_data(fields) for _, fields in entries])

    def store(self, payloads: list[bytes]) -> None:
        rows = [_row(p) for p in payloads]
        for attempt in range(5):
            try:
                with self.db.transaction(), self.db.cursor() as cur:
                    with cur.copy(_COPY) as copy:
                        copy.set_types(_TYPES)
                        for row in rows:
                            copy.write_row(row)
                    cur.execute(_STORE)
                return
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                if attempt == 4:
                    raise


def _entries(reply: Any) -> list[Any]:
    """[[id, [field, value, ...]], ...] of our one stream, from a RESP2 list or a RESP3 map."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return next(iter(reply.values()))
    return reply[0][1]


def _data(fields: list[bytes]) -> bytes:
    for i in range(0, len(fields), 2):
        if fields[i] == b"data":
            return fields[i + 1]
    raise ValueError("entry without a data field")


class _JsonbBytes(psycopg.adapt.Dumper):
    """JSON text as jsonb in binary COPY: the version byte, then the text as it is."""

    format = psycopg.pq.Format.BINARY
    oid = psycopg.postgres.types["jsonb"].oid

    def dump(self, obj: bytes) -> bytes:
        return b"\x01" + obj


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m scripts.benchmark.peer CONSUMER\n")
        return 2
    return Peer(argv[0]).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
