"""The one line that names what a server refused us for good: the Postgres privilege a role
lacks, or the Redis command an ACL user may not run.

Shards, the maintenance process and the operator commands all end a refusal with exit 78;
this is where each finds the words, whatever wrapped the server's error on its way up.
"""

from __future__ import annotations

import psycopg

from common import privileges
from common.faults import acl_refusal, chain


def describe(exc: BaseException, *, redis_url: str, database_url: str | None) -> str | None:
    """The line for `exc` (or what caused it), None when it is neither kind of refusal.

    A permission denied by Postgres is looked up on a fresh connection to `database_url`
    (the URL the refused statement used), which names the table and the privilege.
    """
    denied = next((link for link in chain(exc) if isinstance(link, psycopg.errors.InsufficientPrivilege)), None)
    if denied is not None and database_url:
        explained = privileges.explain(database_url, denied)
        if explained:
            return explained
    return acl_refusal(exc, redis_url)
