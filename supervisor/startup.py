"""The supervisor's start-up steps in Postgres, before it forks a shard: schema, privileges, days ahead."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from common.config import Settings
from supervisor.migrations import SCHEMA_WAIT_S, check_runtime_role, ensure_schema, migration_names
from supervisor.partitions import maintain

log = logging.getLogger("processor.supervisor")


def prepare_database(settings: Settings, until_reachable: Callable[..., Any], between: Callable[[], None]) -> None:
    """Bring the schema up to date (or see that its owner has), check DATABASE_URL's privileges,
    and create the days ahead the shards may write to.

    `until_reachable(what, operation, *args)` runs each step through an outage (or halts);
    `between` is called between retries of the schema's wait. The days ahead come before the
    shards: after MAX_FUTURE_S was raised, their first fixes would otherwise find no partition
    until the maintenance process's first pass, which also does the rest (gaps, retention).
    """
    migration_url = settings.migration_database_url
    applied = until_reachable("Postgres at MIGRATION_DATABASE_URL", ensure_schema, migration_url, None, SCHEMA_WAIT_S, between)
    if applied:
        log.info("schema up to date", extra={"applied": migration_names(applied)})
    until_reachable("Postgres at DATABASE_URL", check_runtime_role, settings.database_url)
    until_reachable(
        "Postgres at MIGRATION_DATABASE_URL",
        functools.partial(maintain, ahead_only=True),
        migration_url,
        settings.positions_retention_days,
        settings.max_future_s,
    )
