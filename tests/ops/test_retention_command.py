"""`processor retention` against real Postgres and Redis."""

from __future__ import annotations

import orjson
import psycopg
import pytest

from common.config import Settings
from ops.cli import main
from ops.retention import format_retention, retention_report
from supervisor.migrations import apply_migrations


@pytest.fixture
def old_day(database_url: str) -> str:
    """A migrated database whose far past was dropped, with a day of 2020 holding 3 rows."""
    apply_migrations(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        (before,) = conn.execute("SELECT relname FROM pg_class WHERE relname LIKE 'positions_before_%'").fetchone()
        conn.execute(f'DROP TABLE "{before}"')
        conn.execute("CREATE TABLE positions_20200101 PARTITION OF positions FOR VALUES FROM ('2020-01-01Z') TO ('2020-01-02Z')")
        conn.execute("INSERT INTO positions (device_id, ts, lat, lon) SELECT 'd', '2020-01-01Z'::timestamptz + i * "
                     "interval '1 hour', 1, 2 FROM generate_series(0, 2) i")
    return database_url


def test_report_shows_partitions_horizon_and_what_the_next_pass_drops(old_day: str, env: dict[str, str], redis_client, stream_key) -> None:
    redis_client.xgroup_create(stream_key, "processor", id="0", mkstream=True)
    redis_client.xadd(stream_key, {"data": b"{}"})
    settings = Settings.from_env({**env, "POSITIONS_RETENTION_DAYS": "30"})
    report = retention_report(settings)
    doc = report.as_json()
    first = doc["partitions"][0]
    assert (first["name"], first["from"], first["to"], first["rows"], first["rows_exact"]) == (
        "positions_20200101", "2020-01-01T00:00:00Z", "2020-01-02T00:00:00Z", 3, True)
    assert all(p["bytes"] > 0 for p in doc["partitions"])
    assert doc["retention_days"] == 30 and doc["horizon"] and doc["drop_bound"]
    assert doc["next_pass"]["drop"] == [{"name": "positions_20200101", "rows": 3}]
    # Today lies below the days the migration made: the next pass covers it from the drop bound on, in one piece.
    (below,) = [c for c in doc["next_pass"]["create"] if c["name"].startswith("positions_before_")]
    assert below["from"] == doc["drop_bound"]
    assert doc["stream"]["key"] == stream_key and doc["stream"]["length"] == 1
    text = "\n".join(format_retention(report))
    assert "drops positions_20200101 (3 rows)" in text and "30 days" in text and stream_key in text


def test_command_json_with_retention_0(old_day: str, env: dict[str, str], capsys, monkeypatch) -> None:
    """Keeping for ever: nothing to drop; the next pass recreates the far past below 2020-01-01."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["retention", "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["horizon"] is None and doc["next_pass"]["drop"] == []
    assert doc["next_pass"]["create"][0] == {"name": "positions_before_20200101", "from": None, "to": "2020-01-01T00:00:00Z"}
    assert doc["stream"] is None


def test_an_unmigrated_database_is_exit_78(database_url: str, env: dict[str, str], capsys, monkeypatch) -> None:
    """As every other operator command: a missing schema is a configuration error that says what to do."""
    for name, value in {**env, "DATABASE_URL": database_url}.items():
        monkeypatch.setenv(name, value)
    assert main(["retention"]) == 78
    assert "run `processor migrate` first" in capsys.readouterr().err
