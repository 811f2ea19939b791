"""The shard's geofence index, reloaded from Postgres whenever the geofences change."""

from __future__ import annotations

import logging

import psycopg

from shard.geo import GeofenceIndex, GeometryError, parse_geofence

log = logging.getLogger("processor.geofences")

_REVISION = "SELECT revision FROM geofence_revision"
_ACTIVE = "SELECT id, name, geometry, radius_m FROM geofences WHERE active ORDER BY id"


class GeofenceSource:
    """Holds the current index; `refresh()` swaps in a new one when the revision moved.

    Uses a connection of its own: the writer's is inside a batch transaction.
    """

    def __init__(self, database_url: str, application_name: str) -> None:
        self.database_url = database_url
        self.application_name = application_name
        self.index = GeofenceIndex([], revision=-1)
        self.conn: psycopg.AsyncConnection | None = None

    async def refresh(self) -> bool:
        """Reload if the geofences changed; returns whether it did."""
        if self.conn is None or self.conn.closed:
            self.conn = await psycopg.AsyncConnection.connect(
                self.database_url, autocommit=True, connect_timeout=10, application_name=self.application_name
            )
        try:
            (revision,) = await (await self.conn.execute(_REVISION)).fetchone()  # type: ignore[misc]
            if revision == self.index.revision:
                return False
            rows = await (await self.conn.execute(_ACTIVE)).fetchall()
        except psycopg.Error:
            await self.close()
            raise
        geofences = []
        for geofence_id, name, geometry, radius_m in rows:
            try:
                geofences.append(parse_geofence(geofence_id, name, geometry, radius_m))
            except GeometryError as exc:
                log.error("geofence ignored: unusable geometry", extra={"geofence": name, "error": str(exc)})
        self.index = GeofenceIndex(geofences, revision)
        log.info("geofences loaded", extra={"active": len(geofences), "revision": revision})
        return True

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()
