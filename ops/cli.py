"""The `processor` command line (SPEC §7): the entry point, the parser, and the service commands.

Each family of operator commands registers its own subcommands: ops.geofences,
ops.rehydrate, ops.lag, ops.claim_command, ops.dlq and ops.retention.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import select
import signal
import sys

from common import early_signals, logs
from common.config import Settings
from common.errors import ExitCode, ProcessorError
from common.faults import Outcome, classify, one_line
from ops import claim_command, dlq, geofences, lag, rehydrate, retention
from ops.errors import POSTGRES, translated

log = logging.getLogger("processor.cli")

SERVICE_COMMANDS = ("run", "migrate")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on a usage error
    try:
        # What argparse cannot check alone (a command's `check`): a usage error is 2 even with a bad environment.
        getattr(args, "check", lambda _args: None)(args)
    except ProcessorError as exc:
        print(f"processor: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.command != "run":
        early_signals.release()  # only the supervisor takes over the stop signals held at launch
        if sys.stdout is None:  # started with it closed (`>&-`): what a command did could not be told
            print("processor: standard output is closed; nothing done", file=sys.stderr)
            return ExitCode.FAILED
    try:
        settings = Settings.from_env()
    except ProcessorError as exc:
        print(f"processor: configuration error: {exc}", file=sys.stderr)
        return exc.exit_code
    service = args.command in SERVICE_COMMANDS
    # Operator commands keep stdout for their output (and --json); their logs go to stderr.
    logs.configure(settings.log_level, args.command, sys.stdout if service else sys.stderr)
    try:
        code = int(args.func(settings, args))
        if service and _output_closed():
            logs.drop_stream(sys.stdout)  # only logs were lost: the service's own outcome stands
        sys.stdout.flush()  # here rather than at exit, where a reader gone away could not be told apart
        return code
    except ProcessorError as exc:
        if service:
            log.error(str(exc))
        print(f"processor: {exc}", file=sys.stderr)
        return exc.exit_code
    except (KeyboardInterrupt, asyncio.CancelledError):
        if args.command == "run":
            raise
        # Ctrl-C (asyncio's runner turns it into a cancellation of an async command): every
        # command leaves whole steps behind it (a claimed entry not yet stored stays pending).
        # The operation failed (1): the SPEC's exit codes have none for an interruption.
        print("processor: interrupted; what was not done is left as it was", file=sys.stderr)
        return ExitCode.FAILED
    except Exception as exc:
        if args.command == "run":
            raise  # the supervisor's panic handler dumps its state and exits 70
        if isinstance(exc, BrokenPipeError) and _output_closed():
            # Whoever read the output stopped early (`processor dlq list | head`): no server is
            # to blame, and a shell pipeline expects silence. Exit 1: not all was written.
            logs.drop_stream(sys.stdout)  # the flush at exit must not fail again (exit 120)
            return ExitCode.FAILED
        # What no command's own boundary translated: an outage or refusal is still one line;
        # anything else is a bug (exit 70), logged with its traceback, passwords masked.
        outcome = classify(exc)
        if outcome is Outcome.OUTAGE:
            print(f"processor: a server is unreachable: {one_line(exc)}", file=sys.stderr)
            return ExitCode.FAILED
        if outcome is Outcome.REFUSED:
            print(f"processor: refused: {one_line(exc)}", file=sys.stderr)
            return ExitCode.CONFIG
        if isinstance(exc, OSError):  # the machine's, not a bug: output to a full disk (`> /dev/full`), say
            print(f"processor: failed: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
            logs.drop_stream(sys.stdout)  # the flush at exit must not fail again (exit 120)
            return ExitCode.FAILED
        log.critical("internal error", extra={"error": f"{type(exc).__name__}: {one_line(exc)}"}, exc_info=True)
        print(f"processor: internal error: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
        return ExitCode.SOFTWARE


def _output_closed() -> bool:
    """Whether stdout is a pipe whose reader has closed it (the pipe then polls as an error)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


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
    geofences.add_commands(commands)
    rehydrate.add_command(commands)
    lag.add_command(commands)
    claim_command.add_command(commands)
    dlq.add_commands(commands)
    retention.add_command(commands)
    return parser


def cmd_run(settings: Settings, _args: argparse.Namespace) -> int:
    from supervisor.arbiter import Halt, Supervisor

    try:
        return Supervisor(settings).run()
    except Halt as halt:
        return halt.exit_status
    finally:
        # The stop is over. While the interpreter shuts down it hands our handlers back to the
        # default, death by the signal: a second SIGTERM sent a little late would turn the exit
        # 0 a stop owes into -15. An ignored signal stays ignored through that.
        for signum in early_signals.STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    from supervisor.migrations import apply_migrations, migration_names

    with translated(POSTGRES, settings.migration_database_url, unreachable="cannot connect to"):
        applied = apply_migrations(settings.migration_database_url)
    names = migration_names(applied)
    log.info("migrations applied" if names else "schema already up to date", extra={"applied": names})
    return ExitCode.OK
