"""`processor rehydrate DEVICE_ID`: every shard of every instance drops its cached state of a device."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import NoReturn

import orjson

from common.config import Settings
from common.contract import device_id_problem
from common.errors import ExitCode
from common.keys import rehydrate_channel
from ops.arguments import text
from ops.errors import postgres, redis_client
from shard.devices import bump_state_version


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


def rehydrate(settings: Settings, device_id: str) -> RehydrateResult:
    """Make every shard reload the device from Postgres.

    First the row version is bumped, so any cached copy is stale even in a shard that
    misses the message; then the id is published for running shards to drop it now.
    """
    with postgres(settings.database_url) as conn, conn.transaction():
        state_version = bump_state_version(conn, device_id)  # under the device's lock, as shards write
    known = state_version is not None
    bumped = f"; its state_version is bumped to {state_version}, so shards reload it at its next fix" if known else ""
    unreachable = f"cannot notify the shards about device {device_id!r} through"
    with redis_client(settings.redis_url, unreachable=unreachable, note=bumped) as client:
        receivers = int(client.publish(rehydrate_channel(settings.stream_key), device_id))
    return RehydrateResult(device_id, known, state_version, receivers)


# --- the command ----------------------------------------------------------------------


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "rehydrate",
        help="make every running shard reload a device's state from Postgres",
        description="Bump the device's state_version in Postgres (so every cached copy is stale, even in a "
        "shard that misses the message), then publish the id so that running shards of every instance "
        "drop it now. The next fix of the device reloads its state. Exits 0 also for an unknown device.",
    )
    parser.add_argument("device_id", metavar="DEVICE_ID", type=_device_id,
                        help="the device_id, as in the stream (one that starts with '-' goes after '--')")
    parser.add_argument("--json", action="store_true", help="print the outcome as a JSON object")
    parser.set_defaults(func=cmd_rehydrate)
    usage_error = parser.error

    def error(message: str) -> NoReturn:
        # argparse takes `-abc` for an option: the device id then looks missing (or unrecognised).
        if "DEVICE_ID" in message or "unrecognized arguments: -" in message:
            message += "; a DEVICE_ID that starts with '-' goes after '--': processor rehydrate -- -abc"
        usage_error(message)

    parser.error = error  # type: ignore[method-assign]


def cmd_rehydrate(settings: Settings, args: argparse.Namespace) -> int:
    result = rehydrate(settings, args.device_id)
    if args.json:
        print(orjson.dumps(result.as_json()).decode())
    elif result.known:
        print(f"device {result.device_id!r}: state_version bumped to {result.state_version}; "
              f"{result.receivers} shard(s) received the request to drop it")
    else:
        print(f"device {result.device_id!r} is not known (no last_position row); "
              f"{result.receivers} shard(s) received the request to drop it")
    return ExitCode.OK


def _device_id(value: str) -> str:
    """SPEC §2's rule for device ids, as the shards' decoder applies it (a bad one: exit 2)."""
    problem = device_id_problem(text(value))
    if problem:
        raise argparse.ArgumentTypeError(f"a device id {problem}")
    return value
