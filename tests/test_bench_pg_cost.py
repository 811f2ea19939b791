"""The Postgres cost benchmark stores what it measures, and charges statements within their batches."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from scripts.benchmark.pg_cost import WHOLE, fleet_fixes, peer_cost, prepare, processor_cost
from scripts.toolkit.services import with_database

pytestmark = pytest.mark.e2e


def _stored(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        positions = conn.execute("SELECT count(*) FROM positions").fetchone()
        devices = conn.execute("SELECT count(*) FROM last_position").fetchone()
    assert positions is not None and devices is not None
    return positions[0], devices[0]


def test_both_sides_store_every_fix_and_are_charged_per_statement(database_url, pg_admin_url):
    """600 fixes of 30 devices in batches of 100 (Processor) and 200 (peer): each database holds
    every fix once and every device; each side's statements are charged CPU, never more than the
    batches they ran in."""
    fixes = fleet_fixes(600, 30)
    peer_name = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{peer_name}"')
    try:
        ours = asyncio.run(processor_cost(prepare(database_url), fixes, 100))
        peer_url = prepare(with_database(pg_admin_url, peer_name))
        theirs = peer_cost(peer_url, fixes, 200)
        assert _stored(database_url) == (600, 30)
        assert _stored(peer_url) == (600, 30)
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{peer_name}" WITH (FORCE)')
    for ledger, batches in ((ours, 6), (theirs, 3)):
        assert ledger.calls[WHOLE] == batches
        statements = {label: ns for label, ns in ledger.cpu.items() if label != WHOLE}
        assert any(label.startswith("COPY ") for label in statements)
        assert any(label.startswith(("INSERT INTO positions", "WITH stored AS")) for label in statements)
        assert all(ns > 0 for ns in statements.values())
        assert sum(statements.values()) <= ledger.cpu[WHOLE]
