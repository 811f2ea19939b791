"""Helpers of the dead-letter and command-line tests: the command line in a child process and
its one-line error, fixes, and letters written straight into the DLQ in either format."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

import orjson
import redis

from common.letters import letter_fields
from scripts.toolkit.processes import ROOT

FAILED_AT = "2026-03-01T10:00:00.000Z"
GROUP = "processor"


def run_cli(
    env: dict[str, str], *args: str, stdin: int | None = subprocess.DEVNULL, stdout: int = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    """The real `processor` command line in a child process."""
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", "ops", *args],
        env=full_env, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """A command's stderr, which must be exactly one line."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def fix(device_id: str, **more: object) -> bytes:
    return orjson.dumps({"device_id": device_id, "ts": 1_718_000_000_000, "lat": 50.0, "lon": 10.0, **more})


def flat(original: Mapping[bytes, bytes] | Sequence[bytes]) -> list[bytes]:
    """An entry's fields as a flat [name, value, …] list."""
    if isinstance(original, Mapping):
        return [item for pair in original.items() for item in pair]
    return list(original)


def add_letter(client: redis.Redis, stream_key: str, original: Mapping[bytes, bytes] | Sequence[bytes], *,
               source_id: str = "1-1", source_stream: str | None = None, error: str = "lat out of range",
               kind: str = "validate", letter_id: str = "*") -> str:
    """A dead letter as SPEC §5 and common/letters.py describe it: the added fields, then the
    original entry verbatim (a flat list may repeat names and use the added fields' names)."""
    added = (error, kind, source_id, source_stream or stream_key, "5", "host-0", FAILED_AT)
    reply = client.execute_command("XADD", f"{stream_key}:dlq", letter_id, *letter_fields(added, flat(original)))
    return reply.decode()  # type: ignore[no-any-return]


def add_earlier_letter(client: redis.Redis, stream_key: str, original: Mapping[bytes, bytes], *,
                       source_stream: str | None = None, error: str = "lat out of range") -> str:
    """A letter of the earlier format: the original fields, with the added fields written over
    those of the same name (a dict, so each name once)."""
    fields: dict[bytes, bytes | str] = dict(original)
    fields.update({
        b"error": error, b"error_kind": "validate", b"source_id": "1-1", b"source_stream": source_stream or stream_key,
        b"failures": "5", b"consumer": "host-0", b"failed_at": FAILED_AT,
    })
    return client.xadd(f"{stream_key}:dlq", fields).decode()  # type: ignore[arg-type]
