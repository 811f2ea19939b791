"""What the runtime role may do in Postgres (SPEC §3), and the one line that names a privilege it lacks.

The migrations grant `processor_runtime` exactly `TABLES` (plus USAGE on the schema and
TEMPORARY on the database, for the writer's staging table); a test holds the two in step.
Shards and operator commands connect with DATABASE_URL as a login role in that role, so a
privilege an operator forgot to grant is named here rather than surfacing as a crash.
"""

from __future__ import annotations

import psycopg

from common.faults import one_line
from common.postgres import POOLER_SAFE, AnswerBounded

RUNTIME_ROLE = "processor_runtime"

# Table → the privileges the shards and operator commands use on it.
TABLES: dict[str, tuple[str, ...]] = {
    "positions": ("SELECT", "INSERT"),
    "last_position": ("SELECT", "INSERT", "UPDATE"),
    "timing_records": ("SELECT", "INSERT", "UPDATE", "DELETE"),  # a late fix replays visits
    "geofences": ("SELECT", "INSERT", "UPDATE"),  # `processor geofences import`
    "geofence_revision": ("SELECT", "UPDATE"),  # bumped by the geofences trigger, as the caller
    "geofence_versions": ("SELECT", "INSERT", "UPDATE"),  # kept by a geofences trigger; read by a late fix's replay
    "schema_migrations": ("SELECT",),  # `processor run` checks the schema is current
    "retention_floor": ("SELECT",),  # a late fix's replay stops where retention dropped history
}

# Every check in one query, so it costs one round trip at start-up.
_MISSING = """
SELECT p.privilege || ' on table ' || p.tbl
FROM unnest(%(tables)s::text[], %(privileges)s::text[]) AS p(tbl, privilege)
WHERE to_regclass(quote_ident(p.tbl)) IS NOT NULL
  AND NOT has_table_privilege(quote_ident(p.tbl), p.privilege)
UNION ALL
SELECT 'USAGE on schema ' || current_schema() WHERE NOT has_schema_privilege(current_schema(), 'USAGE')
UNION ALL
SELECT 'TEMPORARY on database ' || current_database()
WHERE NOT has_database_privilege(current_database(), 'TEMPORARY')
"""


def missing(conn: psycopg.Connection) -> list[str]:
    """The privileges the connected role lacks, as "INSERT on table positions"; [] when it has them all."""
    pairs = [(table, privilege) for table, privileges in TABLES.items() for privilege in privileges]
    params = {"tables": [t for t, _ in pairs], "privileges": [p for _, p in pairs]}
    with conn.cursor() as cur:
        cur.execute(_MISSING, params)
        return [row[0] for row in cur.fetchall()]


def refusal(role: str, lacking: list[str]) -> str:
    """The one line an operator reads: which role lacks what, and the grant that fixes it."""
    return (
        f"Postgres role {role} lacks {', '.join(lacking)}; grant it the runtime role "
        f"(GRANT {RUNTIME_ROLE} TO {role}) after the migrations have run as the schema's owner"
    )


def explain(url: str, error: BaseException, timeout_s: int = 5) -> str | None:
    """Name the missing privilege behind `error` (a permission denied), looked up on a fresh connection.

    None when the check itself cannot run; the caller then says what the server said.
    """
    try:
        with AnswerBounded.connect(url, autocommit=True, connect_timeout=timeout_s, **POOLER_SAFE) as conn:
            role = conn.info.user
            lacking = missing(conn)
    except psycopg.Error:
        return None
    if not lacking:
        return f"Postgres role {role} was refused: {one_line(error)}"
    return refusal(role, lacking)
