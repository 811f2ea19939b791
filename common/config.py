"""Settings from the environment (SPEC §4), validated before anything is touched."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

import psycopg
import redis
import redis.asyncio
from psycopg.conninfo import conninfo_to_dict

from common.errors import ConfigError
from common.keys import liveness_prefix, reserved_keys
from common.logs import add_secret

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
REDIS_SCHEMES = ("redis", "rediss", "unix")
POSTGRES_SCHEMES = ("postgresql", "postgres")
MAX_SHARDS = 256
MAX_STREAM_RETENTION_MS = 30 * 86_400_000  # 30 days
MAX_POSITIONS_RETENTION_DAYS = 36_500  # a hundred years
MAX_SECRET_FILE_BYTES = 65_536  # a URL; more is the wrong file (or /dev/zero)
# What libpq accepts for its parameters with a fixed set of values. libpq checks them only
# when it connects, and says so as an outage would; checked here, a typo is exit 78 at once.
LIBPQ_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby", "prefer-standby"),
    "load_balance_hosts": ("disable", "random"),
    "sslcertmode": ("disable", "allow", "require"),
    "sslnegotiation": ("postgres", "direct"),
}
# int() would also take 1_000 and non-ASCII digits, and refuse over 4,300 digits with its own error.
_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]{1,30}")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class Settings:
    redis_url: str
    database_url: str
    migration_database_url: str
    stream_key: str
    consumer_group: str
    dlq_key: str
    instance_id: str
    shards: int
    batch_size: int
    claim_threshold_ms: int
    claim_interval_ms: int
    max_failures: int
    drain_timeout_s: float
    device_cache_size: int
    panic_dir: Path
    log_level: str
    http_port: int
    heartbeat_timeout_s: float = 15.0
    max_future_s: float = 300.0
    stream_retention_ms: int | None = 3_600_000  # None: `off`, the Processor never trims STREAM_KEY
    positions_retention_days: int = 0  # 0: positions are kept for ever

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every setting; the first bad one raises ConfigError."""
        env = os.environ if env is None else env
        reader = _Reader(env)
        database_url = reader.url("DATABASE_URL", "postgresql://localhost/processor", POSTGRES_SCHEMES)
        stream_key = reader.name("STREAM_KEY", "telemetry:t")
        dlq_key = reader.name("DLQ_KEY", f"{stream_key}:dlq")
        consumer_group = reader.name("CONSUMER_GROUP", "processor")
        if dlq_key in reserved_keys(stream_key, consumer_group) or dlq_key.startswith(liveness_prefix(stream_key)):
            # Dead letters written into the input would be read, and dead-lettered, for ever.
            raise ConfigError(f"DLQ_KEY must not be STREAM_KEY or a key the Processor keeps for it, got {dlq_key!r}")
        return cls(
            redis_url=reader.url("REDIS_URL", "redis://localhost:6379/0", REDIS_SCHEMES),
            database_url=database_url,
            migration_database_url=reader.url("MIGRATION_DATABASE_URL", database_url, POSTGRES_SCHEMES),
            stream_key=stream_key,
            consumer_group=consumer_group,
            dlq_key=dlq_key,
            instance_id=reader.name("INSTANCE_ID", socket.gethostname() or "processor"),
            shards=reader.integer("SHARDS", os.cpu_count() or 1, 1, MAX_SHARDS),
            batch_size=reader.integer("BATCH_SIZE", 500, 1, 100_000),
            claim_threshold_ms=reader.integer("CLAIM_THRESHOLD_MS", 60_000, 1, 86_400_000),
            claim_interval_ms=reader.integer("CLAIM_INTERVAL_MS", 15_000, 100, 86_400_000),
            max_failures=reader.integer("MAX_FAILURES", 5, 1, 1_000),
            drain_timeout_s=reader.number("DRAIN_TIMEOUT_S", 20.0, 0.0, 3_600.0),
            device_cache_size=reader.integer("DEVICE_CACHE_SIZE", 100_000, 1, 100_000_000),
            panic_dir=reader.directory("PANIC_DIR", "./panic"),
            log_level=reader.choice("LOG_LEVEL", "INFO", LOG_LEVELS),
            http_port=reader.integer("HTTP_PORT", 8080, 0, 65_535),
            heartbeat_timeout_s=reader.number("HEARTBEAT_TIMEOUT_S", 15.0, 1.0, 3_600.0),
            max_future_s=reader.number("MAX_FUTURE_S", 300.0, 0.0, 10 * 365 * 86_400.0),
            stream_retention_ms=reader.integer_or_off("STREAM_RETENTION_MS", 3_600_000, 0, MAX_STREAM_RETENTION_MS),
            positions_retention_days=reader.integer("POSITIONS_RETENTION_DAYS", 0, 0, MAX_POSITIONS_RETENTION_DAYS),
        )

    def redacted(self) -> dict[str, object]:
        """The settings with every password masked, for logs and panic dumps."""
        values = dataclasses.asdict(self)
        for name in ("redis_url", "database_url", "migration_database_url"):
            values[name] = redact_url(values[name])
        values["panic_dir"] = str(self.panic_dir)
        return values


def _read_regular_file(path: str, limit: int) -> bytes | None:
    """Up to `limit` bytes of the file at `path`; None when it is not a regular file.

    Opened without blocking and checked before reading: opening a FIFO for reading waits
    for a writer, and a start-up stuck there would never reach the signal handlers.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read(limit)
    finally:
        os.close(fd)


def redact_url(url: str) -> str:
    """Replace every secret of a URL with `***`: the userinfo password, and the value of each
    SECRET_PARAMETERS query parameter or libpq `key=value` pair (a conninfo string is not
    accepted, but the error that says so must not show its password either).

    Works on the raw text, so a password with an unencoded `/`, `#` or `?` is masked too.
    """
    url = _mask_userinfo_password(url)
    url = _QUERY_PARAMETER.sub(_mask_secret_parameter, url)
    return _CONNINFO_SECRET.sub(r"\g<head>***", url)


def _shown_url(value: str, quoted: bool = False) -> str:
    """A refused URL as every error about it shows it: masked, and not at all without `://`
    (it may be a password pasted alone, a secret file's content, or `redis:user:secret`, whose
    userinfo no mask could tell apart)."""
    if "://" not in value:
        return f"{len(value)} characters without '://' (not shown)"
    return repr(redact_url(value)) if quoted else redact_url(value)


def _mask_userinfo_password(url: str) -> str:
    """Mask what lies between the userinfo's colon and the last `@`, in a URL or in text that
    only resembles one: quoted, prefixed (`DATABASE_URL=…`, a BOM), or with a mangled scheme
    (`postgresql:/…`). Refused values are echoed in errors, so the mask may not depend on them
    being well formed; where the userinfo cannot be told apart, more is masked, never less."""
    at = url.rfind("@")
    if at < 0:
        return _AUTHORITY_PASSWORD.sub(r"\g<head>***", url)
    slashes = url.find("//", 0, at)
    if slashes < 0:
        colon = url.find(":", 0, at)
    else:
        colon = url.find(":", slashes + 2, at)
        if colon < 0:  # `u@h` has no password, unless a colon before the `//` (not the scheme's) began one
            colon = url.find(":", 0, slashes - 1)
    return url if colon < 0 else f"{url[: colon + 1]}***{url[at:]}"


# Without an `@`, `scheme://user:secret` (a paste cut short) reads as a host and a port: unless
# a port number follows a host's colon, all that follows is masked (the secret may hold a `/`).
_AUTHORITY_PASSWORD = re.compile(r"(?P<head>(?://|,)[^/?#,:@\[\]]*:)(?![0-9]*(?:[/?#,]|$)).+")

# libpq's secrets (`password`, `sslpassword`: the client key's passphrase) and redis-py's
# (`password`, `ssl_password`), compared percent-decoded and in any case: libpq decodes the
# names of URI parameters too.
SECRET_PARAMETERS = frozenset({"password", "sslpassword", "ssl_password"})
_QUERY_PARAMETER = re.compile(r"(?P<head>[?&](?P<name>[^=&#]*)=)[^&#]*")
_CONNINFO_SECRET = re.compile(
    r"(?P<head>(?:^|\s)(?:ssl_?)?password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|\S+)", re.IGNORECASE
)


def _mask_secret_parameter(match: re.Match[str]) -> str:
    if unquote(match.group("name")).lower() in SECRET_PARAMETERS:
        return match.group("head") + "***"
    return match.group(0)


def url_secrets(url: str) -> set[str]:
    """Every secret value in `url`, raw and decoded, to be masked wherever it turns up."""
    password = urlsplit(url).password or ""
    found = {password, unquote(password)}
    for match in _QUERY_PARAMETER.finditer(url):
        if unquote(match.group("name")).lower() in SECRET_PARAMETERS:
            raw = match.group(0)[len(match.group("head")):]
            found |= {raw, unquote(raw), unquote_plus(raw)}  # libpq decodes %XX only, redis-py `+` too
    found.discard("")
    return found


# What a REDIS_URL's query may set: the database, credentials and TLS. redis-py lets the URL
# override any option the Processor gives its clients (the RESP2 protocol every parser here
# expects, bytes replies, timeouts, pool size, client name): `decode_responses=True` made
# every entry look as if it had no `data` field, and dead-lettered valid fixes.
_REDIS_QUERY = ("db", "username", "password")
MAX_REDIS_DB = 2**31 - 1
_REDIS_QUERY_PREFIX = "ssl_"


def _check_redis_url(label: str, url: str, path: str, secrets: set[str]) -> None:
    """What redis-py makes of the URL, checked without connecting: it would take an unknown
    query parameter to its connection's constructor (a TypeError at the first command), and
    a database that is not a number for 0."""
    if path not in ("", "/") and not re.fullmatch(r"/[0-9]+", path):
        raise ConfigError(f"{label}: the database after the host must be a number, got {_shown_url(url)}")
    for key, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if key not in _REDIS_QUERY and not key.startswith(_REDIS_QUERY_PREFIX):
            raise ConfigError(
                f"{label}: query parameter {key!r} is not allowed: the Processor sets its Redis clients' options "
                f"itself (a URL may set {', '.join(_REDIS_QUERY)} and {_REDIS_QUERY_PREFIX}*): {_shown_url(url)}"
            )
    try:
        # Both clients: the shards' asyncio connection takes fewer parameters than the sync one.
        pool = redis.ConnectionPool.from_url(url)
        pool.make_connection()
        redis.asyncio.ConnectionPool.from_url(url).make_connection()
        db = int(pool.connection_kwargs.get("db") or 0)
    except Exception as exc:  # a third party's constructor: whatever it raises, the URL is the cause
        problem = " ".join(str(exc).split())
        for secret in secrets:
            problem = problem.replace(secret, "***")
        raise ConfigError(f"{label} is not a URL redis-py can use ({problem}): {_shown_url(url)}") from None
    # Redis reads SELECT's index as an int: beyond that it answers "not an integer", not "out of range".
    if not 0 <= db <= MAX_REDIS_DB:
        raise ConfigError(f"{label}: database {db} is out of range (0 to {MAX_REDIS_DB}, and below the server's "
                          f"`databases`): {_shown_url(url)}")


class _Reader:
    """Parses one variable at a time; each error names the variable, never its secret."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str, default: str) -> str:
        value = self.env.get(name)
        if value is None:
            return default
        value = value.strip()
        if not value:
            raise ConfigError(f"{name} is set but empty")
        return value

    def name(self, name: str, default: str) -> str:
        """A key or name of 1-200 printable characters; a default (DLQ_KEY's is derived from a
        valid STREAM_KEY, and may be a little longer) is taken as it is."""
        if name not in self.env:
            return default
        value = self.text(name, default)
        if len(value) > 200 or any(ch.isspace() or not ch.isprintable() for ch in value):
            raise ConfigError(f"{name} must be 1-200 printable characters without spaces, got {value!r}")
        return value

    def directory(self, name: str, default: str) -> Path:
        """A directory that exists, or could be made: nothing on the way to it is a file."""
        path = Path(self.text(name, default))
        for existing in (path, *path.absolute().parents):
            # os.path's checks say False where they may not look (a directory we cannot enter):
            # that is for the start-up warning to name, not a reason to refuse.
            if os.path.isdir(existing):
                break
            if os.path.exists(existing):
                raise ConfigError(f"{name} must name a directory, but {existing} is a file")
        return path

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.text(name, str(default))
        if not _WHOLE_NUMBER.fullmatch(raw):
            raise ConfigError(f"{name} must be a whole number, got {raw!r}")
        value = int(raw, 10)
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        return value

    def integer_or_off(self, name: str, default: int, low: int, high: int) -> int | None:
        """A whole number, or `off` (any case) for None."""
        raw = self.text(name, str(default))
        if raw.lower() == "off":
            return None
        if not _WHOLE_NUMBER.fullmatch(raw):  # signed as every whole number: `+1`, `-0`
            raise ConfigError(f"{name} must be a whole number of milliseconds or off, got {raw!r}")
        return self.integer(name, default, low, high)

    def number(self, name: str, default: float, low: float, high: float) -> float:
        raw = self.text(name, str(default))
        if not _NUMBER.fullmatch(raw):
            raise ConfigError(f"{name} must be a number, got {raw!r}")
        value = float(raw)
        if not low <= value <= high:  # also rejects nan
            raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {raw}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default).upper()
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def url(self, name: str, default: str, schemes: tuple[str, ...]) -> str:
        """A URL from `name`, or read from the file that `<name>_FILE` names (a Docker or
        Kubernetes secret); its secrets are registered for masking."""
        value, label = self.text_or_file(name, default)
        odd = next((i for i, ch in enumerate(value) if ch.isspace() or not ch.isprintable()), None)
        if odd is not None:
            # A URL carries these percent-encoded; raw, they are a paste gone wrong, or a file of
            # several settings (an .env file) whose other lines may be secrets: nothing is shown.
            raise ConfigError(
                f"{label} contains spaces or control characters (the first at character {odd + 1} "
                f"of {len(value)}); the value is not shown"
            )
        bad = ConfigError(f"{label} is not a valid URL (bad host or port): {_shown_url(value)}")
        try:
            parts = urlsplit(value)
            # a libpq URL may name several hosts: its ports are checked below. Port 0 is no port:
            # redis-py would quietly take the default, 6379, of some other server.
            if parts.scheme not in POSTGRES_SCHEMES and parts.port == 0:
                raise bad
        except ValueError:
            raise bad from None
        if parts.scheme not in schemes:
            raise ConfigError(f"{label} must start with {' or '.join(s + '://' for s in schemes)}, got {_shown_url(value)}")
        if parts.scheme != "unix" and not parts.netloc and not parts.query:
            raise ConfigError(f"{label} names no host: {_shown_url(value)}")
        secrets = url_secrets(value)
        if parts.scheme in POSTGRES_SCHEMES:
            try:
                conninfo = conninfo_to_dict(value)
            except psycopg.ProgrammingError:
                # libpq's own message may quote the password: say what is wrong without it.
                raise ConfigError(
                    f"{label} is not a valid libpq URL (check the percent-encoding of the password): "
                    f"{_shown_url(value)}"
                ) from None
            if parts.netloc.count("@") > 1 or "@" in parts.path:
                # A raw `@` in the user information: libpq ends it at the first `@` (or, past a
                # raw `/`, takes the rest for the database), urlsplit and so the log masking at the
                # last: the rest of the password would become the host, and show in every error.
                raise ConfigError(
                    f"{label}: a raw '@' in the user name, password or database name; percent-encode it as %40 "
                    f"(and a '/' in the password as %2F): {_shown_url(value)}"
                )
            # `host1:5432,host2:5433` (libpq tries them in turn): one port, or none, per host.
            ports = str(conninfo.get("port") or "").split(",")
            if not all(_WHOLE_NUMBER.fullmatch(port) and 0 < int(port) <= 65535 for port in ports if port):
                raise bad
            for key, choices in LIBPQ_CHOICES.items():
                if key in conninfo and conninfo[key] not in choices:
                    raise ConfigError(f"{label}: {key} must be one of {', '.join(choices)}: {_shown_url(value)}")
            secrets |= {str(conninfo.get(key) or "") for key in ("password", "sslpassword")}
        for secret in secrets:
            add_secret(secret)
        if parts.scheme in REDIS_SCHEMES:
            _check_redis_url(label, value, parts.path if parts.scheme != "unix" else "", secrets)
        return value

    def text_or_file(self, name: str, default: str) -> tuple[str, str]:
        """The value of `name` or the contents of the file `<name>_FILE` names (never both),
        and how to name it in an error."""
        file_variable = f"{name}_FILE"
        if file_variable not in self.env:
            return self.text(name, default), name
        if name in self.env:
            raise ConfigError(f"both {name} and {file_variable} are set: set only one of them")
        path = self.text(file_variable, "")
        label = f"{name} read from {path} ({file_variable})"
        try:
            data = _read_regular_file(path, MAX_SECRET_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"{file_variable}: cannot read {path}: {exc.strerror or type(exc).__name__}") from None
        if data is None:
            raise ConfigError(f"{file_variable}: {path} is not a regular file (a secret is mounted as one)")
        if len(data) > MAX_SECRET_FILE_BYTES:
            raise ConfigError(f"{file_variable}: {path} is larger than {MAX_SECRET_FILE_BYTES} bytes")
        try:
            value = data.decode("utf-8").strip()  # the trailing newline an editor or `echo` leaves
        except UnicodeDecodeError:
            raise ConfigError(f"{file_variable}: {path} is not UTF-8 text") from None
        if not value:
            raise ConfigError(f"{file_variable}: {path} is empty")
        return value, label
