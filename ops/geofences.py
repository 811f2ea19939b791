"""`processor geofences import FILE.geojson` and `processor geofences list`.

Running shards notice geofence changes by themselves (a trigger bumps `geofence_revision`,
which they poll), so an import needs no restart.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import orjson
from psycopg.types.json import Jsonb

from common.config import Settings
from common.errors import ExitCode
from ops.errors import postgres
from ops.geofence_file import GeofenceFeature, InvalidGeofences, read_document, validate_document
from ops.terminal import printable, table_lines

# --- import ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportResult:
    inserted: list[tuple[int, str]]  # (id, name) in file order
    updated: list[tuple[int, str]]
    unchanged: list[tuple[int, str]]  # stored already exactly so: left alone, updated_at included

    def actions(self) -> list[tuple[str, list[tuple[int, str]]]]:
        return [("inserted", self.inserted), ("updated", self.updated), ("unchanged", self.unchanged)]

    def as_json(self) -> dict[str, object]:
        return {
            **{action: len(rows) for action, rows in self.actions()},
            "geofences": [{"id": i, "name": n, "action": action} for action, rows in self.actions() for i, n in rows],
        }


def import_file(database_url: str, path: Path) -> ImportResult:
    """Validate every feature of a GeoJSON file, then upsert them all by name in one transaction."""
    features = validate_document(read_document(path), str(path))
    return upsert_geofences(database_url, features)


# One statement, so one revision bump for running shards; xmax = 0 tells a new row. A row
# stored exactly so already is not touched (its updated_at stays) and not returned.
_UPSERT = """
INSERT INTO geofences AS g (name, geometry, radius_m, active)
SELECT f.name, f.geometry, f.radius_m, f.active
FROM jsonb_to_recordset(%s) AS f(name text, geometry jsonb, radius_m double precision, active boolean)
ON CONFLICT (name) DO UPDATE SET
    geometry = EXCLUDED.geometry, radius_m = EXCLUDED.radius_m, active = EXCLUDED.active
WHERE (g.geometry, g.radius_m, g.active) IS DISTINCT FROM (EXCLUDED.geometry, EXCLUDED.radius_m, EXCLUDED.active)
RETURNING id, name, (xmax = 0) AS inserted
"""
_IDS = "SELECT name, id FROM geofences WHERE name = ANY(%s)"


def upsert_geofences(database_url: str, features: list[GeofenceFeature]) -> ImportResult:
    """Insert new names and update changed ones, all in one transaction."""
    rows = [
        {"name": f.name, "geometry": f.geometry, "radius_m": f.radius_m, "active": f.active} for f in features
    ]
    with postgres(database_url) as conn, conn.transaction():
        returned = conn.execute(_UPSERT, (Jsonb(rows),)).fetchall()
        outcome = {name: (geofence_id, inserted) for geofence_id, name, inserted in returned}
        left = [f.name for f in features if f.name not in outcome]
        same = dict(conn.execute(_IDS, (left,)).fetchall()) if left else {}
    result = ImportResult([], [], [])
    for f in features:
        if f.name in same:
            result.unchanged.append((same[f.name], f.name))
        else:
            geofence_id, inserted = outcome[f.name]
            (result.inserted if inserted else result.updated).append((geofence_id, f.name))
    return result


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
    with postgres(database_url) as conn:
        rows = conn.execute(_LIST, (include_inactive,)).fetchall()
    return [GeofenceRow(*row) for row in rows]


# --- the commands ---------------------------------------------------------------------


def add_commands(commands: argparse._SubParsersAction) -> None:
    geofences = commands.add_parser(
        "geofences",
        help="load and list geofences (running shards pick up changes without restart)",
        description="Load and list geofences. Running shards pick up changes within seconds, without restart.",
    )
    actions = geofences.add_subparsers(dest="action", required=True, metavar="ACTION")
    load = actions.add_parser(
        "import",
        help="upsert geofences by name from a GeoJSON file",
        description="Load a GeoJSON FeatureCollection (or a single Feature). Each feature needs "
        "properties.name (unique in the file); a Point needs properties.radius_m in metres (a circle); "
        "properties.active (true/false) defaults to true. Every feature is checked first: any problem "
        "is reported and nothing is written. Then all features are upserted by name in one transaction "
        "(an existing name is updated; geofences missing from the file are left alone). Needs a migrated "
        "database.",
    )
    load.add_argument("file", metavar="FILE.geojson", type=Path, help="the GeoJSON file; - reads it from standard input")
    load.add_argument("--json", action="store_true", help="print the summary as a JSON object")
    load.set_defaults(func=cmd_import)
    show = actions.add_parser(
        "list",
        help="list geofences and how many devices are inside each now",
        description="List geofences: id, name, type (Polygon, MultiPolygon or Circle), radius_m, active, "
        "updated_at and the number of devices inside now (open timing records). By default every "
        "geofence is listed, inactive ones included, with an `active` column; --active-only hides "
        "the inactive ones.",
    )
    which = show.add_mutually_exclusive_group()
    which.add_argument("--all", dest="include_inactive", action="store_true", default=True,
                       help="list inactive geofences too (the default)")
    which.add_argument("--active-only", dest="include_inactive", action="store_false",
                       help="list only active geofences")
    show.add_argument("--json", action="store_true", help="print a JSON array of objects")
    show.set_defaults(func=cmd_list)


def cmd_import(settings: Settings, args: argparse.Namespace) -> int:
    try:
        result = import_file(settings.database_url, args.file)
    except InvalidGeofences as exc:
        for problem in exc.problems:
            print(f"processor: {problem}", file=sys.stderr)
        raise
    if args.json:
        print(orjson.dumps(result.as_json()).decode())
        return ExitCode.OK
    print(f"{args.file}: " + ", ".join(f"{action} {len(rows)}" for action, rows in result.actions()))
    for action, rows in result.actions():
        for geofence_id, name in rows:
            print(f"  {action:<9} {geofence_id:>6}  {printable(name)}")
    return ExitCode.OK


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    rows = list_geofences(settings.database_url, include_inactive=args.include_inactive)
    if args.json:
        print(orjson.dumps([row.as_json() for row in rows]).decode())
        return ExitCode.OK
    table = [("ID", "NAME", "TYPE", "RADIUS_M", "ACTIVE", "UPDATED_AT", "INSIDE_NOW")]
    for row in rows:
        updated = row.updated_at.isoformat(timespec="seconds") if row.updated_at else "-"
        radius = f"{row.radius_m:g}" if row.radius_m is not None else "-"
        active = "yes" if row.active else "no"
        table.append((str(row.id), printable(row.name), row.type, radius, active, updated, str(row.inside_now)))
    print("\n".join(table_lines(table)))
    if not rows:
        print("(no geofences)")
    return ExitCode.OK
