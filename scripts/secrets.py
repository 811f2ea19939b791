"""Write the secrets of the Compose stack (docker-compose.yml) into a directory, one file each.

    python -m scripts.secrets [--dir secrets] [--stream-key telemetry:t] [--dlq-key KEY]

Passwords are random (`secrets.token_hex`, URL-safe); a password file that exists already
is kept, so running this again (say after changing STREAM_KEY) rewrites only the files
derived from the passwords: the URLs and the Redis ACL file. Delete a password file to
rotate that password (see OPERATIONS.md, "Secrets of the Compose stack").

The directory is made 0700 and its files 0644: Compose (outside Swarm) bind-mounts each
file into the containers as it is on the host, owner and mode included, and the containers
read them as their own users (postgres and redis uid 999, the processor uid 10001); the
directory's mode keeps every other user of the host out.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path

DEFAULT_DIR = Path("secrets")
PASSWORD_BYTES = 24  # 48 hex digits
DIR_MODE, FILE_MODE = 0o700, 0o644

# The stack's names (docker-compose.yml): Postgres' owner and database, the services' hosts.
POSTGRES_OWNER, POSTGRES_DB, POSTGRES_HOST = "processor", "processor", "postgres:5432"
RUNTIME_LOGIN = "processor_app"  # deploy/postgres-init/10-processor-roles.sh makes it
REDIS_HOST = "redis:6379"

PASSWORDS = (
    "postgres_owner_password",  # POSTGRES_PASSWORD_FILE: the schema's owner, the migrations
    "postgres_runtime_password",  # processor_app, IN ROLE processor_runtime: DATABASE_URL
    "redis_processor_password",  # the ACL user `processor`: REDIS_URL
    "redis_ingestion_password",  # the ACL user `ingestion`: give it to tcp-ingestion
    "redis_healthcheck_password",  # the ACL user `healthcheck`: PING only, for the health check
    "redis_admin_password",  # the ACL user `admin`: everything, for an operator's redis-cli
)

# The Processor's Redis permissions: OPERATIONS.md, "Redis ACL user" gives the same rule as
# ACL SETUSER (tests/test_compose_secrets.py holds the two in step). <STREAM_KEY> and
# <DLQ_KEY> are filled in.
PROCESSOR_PERMISSIONS = (
    "resetkeys ~<STREAM_KEY> ~<STREAM_KEY>:* ~<DLQ_KEY> resetchannels &<STREAM_KEY>:* -@all +ping "
    "+info +client|setname +eval +evalsha +script|load +script|exists +xgroup|create +xreadgroup "
    "+xack +xpending +xclaim +xinfo|consumers +xgroup|delconsumer +xinfo|groups "
    "+xinfo|stream +xadd +xrange +xrevrange +xlen +xtrim +xdel +exists +type +get +set +del "
    "+expire +incrby +hget +hset +hdel +hincrby +hgetall +zadd +zscore +zremrangebyscore +time +multi +exec +watch +unwatch "
    "+subscribe +publish"
)
# Redis 7.2 added CLIENT SETINFO, which redis-py sends at connect: refused, it is ignored
# but fills ACL LOG. The stack's Redis is 7.2 or newer, so its file allows it (OPERATIONS.md
# says so; Redis 7.0 would reject the subcommand's name).
REDIS_7_2_PERMISSIONS = "+client|setinfo"
# The producer may append fixes to the stream and do nothing else.
INGESTION_PERMISSIONS = "resetkeys ~<STREAM_KEY> resetchannels -@all +xadd"


# Redis reads a key or channel pattern as a glob: these stand for themselves only behind a `\`
# (OPERATIONS.md, "Redis ACL user"). The backslash goes first, or it would escape the escapes.
GLOB_SPECIAL = ("\\", "*", "?", "[")


def glob_literal(key: str) -> str:
    """`key` as a Redis ACL pattern that matches that key only. A key with whitespace is refused:
    it would split the ACL file's line (and ACL SETUSER's arguments) in two."""
    if any(c.isspace() for c in key):
        raise ValueError(f"a Redis key in the ACL rules cannot hold whitespace: {key!r}")
    for special in GLOB_SPECIAL:
        key = key.replace(special, "\\" + special)
    return key


def fill(permissions: str, stream_key: str, dlq_key: str) -> str:
    """`permissions` with <STREAM_KEY> and <DLQ_KEY> filled in as literal patterns."""
    return permissions.replace("<STREAM_KEY>", glob_literal(stream_key)).replace("<DLQ_KEY>", glob_literal(dlq_key))


def acl_user(name: str, password: str, permissions: str) -> str:
    """One line of a Redis ACL file: the user, on, the SHA-256 of its password, its permissions."""
    return f"user {name} on #{hashlib.sha256(password.encode()).hexdigest()} {permissions}"


def acl_file(passwords: Mapping[str, str], stream_key: str, dlq_key: str) -> str:
    """The Redis ACL file: no anonymous access (the default user off), one user per purpose."""
    return "\n".join([
        "user default off resetpass resetkeys resetchannels -@all",
        acl_user("processor", passwords["redis_processor_password"],
                 fill(f"{PROCESSOR_PERMISSIONS} {REDIS_7_2_PERMISSIONS}", stream_key, dlq_key)),
        acl_user("ingestion", passwords["redis_ingestion_password"], fill(INGESTION_PERMISSIONS, stream_key, dlq_key)),
        acl_user("healthcheck", passwords["redis_healthcheck_password"], "resetkeys resetchannels -@all +ping"),
        acl_user("admin", passwords["redis_admin_password"], "~* &* +@all"),
    ]) + "\n"


def derived(passwords: Mapping[str, str], stream_key: str, dlq_key: str) -> dict[str, str]:
    """The files made from the passwords: what the processor reads, and the ACL file Redis loads."""
    return {
        "migration_database_url": (
            f"postgresql://{POSTGRES_OWNER}:{passwords['postgres_owner_password']}@{POSTGRES_HOST}/{POSTGRES_DB}"
        ),
        "database_url": (
            f"postgresql://{RUNTIME_LOGIN}:{passwords['postgres_runtime_password']}@{POSTGRES_HOST}/{POSTGRES_DB}"
        ),
        "redis_url": f"redis://processor:{passwords['redis_processor_password']}@{REDIS_HOST}/0",
        "redis_acl": acl_file(passwords, stream_key, dlq_key),
    }


def write(path: Path, text: str) -> None:
    """Write `text` to `path` with FILE_MODE from the start (never briefly wider), replacing it whole."""
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text if text.endswith("\n") else text + "\n")
    os.chmod(partial, FILE_MODE)  # whatever the umask took away
    os.replace(partial, path)


def generate(directory: Path, stream_key: str, dlq_key: str) -> dict[str, str]:
    """Make or complete every secret file in `directory`; returns what each file says it is."""
    for key in (stream_key, dlq_key):
        glob_literal(key)  # a key the ACL file cannot hold is refused before anything is written
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(directory, DIR_MODE)
    passwords, report = {}, {}
    for name in PASSWORDS:
        path = directory / name
        existing = path.read_text(encoding="utf-8").strip() if path.exists() else ""
        passwords[name] = existing or secrets.token_hex(PASSWORD_BYTES)
        if not existing:
            write(path, passwords[name])
        report[name] = "kept" if existing else "new password"
    for name, text in derived(passwords, stream_key, dlq_key).items():
        write(directory / name, text)
        report[name] = "written"
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.secrets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where to write (default: ./secrets)")
    parser.add_argument("--stream-key", default="telemetry:t", help="the stack's STREAM_KEY (default telemetry:t)")
    parser.add_argument("--dlq-key", help="the stack's DLQ_KEY (default <STREAM_KEY>:dlq)")
    args = parser.parse_args(argv)
    try:
        report = generate(args.dir, args.stream_key, args.dlq_key or f"{args.stream_key}:dlq")
    except ValueError as exc:  # a key the ACL file cannot hold
        parser.error(str(exc))
    for name, what in report.items():
        print(f"{args.dir / name}: {what}")  # names only: a secret is never printed
    return 0


if __name__ == "__main__":
    sys.exit(main())
