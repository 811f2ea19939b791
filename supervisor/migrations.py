"""The migration runner: plain SQL files applied in order under a Postgres advisory lock.

A file is applied in one transaction together with its `schema_migrations` row, unless its
first line is `-- processor: no-transaction`. Such a file is split into steps at lines
`-- processor: step`, and each step is sent on its own, outside any transaction block: a
step of one statement runs alone (so it may be one that cannot run in a transaction, such as
CALL of a procedure that commits, or CREATE INDEX CONCURRENTLY); a step of several statements
runs as one transaction. The ledger row is written after the last step. A no-transaction file
is for work that must not hold its locks for the whole migration (converting a large table
while writers keep writing). Its rule: **every step is idempotent**, so that a migration
interrupted midway (a crash, a lost connection, a failed step) is simply run again from its
first step at the next start. A file in a transaction, or a step, that fails because it
could not get a lock within the session's (or its own) `lock_timeout` (SQLSTATE 55P03) is
retried, after a pause, up to STEP_LOCK_ATTEMPTS times: it asks for a lock briefly, sparing
the writers queued behind it a long wait, and simply tries again.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg

from common.backoff import Backoff
from common import privileges
from common.errors import ConfigError, MigrationError
from common.faults import one_line
from common.keys import MIGRATION_LOCK_KEY
from common.postgres import POOLER_SAFE, AnswerBounded
from common.versions import check_postgres

log = logging.getLogger("processor.migrations")

LOCK_WAIT_S = 120.0  # for the migration lock
# Short: every writer that asks for the table after the migration waits behind its request (a
# shard's batch, for as long as this at most); the file is tried again, with backoff, instead.
MIGRATION_LOCK_TIMEOUT = "500ms"
LOCK_POLL_S = 0.2
SCHEMA_WAIT_S = 120.0  # how long a role that may not migrate waits for the owner to do it
SCHEMA_POLL_S = 1.0
CONNECT_TIMEOUT_S = 10
NO_TRANSACTION = "-- processor: no-transaction"
STEP = "-- processor: step"
STEP_LOCK_ATTEMPTS = 60  # a file or step refused its lock this often in a row fails the migration
_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def in_transaction(self) -> bool:
        """False when the file's first line asks for steps outside a transaction."""
        return self.sql.split("\n", 1)[0].strip() != NO_TRANSACTION

    @property
    def steps(self) -> list[str]:
        """The parts of a no-transaction file between `-- processor: step` lines (empty ones dropped)."""
        parts, current = [], []
        for line in self.sql.splitlines():
            if line.strip() == STEP:
                parts.append("\n".join(current))
                current = []
            else:
                current.append(line)
        parts.append("\n".join(current))
        return [part for part in parts if _has_sql(part)]


def _has_sql(text: str) -> bool:
    """Whether a step holds more than blank lines and `--` comments."""
    return any(line.strip() and not line.strip().startswith("--") for line in text.splitlines())


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """The migration files in version order; a misnamed or duplicate file is an error."""
    folder = directory or Path(str(resources.files("migrations")))
    found: dict[int, Migration] = {}
    for path in sorted(folder.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"migration file {path.name} is not named NNNN_name.sql")
        version = int(match["version"])
        if version in found:
            raise MigrationError(f"two migration files have version {version}")
        found[version] = Migration(version, match["name"], path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def apply_migrations(url: str, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply what is missing, each file in its own transaction; returns what was applied.

    Every instance may call this at once: the advisory lock lets one apply and the
    others find nothing left to do. Migrations must go over a direct connection, since
    a transaction-pooling PgBouncer does not keep a session lock. A role that may not
    change the schema gets a clear refusal (exit 78) when there is something to apply.
    """
    migrations = load_migrations() if migrations is None else migrations
    with _connect(url) as conn:
        check_postgres(conn)
        return _migrate(conn, migrations)


def _migrate(conn: psycopg.Connection, migrations: list[Migration], between=lambda: None) -> list[Migration]:  # type: ignore[no-untyped-def]
    """Under the advisory lock: apply what is missing (the ledger first, if there is none).

    `between` runs while the lock is waited for (the supervisor's signal check)."""
    _acquire_lock(conn, between)
    try:
        done = pending(conn, migrations)
        if done:
            _require_ddl(done, ddl_refusal(conn), unable_to_read=_blind_role(conn))
            if to_regclass(conn, "schema_migrations") is None:
                conn.execute(_CREATE_LEDGER)
            # A statement waiting for a table lock holds up every later request for that table
            # (the shards of instances still running), and signals while it waits: it gives up
            # after a while and is tried again (_apply_one). A file may set its own.
            conn.execute(f"SET lock_timeout = '{MIGRATION_LOCK_TIMEOUT}'")
        for migration in done:
            _apply_one(conn, migration, between)
        return done
    finally:
        _release_lock(conn)


def ensure_schema(
    url: str, migrations: list[Migration] | None = None, wait_s: float = SCHEMA_WAIT_S, between=lambda: None
) -> list[Migration]:
    """`processor run`'s migration step: migrate when this role may, else make sure someone has.

    A role without DDL rights (the runtime role) finds the schema current and goes on, or
    waits up to `wait_s`, announced, for another instance or `processor migrate` to bring it
    up to date; `between` runs between looks (the supervisor's signal check).
    """
    migrations = load_migrations() if migrations is None else migrations
    with _connect(url) as conn:
        check_postgres(conn)
        why = ddl_refusal(conn)
        if why is None:
            return _migrate(conn, migrations, between)
        behind = pending(conn, migrations)
        if not behind:
            log.info("schema is current; this role does not change it, so it does not migrate", extra={"role": conn.info.user})
            return []
        log.warning(
            "schema is behind and this role may not change it: waiting for its owner to migrate it",
            extra={"role": conn.info.user, "pending": migration_names(behind), "wait_s": wait_s, "why": why,
                   "ledger_readable": _blind_role(conn) is None},
        )
        deadline = time.monotonic() + wait_s
        while behind and time.monotonic() < deadline:
            between()
            time.sleep(SCHEMA_POLL_S)
            behind = pending(conn, migrations)
        if behind:
            _require_ddl(behind, why, f" and nobody migrated it within {wait_s:.0f}s", unable_to_read=_blind_role(conn))
        log.info("schema brought up to date by its owner", extra={"role": conn.info.user})
        return []


def pending(conn: psycopg.Connection, migrations: list[Migration]) -> list[Migration]:
    """The migrations not applied yet (a changed checksum of an applied one is an error); reads only."""
    ledger = conn.execute(
        "SELECT CASE WHEN to_regclass('schema_migrations') IS NULL THEN false"
        " ELSE has_table_privilege('schema_migrations', 'SELECT') END"
    ).fetchone()[0]
    if not ledger:
        return list(migrations)  # not made yet, or not granted to this role yet (0004 grants it): `_blind_role`
    applied = {row[0]: row[1:] for row in conn.execute("SELECT version, name, checksum FROM schema_migrations")}
    _check_applied(migrations, applied)
    return [m for m in migrations if m.version not in applied]


def to_regclass(conn: psycopg.Connection, name: str) -> object:
    return conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()[0]


_DDL_RIGHTS = """
SELECT current_user, current_schema(), has_schema_privilege(current_schema(), 'CREATE'),
       (SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = to_regclass('schema_migrations')),
       coalesce((SELECT pg_has_role(relowner, 'USAGE') FROM pg_class WHERE oid = to_regclass('schema_migrations')), true)
"""


def ddl_refusal(conn: psycopg.Connection) -> str | None:
    """Why the connected role may not migrate this schema (None when it may): the privilege it lacks."""
    role, schema, may_create, owner, owns = conn.execute(_DDL_RIGHTS).fetchone()
    if not may_create:
        return f"role {role} lacks CREATE on schema {schema}"
    if not owns:
        return f"role {role} is not the owner of the schema's tables ({owner})"
    return None


def _blind_role(conn: psycopg.Connection) -> str | None:
    """The connected role when schema_migrations exists but it may not read it (whether the schema
    is behind is then unknown: what `pending` says is a guess); else None."""
    blind = conn.execute(
        "SELECT to_regclass('schema_migrations') IS NOT NULL AND NOT has_table_privilege('schema_migrations', 'SELECT')"
    ).fetchone()[0]
    return conn.info.user if blind else None


def _require_ddl(behind: list[Migration], why: str | None, after: str = "", *, unable_to_read: str | None = None) -> None:
    """A schema `behind` and a role that may not change it (`why`, from ddl_refusal): exit 78.

    A role `unable_to_read` the ledger cannot tell whether it is behind: its missing grant is the news."""
    if why is not None and unable_to_read is not None:
        raise MigrationError(
            f"role {unable_to_read} may not read schema_migrations, so whether the schema is current is unknown{after}, "
            f"and {why}; grant it the runtime role (GRANT {privileges.RUNTIME_ROLE} TO {unable_to_read}), or migrate "
            "with MIGRATION_DATABASE_URL of the schema's owner"
        )
    if why is not None:
        raise MigrationError(
            f"the schema is {len(behind)} migration(s) behind ({', '.join(migration_names(behind))}){after}, and {why}; "
            "run `processor migrate` with MIGRATION_DATABASE_URL of the schema's owner"
        )


def migration_names(migrations: list[Migration]) -> list[str]:
    """How logs and errors name migrations: `0004_runtime_role`."""
    return [f"{m.version:04d}_{m.name}" for m in migrations]


def check_runtime_role(url: str) -> None:
    """DATABASE_URL's role must hold every privilege the shards use: name what it lacks (exit 78)."""
    with AnswerBounded.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, **POOLER_SAFE) as conn:
        check_postgres(conn)
        lacking = privileges.missing(conn)
        if lacking:
            raise ConfigError(privileges.refusal(conn.info.user, lacking))


def _connect(url: str) -> psycopg.Connection:
    conn = psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, **POOLER_SAFE)
    conn.add_notice_handler(_log_notice)
    return conn


def _log_notice(diag: psycopg.errors.Diagnostic) -> None:
    """What a migration says with RAISE WARNING goes to the log (notices only at DEBUG)."""
    level = logging.WARNING if diag.severity_nonlocalized == "WARNING" else logging.DEBUG
    log.log(level, "migration notice", extra={"notice": diag.message_primary, "detail": diag.message_detail})


def _acquire_lock(conn: psycopg.Connection, between=lambda: None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + LOCK_WAIT_S
    announced = False
    while not conn.execute("SELECT pg_try_advisory_lock(%s)", (MIGRATION_LOCK_KEY,)).fetchone()[0]:
        between()  # a stop signal ends the wait, before anything is applied
        if time.monotonic() >= deadline:
            raise MigrationError(
                f"migration lock {MIGRATION_LOCK_KEY} still held by {_lock_holder(conn)} after {LOCK_WAIT_S:.0f}s; "
                "see OPERATIONS.md, 'A migration lock that seems stuck'"
            )
        if not announced:
            log.info("waiting for the migration lock", extra={"holder": _lock_holder(conn)})
            announced = True
        time.sleep(LOCK_POLL_S)


def _release_lock(conn: psycopg.Connection) -> None:
    if conn.closed or conn.broken:
        return  # the session ended, and with it the lock
    released = conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,)).fetchone()[0]
    if not released:
        log.error("migration lock was not held at release", extra={"lock_key": MIGRATION_LOCK_KEY})


def _lock_holder(conn: psycopg.Connection) -> str:
    row = conn.execute(
        "SELECT l.pid, a.application_name, a.client_addr FROM pg_locks l "
        "LEFT JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objid = %s",
        (MIGRATION_LOCK_KEY & 0xFFFFFFFF,),
    ).fetchone()
    return f"backend pid {row[0]} ({row[1] or 'no name'}, {row[2] or 'local'})" if row else "a session that ended"


def _check_applied(migrations: list[Migration], applied: dict[int, tuple[str, str]]) -> None:
    known = {m.version: m for m in migrations}
    for version, (name, checksum) in sorted(applied.items()):
        migration = known.get(version)
        if migration is None:
            # A newer release migrated this database; old code keeps running during a rolling deploy.
            log.warning("database has a migration this release does not know", extra={"version": version, "migration": name})
        elif migration.checksum != checksum:
            raise MigrationError(
                f"migration {version:04d}_{migration.name}.sql was changed after it was applied "
                f"(checksum {checksum[:12]} in the database, {migration.checksum[:12]} on disk); "
                "restore the file and add a new migration instead"
            )


_RECORD = "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)"


def _apply_one(conn: psycopg.Connection, migration: Migration, between=lambda: None) -> None:  # type: ignore[no-untyped-def]
    """Apply one file; a lock not granted within the lock_timeout is asked for again (`_asking`).
    The session lost (the server restarted, the connection broke) is raised as it is: an
    outage, after which the caller starts over."""
    started = time.monotonic()
    record = (migration.version, migration.name, migration.checksum)
    where = {"version": migration.version, "migration": migration.name}

    def whole_file() -> None:
        with conn.transaction():
            conn.execute(migration.sql.encode())
            conn.execute(_RECORD, record)

    try:
        if migration.in_transaction:
            _asking(whole_file, "migration waiting for a lock another session holds; trying again", where, between)
        else:
            steps = migration.steps
            for number, step in enumerate(steps, 1):
                _run_step(conn, step, {**where, "step": number, "steps": len(steps)}, between)
            conn.execute(_RECORD, record)
    except psycopg.errors.Error as exc:
        if _session_lost(conn, exc):
            raise
        raise _failed(migration, exc) from exc
    log.info("migration applied", extra={**where, "seconds": round(time.monotonic() - started, 3)})


def _session_lost(conn: psycopg.Connection, exc: psycopg.Error) -> bool:
    """Whether the migration failed because its session ended (the server restarted or shut it
    down, the connection broke), not because of the file: a timeout, a deadlock or a
    serialization failure of the file's own statements is still the file's failure."""
    sqlstate = exc.sqlstate or ""
    return conn.broken or sqlstate.startswith("08") or sqlstate in _SESSION_ENDED or (
        not sqlstate and isinstance(exc, psycopg.OperationalError)
    )


_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03"})  # admin shutdown, crash shutdown, cannot connect now


def _failed(migration: Migration, exc: psycopg.Error) -> MigrationError:
    hint = exc.diag.message_hint
    return MigrationError(
        f"migration {migration.version:04d}_{migration.name}.sql failed: {one_line(exc)}" + (f" ({hint})" if hint else "")
    )


def _run_step(conn: psycopg.Connection, sql: str, where: dict[str, object], between=lambda: None) -> None:  # type: ignore[no-untyped-def]
    """One step of a no-transaction file, sent as it is; a lock it could not get is asked for again."""
    started = time.monotonic()
    _asking(lambda: conn.execute(sql.encode()), "migration step could not get its lock in time; trying again", where, between)
    log.info("migration step done", extra={**where, "seconds": round(time.monotonic() - started, 3)})


def _asking(attempt: Callable[[], object], message: str, where: dict[str, object], between: Callable[[], None]) -> None:
    """Run `attempt` (a whole file in a transaction, or one step) until it is not refused a lock
    within the session's lock_timeout, STEP_LOCK_ATTEMPTS tries at most; before each new try,
    `between` (the supervisor's signal check) and a pause."""
    backoff = Backoff(base_s=0.2, cap_s=5.0)
    while True:
        try:
            attempt()
            return
        except psycopg.errors.LockNotAvailable as exc:
            if backoff.failures + 1 >= STEP_LOCK_ATTEMPTS:
                raise
            between()
            delay = backoff.next_delay()
            log.warning(message, extra={**where, "error": one_line(exc), "retry_in_s": round(delay, 2)})
            time.sleep(delay)
