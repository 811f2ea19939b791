"""The `processor` command line (SPEC §7)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import orjson

from common import logs, stream_admin
from common.config import Settings
from common.errors import ExitCode, ProcessorError

log = logging.getLogger("processor.cli")


SERVICE_COMMANDS = ("run", "migrate")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on a usage error
    try:
        settings = Settings.from_env()
    except ProcessorError as exc:
        print(f"processor: configuration error: {exc}", file=sys.stderr)
        return exc.exit_code
    service = args.command in SERVICE_COMMANDS
    # Operator commands keep stdout for their output (and --json); their logs go to stderr.
    logs.configure(settings.log_level, args.command, sys.stdout if service else sys.stderr)
    try:
        return int(args.func(settings, args))
    except ProcessorError as exc:
        if service:
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
    add_stream_commands(commands)
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


def add_stream_commands(commands: argparse._SubParsersAction) -> None:
    lag = commands.add_parser(
        "lag",
        help="stream length, group lag, pending count, per-consumer pending and idle",
        description="Show STREAM_KEY's length; the lag of CONSUMER_GROUP (entries not yet delivered; counted "
        "when Redis cannot report it after deletions); the pending (delivered, unacknowledged) entries and "
        "the oldest of them (age since added, idle since last delivered); per consumer its pending entries "
        "and idle time; and the length of DLQ_KEY. A missing stream or group is reported, not an error.",
    )
    lag.add_argument("--json", action="store_true", help="print a JSON object")
    lag.set_defaults(func=cmd_lag)
    claim = commands.add_parser(
        "claim",
        help="claim stuck entries now and process them",
        description="Claim entries pending in the group longer than --min-idle-ms and process them through "
        "the shards' path (store or dead-letter), then exit.",
    )
    claim.add_argument("--min-idle-ms", type=_non_negative, metavar="N",
                       help="claim entries idle at least N ms (default: CLAIM_THRESHOLD_MS)")
    claim.add_argument("--from", dest="from_consumer", metavar="CONSUMER",
                       help="claim only this consumer's entries (default: every consumer's)")
    claim.add_argument("--json", action="store_true", help="print the counts as a JSON object")
    claim.set_defaults(func=cmd_claim)
    add_dlq_commands(commands)


def add_dlq_commands(commands: argparse._SubParsersAction) -> None:
    dlq = commands.add_parser(
        "dlq",
        help="inspect, re-inject into the input stream, delete dead letters",
        description="Dead letters are entries of DLQ_KEY: the original entry's fields plus error, error_kind, "
        "source_id, source_stream, failures, consumer and failed_at.",
    )
    actions = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    show_list = actions.add_parser(
        "list",
        help="list dead letters, oldest first",
        description="List dead letters, oldest first: id, failed_at, error_kind, source_id, the device_id "
        "(when `data` parses) and the error (shortened; --json gives it whole).",
    )
    show_list.add_argument("--limit", type=_positive, default=stream_admin.DLQ_LIST_DEFAULT, metavar="N",
                           help=f"list at most N letters (default {stream_admin.DLQ_LIST_DEFAULT})")
    show_list.add_argument("--after", type=_entry_id, metavar="ID", help="start after this letter id (next page)")
    show_list.add_argument("--json", action="store_true", help="print a JSON object")
    show_list.set_defaults(func=cmd_dlq_list)
    show = actions.add_parser(
        "show",
        help="show every field of one dead letter",
        description="Show every field of one dead letter; `data` pretty-printed when it is JSON. Control "
        "characters and bytes that are not UTF-8 are shown escaped (--json adds their exact bytes in base64).",
    )
    show.add_argument("letter_id", metavar="ID", type=_entry_id, help="the letter's id in DLQ_KEY")
    show.add_argument("--json", action="store_true", help="print a JSON object")
    show.set_defaults(func=cmd_dlq_show)
    replay = actions.add_parser(
        "replay",
        help="put dead letters back into the input stream",
        description="Re-add each letter's original fields (without the error fields) to STREAM_KEY as a new "
        "entry and delete the letter, atomically per letter. Named letters are all-or-nothing: if any id is "
        "unknown, or a letter came from a stream other than STREAM_KEY, nothing is replayed (exit 1). --all "
        "replays every letter present when the command starts and leaves those of other streams.",
    )
    _add_letter_selection(replay, "replay")
    replay.add_argument("--json", action="store_true", help="print a JSON object")
    replay.set_defaults(func=cmd_dlq_replay)
    purge = actions.add_parser(
        "purge",
        help="delete dead letters",
        description="Delete dead letters. Named letters are all-or-nothing: if any id is unknown nothing is "
        "deleted (exit 1). --all deletes every letter present when asked. Asks for confirmation on a "
        "terminal; without a terminal it needs --yes (else exit 2).",
    )
    _add_letter_selection(purge, "delete")
    purge.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    purge.add_argument("--json", action="store_true", help="print a JSON object")
    purge.set_defaults(func=cmd_dlq_purge)


def _add_letter_selection(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("letter_ids", metavar="ID", nargs="*", type=_entry_id, help=f"letter ids to {verb}")
    parser.add_argument("--all", action="store_true", help=f"{verb} every dead letter")


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


def cmd_lag(settings: Settings, args: argparse.Namespace) -> int:
    report = stream_admin.lag_report(settings)
    _print(report.as_json() if args.json else stream_admin.format_lag(report), args.json)
    return ExitCode.OK


def cmd_claim(settings: Settings, args: argparse.Namespace) -> int:
    from shard.oneshot import claim_now

    counts = claim_now(settings, args.min_idle_ms, args.from_consumer)
    _print(counts if args.json else [stream_admin.format_counts(counts)], args.json)
    return ExitCode.OK


def cmd_dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    page = stream_admin.list_letters(settings, args.limit, args.after)
    _print(page.as_json() if args.json else stream_admin.format_letter_page(page), args.json)
    return ExitCode.OK


def cmd_dlq_show(settings: Settings, args: argparse.Namespace) -> int:
    letter = stream_admin.show_letter(settings, args.letter_id)
    _print(letter.as_json() if args.json else stream_admin.format_letter(letter), args.json)
    return ExitCode.OK


def cmd_dlq_replay(settings: Settings, args: argparse.Namespace) -> int:
    _check_selection(args, "replay")
    if args.all:
        result = stream_admin.replay_all(settings)
    else:
        result = stream_admin.replay(settings, args.letter_ids)
    _print(result.as_json() if args.json else stream_admin.format_replay(result), args.json)
    problem = result.problem()
    if problem:
        print(f"processor: {problem}", file=sys.stderr)
        return ExitCode.FAILED
    return ExitCode.OK


def cmd_dlq_purge(settings: Settings, args: argparse.Namespace) -> int:
    _check_selection(args, "purge")
    confirm = stream_admin.confirmer(args.yes, sys.stdin, sys.stderr)
    if args.all:
        result = stream_admin.purge_all(settings, confirm)
    else:
        result = stream_admin.purge(settings, args.letter_ids, confirm)
    _print(result.as_json() if args.json else stream_admin.format_purge(result), args.json)
    return ExitCode.OK


def _check_selection(args: argparse.Namespace, verb: str) -> None:
    if bool(args.letter_ids) == args.all:
        raise stream_admin.UsageError(f"dlq {verb}: give one or more letter IDs, or --all (not both)")


def _print(output: object, as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(output).decode())
    else:
        assert isinstance(output, list)
        print("\n".join(output))


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _entry_id(text: str) -> str:
    try:
        return stream_admin.check_entry_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1 expected, got {text!r}")
    return int(text)


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a whole number of at least 0 expected, got {text!r}")
    return int(text)


def _device_id(text: str) -> str:
    from common.geofence_admin import check_device_id

    try:
        return check_device_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
