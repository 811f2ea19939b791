"""Exit codes and the project's exception types."""

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit statuses (SPEC §7); the supervisor reads them from its shards."""

    OK = 0
    FAILED = 1
    USAGE = 2
    SOFTWARE = 70  # internal error or panic
    CONFIG = 78  # configuration or schema is wrong: restarting will not help


class ProcessorError(Exception):
    """Base class for errors that end in a clear one-line message."""

    exit_code: ExitCode = ExitCode.FAILED


class ConfigError(ProcessorError):
    """A setting is missing or malformed."""

    exit_code = ExitCode.CONFIG


class MigrationError(ProcessorError):
    """Migrations could not be applied; the schema is not what this code expects."""

    exit_code = ExitCode.CONFIG


class InvalidEntry(ValueError):
    """A stream entry violates the stream contract (SPEC §2): it is poison."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "decode" or "validate", as written to the DLQ


class RowRejected(ValueError):
    """One row could not be written for a reason of its own (e.g. it cannot be encoded for COPY):
    isolated from its batch like a row Postgres refuses."""


class ConnectionRefusedForGood(ProcessorError):
    """Redis or Postgres refused our credentials or database: a configuration error."""

    exit_code = ExitCode.CONFIG
