"""The shard's geofence index, and the rule that makes geofence changes order-proof.

SPEC §5 "Derived state is order-proof" with geofences that change while fixes flow:
each device's history switches from one geofence set to the next at one point, the
same for every shard and instance, as a serial replay that applies each change at its
commit would. `GeofenceSource.for_revision` is where that is decided, inside each
batch's transaction, after the device locks are taken:

- The batch reads `geofence_revision` in a statement that starts after its device locks
  were granted (the state load; a statement that waited for a lock took its snapshot
  before waiting, so the lock statement itself could miss a change). If the revision
  differs from the held index's, the active geofences are loaded in the same transaction
  and the batch is derived with them; the new index is kept for the next batches.
- The device locks serialize the transactions of one device: the next one's post-lock
  statement starts after the previous one committed, so its snapshot is the later one.
- Every change to `geofences` bumps the revision in its own transaction (a trigger), and
  the row lock on `geofence_revision` orders the bumps as their commits: revisions only
  grow, and a snapshot that sees revision r sees exactly the geofences of revision r.

So the revisions a device's transactions use never go down, and each uses the newest
one committed before its post-lock statement: a change committed between two of them
takes effect for the later one and for every one after it. Two shards can never use
different geofence sets for the same stretch of a device's history. The 2 s poll
(`refresh`, on a connection of its own) only warms the index up for idle shards, so that
a change is often loaded outside a batch; correctness does not depend on it.

Each fix is stored with the revision its batch derived it with, and every version of every
geofence is kept (migrations/0006_geofence_history.sql): a late fix's replay evaluates each
stored fix with the index of its own revision (`at`), so a change never reaches the history
before it, whichever shard's batch happens to replay it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import psycopg

from common.postgres import POOLER_SAFE
from shard.geo import GeofenceIndex, GeometryError, parse_geofence

log = logging.getLogger("processor.geofences")

_REVISION = "SELECT revision FROM geofence_revision"
# The revision and the geofences it stands for, from one snapshot (one statement): one row
# with a null id when no geofence is active.
_ACTIVE = """
SELECT r.revision, g.id, g.name, g.geometry, g.radius_m
FROM geofence_revision r LEFT JOIN geofences g ON g.active
ORDER BY g.id
"""


# The geofences active at a revision, from their versions; one row with a null id when none was.
_AT_REVISION = """
SELECT r.revision, v.geofence_id, v.name, v.geometry, v.radius_m
FROM (SELECT %(revision)s::bigint AS revision) AS r LEFT JOIN (
    SELECT DISTINCT ON (geofence_id) geofence_id, name, geometry, radius_m, active
    FROM geofence_versions WHERE revision <= %(revision)s ORDER BY geofence_id, revision DESC
) AS v ON v.active
ORDER BY v.geofence_id
"""
POLL_TIMEOUT_S = 10.0  # a poll unanswered this long is an outage (as a Redis call is after 10 s)
LOAD_TIMEOUT_S = 300.0  # and a load of the geofences that takes this long
HISTORY_HELD = 8  # indexes of earlier revisions kept for replays (a change or two behind, usually)
# The revision migration 0006 found: fixes stored before it carry no revision of their own.
_HISTORY_SINCE = "SELECT history_since FROM geofence_revision"


class GeofenceSource:
    """Holds the current index: swapped by the poll (`refresh`) or inside a batch (`for_revision`).

    The poll uses a connection of its own: the writer's is inside a batch transaction.
    """

    def __init__(self, database_url: str, application_name: str) -> None:
        self.database_url = database_url
        self.application_name = application_name
        self.index = GeofenceIndex([], revision=-1)
        self.history: dict[int, GeofenceIndex] = {}  # earlier revisions, oldest use first
        self.history_since: int | None = None
        self.conn: psycopg.AsyncConnection | None = None

    async def for_revision(self, cur: psycopg.AsyncCursor, revision: int) -> GeofenceIndex:
        """The index a batch derives with, given the revision its post-lock statement read.

        The held index if it is of that revision; otherwise the active geofences are loaded
        through `cur` (in the batch's transaction, so from a snapshot at least as new) and
        the new index is kept. See the module's docstring for why this is order-proof.
        """
        if revision == self.index.revision:
            return self.index
        await cur.execute(_ACTIVE)
        self.index = await build(await cur.fetchall(), "batch")
        return self.index

    async def at(self, cur: psycopg.AsyncCursor, revision: int | None, current: GeofenceIndex) -> GeofenceIndex:
        """The index that fixes derived with `revision` were evaluated with: `current` for its own
        revision; else rebuilt from the geofences' versions through `cur`, and kept for the next
        replays. Fixes stored before revisions were recorded (None) take the revision migration
        0006 found: the nearest known, and the same in every replay."""
        if revision is None:
            if self.history_since is None:
                await cur.execute(_HISTORY_SINCE)
                self.history_since = (await cur.fetchone())[0]  # type: ignore[index]
            revision = self.history_since
        if revision == current.revision:
            return current
        held = self.history.pop(revision, None)
        if held is None:
            await cur.execute(_AT_REVISION, {"revision": revision})
            held = await build(await cur.fetchall(), "replay")
            while len(self.history) >= HISTORY_HELD:
                del self.history[next(iter(self.history))]
        self.history[revision] = held
        return held

    async def refresh(self, timeout_s: float = POLL_TIMEOUT_S) -> bool:
        """The poll: reload if the geofences changed; returns whether it did.

        A look at the revision unanswered within `timeout_s` (a frozen server, or one cut off
        without a reset: neither is ever reported by the socket) raises TimeoutError, an outage,
        and drops its connection: an idle shard learns of such a Postgres here, and /healthz
        says so. Loading the set (large, perhaps, over a slow link) may take LOAD_TIMEOUT_S.
        """
        held = self.index
        try:
            async with asyncio.timeout(timeout_s):
                if self.conn is None or self.conn.closed:
                    self.conn = await psycopg.AsyncConnection.connect(
                        self.database_url, autocommit=True, connect_timeout=10, application_name=self.application_name,
                        **POOLER_SAFE,
                    )
                (revision,) = await (await self.conn.execute(_REVISION)).fetchone()  # type: ignore[misc]
            if revision == held.revision:
                return False
            async with asyncio.timeout(LOAD_TIMEOUT_S):
                rows = await (await self.conn.execute(_ACTIVE)).fetchall()
        except (psycopg.Error, TimeoutError):
            await self.close()
            raise
        if self.index is not held:
            return False  # a batch loaded the change meanwhile, from a snapshot at least as new
        index = await build(rows, "poll")
        if self.index is not held:
            return False  # ... or while this one was built
        self.index = index
        return True

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()


async def build(rows: Iterable[tuple], by: str) -> GeofenceIndex:
    """`_build` on a worker thread: checking and indexing polygons of hundreds of thousands of
    vertices takes seconds, and on the event loop that stopped the shard's heartbeat (the
    supervisor aborts a shard silent for 15 s) and let its open batch time out."""
    return await asyncio.to_thread(_build, rows, by)


def _build(rows: Iterable[tuple], by: str) -> GeofenceIndex:
    """An index from the rows of `_ACTIVE`; a geofence with unusable geometry is logged and left out."""
    revision = -1
    geofences = []
    for revision, geofence_id, name, geometry, radius_m in rows:
        if geofence_id is None:
            continue
        try:
            geofences.append(parse_geofence(geofence_id, name, geometry, radius_m))
        except GeometryError as exc:
            log.error("geofence ignored: unusable geometry", extra={"geofence": name, "error": str(exc)})
    log.info("geofences loaded", extra={"active": len(geofences), "revision": revision, "by": by})
    return GeofenceIndex(geofences, revision)
