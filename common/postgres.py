"""Options every Postgres connection of the Processor is opened with.

DATABASE_URL may lead through a transaction-pooling PgBouncer (SPEC §4), where each
transaction can run on another server connection. psycopg prepares a statement on the
server once it has run five times on a connection; through such a pooler (PgBouncer before
1.21, or without `max_prepared_statements`) the next transaction then asks a server
connection for a statement it never saw: `prepared statement "_pg3_0" does not exist`, which
made a shard panic. So no statement is ever prepared: Postgres plans each one anew, a
fraction of a millisecond per statement (OPERATIONS.md, "Postgres behind PgBouncer").
"""

from __future__ import annotations

from typing import Any

POOLER_SAFE: dict[str, Any] = {"prepare_threshold": None}
