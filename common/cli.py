"""The `processor` command line (SPEC §7)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import orjson

from common import logs
from common.config import Settings
from common.errors import ExitCode, ProcessorError

log = logging.getLogger("processor.cli")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on a usage error
    try:
        settings = Settings.from_env()
    except ProcessorError as exc:
        print(f"processor: configuration error: {exc}", file=sys.stderr)
        return exc.exit_code
    logs.configure(settings.log_level, args.command)
    try:
        return int(args.func(settings, args))
    except ProcessorError as exc:
        log.error(str(exc))
        print(f"processor: {exc}", file=sys.stderr)
        return exc.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="processor",
        description="Turns the Redis Stream of GPS fixes into Postgres rows. Configured by environment variables.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the supervisor and its shards (the container's command)")
    run.set_defaults(func=cmd_run)
    migrate = commands.add_parser("migrate", help="apply migrations under the advisory lock, then exit")
    migrate.set_defaults(func=cmd_migrate)
    add_geofence_commands(commands)
    rehydrate = commands.add_parser(
        "rehydrate",
        help="make every running shard reload a device's state from Postgres",
        description="Bump the device's state_version in Postgres (so every cached copy is stale, even in a "
        "shard that misses the message), then publish the id so that running shards of every instance "
        "drop it now. The next fix of the device reloads its state. Exits 0 also for an unknown device.",
    )
    rehydrate.add_argument("device_id", metavar="DEVICE_ID", type=_device_id, help="the device_id, as in the stream")
    rehydrate.add_argument("--json", action="store_true", help="print the outcome as a JSON object")
    rehydrate.set_defaults(func=cmd_rehydrate)
    return parser


def add_geofence_commands(commands: argparse._SubParsersAction) -> None:
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
    load.add_argument("file", metavar="FILE.geojson", type=Path, help="the GeoJSON file")
    load.add_argument("--json", action="store_true", help="print the summary as a JSON object")
    load.set_defaults(func=cmd_geofences_import)
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
    show.set_defaults(func=cmd_geofences_list)


def cmd_run(settings: Settings, _args: argparse.Namespace) -> int:
    from supervisor.arbiter import Halt, Supervisor

    try:
        return Supervisor(settings).run()
    except Halt as halt:
        return halt.exit_status


def cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    from supervisor.migrations import apply_migrations

    applied = apply_migrations(settings.migration_database_url)
    names = [f"{m.version:04d}_{m.name}" for m in applied]
    log.info("migrations applied" if names else "schema already up to date", extra={"applied": names})
    return ExitCode.OK


def cmd_geofences_import(settings: Settings, args: argparse.Namespace) -> int:
    from common import geofence_admin

    try:
        result = geofence_admin.import_file(settings.database_url, args.file)
    except geofence_admin.InvalidGeofences as exc:
        for problem in exc.problems:
            print(f"processor: {problem}", file=sys.stderr)
        raise
    if args.json:
        print(orjson.dumps(result.as_json()).decode())
        return ExitCode.OK
    print(f"{args.file}: inserted {len(result.inserted)}, updated {len(result.updated)}")
    for action, rows in (("inserted", result.inserted), ("updated", result.updated)):
        for geofence_id, name in rows:
            print(f"  {action:<8} {geofence_id:>6}  {name}")
    return ExitCode.OK


def cmd_geofences_list(settings: Settings, args: argparse.Namespace) -> int:
    from common import geofence_admin

    rows = geofence_admin.list_geofences(settings.database_url, include_inactive=args.include_inactive)
    if args.json:
        print(orjson.dumps([row.as_json() for row in rows]).decode())
        return ExitCode.OK
    table = [("ID", "NAME", "TYPE", "RADIUS_M", "ACTIVE", "UPDATED_AT", "INSIDE_NOW")]
    for row in rows:
        updated = row.updated_at.isoformat(timespec="seconds") if row.updated_at else "-"
        radius = f"{row.radius_m:g}" if row.radius_m is not None else "-"
        active = "yes" if row.active else "no"
        table.append((str(row.id), row.name, row.type, radius, active, updated, str(row.inside_now)))
    print_table(table)
    if not rows:
        print("(no geofences)")
    return ExitCode.OK


def cmd_rehydrate(settings: Settings, args: argparse.Namespace) -> int:
    from common import geofence_admin

    result = geofence_admin.rehydrate(settings, args.device_id)
    if args.json:
        print(orjson.dumps(result.as_json()).decode())
    elif result.known:
        print(f"device {result.device_id!r}: state_version bumped to {result.state_version}; "
              f"{result.receivers} shard(s) received the request to drop it")
    else:
        print(f"device {result.device_id!r} is not known (no last_position row); "
              f"{result.receivers} shard(s) received the request to drop it")
    return ExitCode.OK


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _device_id(text: str) -> str:
    from common.geofence_admin import check_device_id

    try:
        return check_device_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
