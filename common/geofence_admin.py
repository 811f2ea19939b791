"""Operator commands on geofences and device state (SPEC §7).

`processor geofences import FILE.geojson`, `processor geofences list` and
`processor rehydrate DEVICE_ID`. The CLI parses arguments and prints; the work is done
here and every failure is a ProcessorError with a one-line message that never shows a
password. Running shards notice geofence changes by themselves (a trigger bumps
`geofence_revision`, which they poll), so an import needs no restart.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import psycopg.errors
import redis
from psycopg.types.json import Jsonb

from common.config import Settings, redact_url
from common.errors import ProcessorError
from common.keys import DEVICE_LOCK_CLASS, rehydrate_channel
from common.logs import scrub
from shard.geo import GeometryError, parse_geofence

CONNECT_TIMEOUT_S = 10
REDIS_TIMEOUT_S = 10.0
MAX_DEVICE_ID_CHARS = 64  # SPEC §2, as shard.decode checks it
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class SchemaMissing(ProcessorError):
    """The database has not been migrated (far enough) for this command."""


class InvalidGeofences(ProcessorError):
    """The file has problems; `problems` holds one line each. Nothing was written."""

    def __init__(self, source: str, problems: list[str]) -> None:
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{source}: {count} found; nothing was written")
        self.problems = problems


# --- import ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GeofenceFeature:
    """One validated feature of an import file."""

    name: str
    geometry: dict[str, Any]
    radius_m: float | None
    active: bool


@dataclass(frozen=True)
class ImportResult:
    inserted: list[tuple[int, str]]  # (id, name) in file order
    updated: list[tuple[int, str]]

    def as_json(self) -> dict[str, object]:
        return {
            "inserted": len(self.inserted),
            "updated": len(self.updated),
            "geofences": [
                {"id": i, "name": n, "action": action}
                for action, rows in (("inserted", self.inserted), ("updated", self.updated))
                for i, n in rows
            ],
        }


def import_file(database_url: str, path: Path) -> ImportResult:
    """Validate every feature of a GeoJSON file, then upsert them all by name in one transaction."""
    features = validate_document(read_document(path), str(path))
    return upsert_geofences(database_url, features)


def read_document(path: Path) -> object:
    """The parsed JSON of `path`; a missing, unreadable or non-JSON file is a ProcessorError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ProcessorError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ProcessorError(f"{path}: is a directory, not a GeoJSON file") from None
    except OSError as exc:
        raise ProcessorError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProcessorError(f"{path}: not valid JSON: {exc}") from None


def validate_document(document: object, source: str) -> list[GeofenceFeature]:
    """Every feature checked (properties, geometry, unique names) before anything is written.

    Raises InvalidGeofences listing every problem, each naming its feature's index and name.
    """
    features = _features_of(document, source)
    problems: list[str] = []
    valid: list[GeofenceFeature] = []
    first_index: dict[str, int] = {}
    for index, feature in enumerate(features):
        parsed, feature_problems = check_feature(index, feature)
        problems.extend(f"{source}: {problem}" for problem in feature_problems)
        if parsed is None:
            continue
        if parsed.name in first_index:
            problems.append(
                f"{source}: {_label(index, parsed.name)}: the name is also used by feature "
                f"{first_index[parsed.name]}; names must be unique"
            )
            continue
        first_index[parsed.name] = index
        valid.append(parsed)
    if problems:
        raise InvalidGeofences(source, problems)
    return valid


def _features_of(document: object, source: str) -> list[object]:
    if not isinstance(document, dict):
        kind = _json_kind(document)
        raise ProcessorError(f"{source}: expected a GeoJSON FeatureCollection or Feature, got a JSON {kind}")
    kind = document.get("type")
    if kind == "Feature":
        return [document]
    if kind != "FeatureCollection":
        raise ProcessorError(f"{source}: expected a GeoJSON FeatureCollection or Feature, got type {kind!r}")
    features = document.get("features")
    if not isinstance(features, list):
        raise ProcessorError(f"{source}: a FeatureCollection needs a \"features\" array")
    if not features:
        raise ProcessorError(f"{source}: the FeatureCollection has no features; nothing to import")
    return features


def check_feature(index: int, feature: object) -> tuple[GeofenceFeature | None, list[str]]:
    """The feature as a GeofenceFeature, or None and one line per problem."""
    if not isinstance(feature, dict):
        return None, [f"feature {index}: not a GeoJSON Feature object (got a JSON {_json_kind(feature)})"]
    properties = feature.get("properties")
    if properties is None:
        properties = {}
    if not isinstance(properties, dict):
        return None, [f"feature {index}: \"properties\" must be an object"]
    name = properties.get("name")
    label = _label(index, name if isinstance(name, str) else None)
    problems: list[str] = []
    if feature.get("type") != "Feature":
        problems.append(f"{label}: \"type\" must be \"Feature\", got {feature.get('type')!r}")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{label}: properties.name is required (a non-empty string)")
    elif _CONTROL.search(name):
        problems.append(f"{label}: properties.name must not contain control characters")
    radius_m = properties.get("radius_m")
    radius_ok = radius_m is None or (_is_number(radius_m) and math.isfinite(radius_m) and radius_m > 0)
    if not radius_ok:
        problems.append(f"{label}: properties.radius_m must be a positive number of metres, got {radius_m!r}")
    active = properties.get("active")
    if active is not None and not isinstance(active, bool):
        problems.append(f"{label}: properties.active must be true or false, got {active!r}")
    geometry = feature.get("geometry")
    if not isinstance(geometry, dict):
        problems.append(f"{label}: the feature has no geometry object")
    elif geometry.get("type") != "Point" and radius_m is not None:
        problems.append(f"{label}: properties.radius_m applies only to a Point geometry (a circle)")
    elif radius_ok:
        try:
            parse_geofence(index, name if isinstance(name, str) else "", geometry, radius_m)
        except GeometryError as exc:
            problems.append(f"{label}: {exc}")
    if problems:
        return None, problems
    assert isinstance(name, str) and isinstance(geometry, dict)
    radius = float(radius_m) if radius_m is not None else None
    return GeofenceFeature(name, geometry, radius, active if active is not None else True), []


def _label(index: int, name: str | None) -> str:
    return f"feature {index} {orjson.dumps(name).decode()}" if name else f"feature {index} (no name)"


def _is_number(value: object) -> bool:
    return type(value) in (int, float)


def _json_kind(value: object) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return kinds.get(type(value), "null")


# One statement, so one revision bump for running shards; xmax = 0 tells a new row.
_UPSERT = """
INSERT INTO geofences (name, geometry, radius_m, active)
SELECT f.name, f.geometry, f.radius_m, f.active
FROM jsonb_to_recordset(%s) AS f(name text, geometry jsonb, radius_m double precision, active boolean)
ON CONFLICT (name) DO UPDATE SET
    geometry = EXCLUDED.geometry, radius_m = EXCLUDED.radius_m, active = EXCLUDED.active
RETURNING id, name, (xmax = 0) AS inserted
"""


def upsert_geofences(database_url: str, features: list[GeofenceFeature]) -> ImportResult:
    """Insert new names and update existing ones, all in one transaction."""
    rows = [
        {"name": f.name, "geometry": f.geometry, "radius_m": f.radius_m, "active": f.active} for f in features
    ]
    with _database(database_url) as conn, conn.transaction():
        returned = conn.execute(_UPSERT, (Jsonb(rows),)).fetchall()
    outcome = {name: (geofence_id, inserted) for geofence_id, name, inserted in returned}
    inserted = [(outcome[f.name][0], f.name) for f in features if outcome[f.name][1]]
    updated = [(outcome[f.name][0], f.name) for f in features if not outcome[f.name][1]]
    return ImportResult(inserted, updated)


# --- list -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GeofenceRow:
    id: int
    name: str
    type: str  # Polygon, MultiPolygon or Circle
    radius_m: float | None
    active: bool
    updated_at: datetime | None
    inside_now: int  # devices with an open visit

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "type": self.type,
            "radius_m": self.radius_m,
            "active": self.active,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
            "inside_now": self.inside_now,
        }


_LIST = """
SELECT g.id, g.name,
       CASE WHEN g.geometry->>'type' = 'Point' THEN 'Circle' ELSE g.geometry->>'type' END,
       g.radius_m, g.active, g.updated_at,
       (SELECT count(DISTINCT t.device_id) FROM timing_records t
        WHERE t.geofence_id = g.id AND t.exited_at IS NULL)
FROM geofences g
WHERE g.active OR %s
ORDER BY g.id
"""


def list_geofences(database_url: str, include_inactive: bool = True) -> list[GeofenceRow]:
    """Every geofence (or only the active ones) with how many devices are inside now."""
    with _database(database_url) as conn:
        rows = conn.execute(_LIST, (include_inactive,)).fetchall()
    return [GeofenceRow(*row) for row in rows]


# --- rehydrate ------------------------------------------------------------------------


@dataclass(frozen=True)
class RehydrateResult:
    device_id: str
    known: bool  # has a last_position row
    state_version: int | None  # the new row version, when known
    receivers: int  # subscribers (running shards) the request reached

    def as_json(self) -> dict[str, object]:
        return {
            "device_id": self.device_id,
            "known": self.known,
            "state_version": self.state_version,
            "shards_notified": self.receivers,
        }


# Under the device's lock, so it cannot land between a shard's read of the version and its
# write of version + 1 (which would overwrite the bump with the same number).
_LOCK_DEVICE = "SELECT pg_advisory_xact_lock(%s, hashtext(%s))"
_BUMP_VERSION = """
UPDATE last_position SET state_version = state_version + 1 WHERE device_id = %s RETURNING state_version
"""


def check_device_id(device_id: str) -> str:
    """SPEC §2's rule for device ids; raises ValueError with the reason."""
    if not 0 < len(device_id) <= MAX_DEVICE_ID_CHARS:
        raise ValueError(f"a device id has 1-{MAX_DEVICE_ID_CHARS} characters, got {len(device_id)}")
    if _CONTROL.search(device_id):
        raise ValueError("a device id has no control characters")
    return device_id


def rehydrate(settings: Settings, device_id: str) -> RehydrateResult:
    """Make every shard reload the device from Postgres.

    First the row version is bumped, so any cached copy is stale even in a shard that
    misses the message; then the id is published for running shards to drop it now.
    """
    with _database(settings.database_url) as conn, conn.transaction():
        conn.execute(_LOCK_DEVICE, (DEVICE_LOCK_CLASS, device_id))
        row = conn.execute(_BUMP_VERSION, (device_id,)).fetchone()
    state_version = int(row[0]) if row is not None else None
    try:
        with redis.Redis.from_url(
            settings.redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        ) as client:
            receivers = int(client.publish(rehydrate_channel(settings.stream_key), device_id))
    except redis.RedisError as exc:
        bumped = f"; its state_version is bumped to {state_version}, so shards reload it at its next fix" if row else ""
        raise ProcessorError(
            f"cannot notify the shards about device {device_id!r} through Redis at "
            f"{redact_url(settings.redis_url)}: {_one_line(exc)}{bumped}"
        ) from None
    return RehydrateResult(device_id, row is not None, state_version, receivers)


# --- Postgres -------------------------------------------------------------------------


@contextmanager
def _database(url: str) -> Iterator[psycopg.Connection]:
    """A connection; connection and schema problems become one-line ProcessorErrors."""
    try:
        conn = psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S, application_name="processor-cli")
    except psycopg.OperationalError as exc:
        raise ProcessorError(f"cannot connect to Postgres at {redact_url(url)}: {_one_line(exc)}") from None
    try:
        with conn:
            yield conn
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
        raise SchemaMissing(
            f"the database schema is missing or out of date ({_one_line(exc)}); run `processor migrate` first"
        ) from None
    except psycopg.OperationalError as exc:
        raise ProcessorError(f"Postgres at {redact_url(url)} failed: {_one_line(exc)}") from None
    except psycopg.Error as exc:
        raise ProcessorError(f"Postgres rejected the command: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    """The error's own message on one line (Postgres' primary message, without the SQL excerpt)."""
    diag = getattr(exc, "diag", None)
    text = (diag.message_primary if diag is not None else None) or str(exc)
    return scrub(" ".join(text.split()) or type(exc).__name__)
