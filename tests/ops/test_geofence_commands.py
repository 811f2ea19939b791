"""`processor geofences import|list` and `processor rehydrate` against real Postgres and Redis."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import orjson
import psycopg
import pytest
import redis

from common.config import Settings
from common.errors import ExitCode, ProcessorError
from common.keys import DEVICE_LOCK_CLASS, rehydrate_channel
from ops.errors import SchemaMissing
from ops.geofence_file import InvalidGeofences, check_feature
from ops.geofences import import_file, list_geofences
from ops.rehydrate import rehydrate
from scripts.toolkit.services import free_port
from supervisor.migrations import apply_migrations
from tests.e2e.processes import wait_for
from tests.files import collection, feature, geojson_file
from tests.ops.letters import run_cli
SECRET = "s3cret-pw"

DEPOT = {"type": "Polygon", "coordinates": [[[10, 50], [10.01, 50], [10.01, 50.01], [10, 50.01], [10, 50]]]}
DOCKS = {
    "type": "MultiPolygon",
    "coordinates": [
        [[[11, 51], [11.01, 51], [11.01, 51.01], [11, 51.01], [11, 51]]],
        [[[12, 52], [12.01, 52], [12.01, 52.01], [12, 52.01], [12, 52]]],
    ],
}
YARD = {"type": "Point", "coordinates": [13.0, 53.0]}
BOWTIE = {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}


WriteGeojson = Callable[[object], Path]
THREE_FEATURES = [feature("Depot", DEPOT), feature("Docks", DOCKS), feature("Yard", YARD, radius_m=250.0)]
THREE = collection(*THREE_FEATURES)


@pytest.fixture
def migrated(database_url: str) -> str:
    apply_migrations(database_url)
    return database_url


@pytest.fixture
def write_geojson(tmp_path: Path) -> WriteGeojson:
    """Factory: write a document to a new .geojson file and return its path."""
    counter = iter(range(1000))

    def write(document: object) -> Path:
        return geojson_file(tmp_path / f"fences-{next(counter)}.geojson", document)

    return write


def rows(database_url: str) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT id, name, geometry, radius_m, active, updated_at FROM geofences ORDER BY name").fetchall()


def revision(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT revision FROM geofence_revision").fetchone()[0]  # type: ignore[index]


# --- import ------------------------------------------------------------------------------


def test_import_inserts_polygon_multipolygon_and_circle(migrated: str, write_geojson: WriteGeojson) -> None:
    """Every feature becomes a row with its geometry, radius and active flag; running shards see a new revision."""
    before = revision(migrated)
    result = import_file(migrated, write_geojson(THREE))
    assert ([n for _, n in result.inserted], result.updated) == (["Depot", "Docks", "Yard"], [])
    stored = {name: (geometry, radius_m, active) for _, name, geometry, radius_m, active, _ in rows(migrated)}
    assert stored == {"Depot": (DEPOT, None, True), "Docks": (DOCKS, None, True), "Yard": (YARD, 250.0, True)}
    assert revision(migrated) > before


def test_reimport_updates_by_name(migrated: str, write_geojson: WriteGeojson) -> None:
    """A name already stored is updated in place: same id, new geometry and flags, later updated_at."""
    import_file(migrated, write_geojson(THREE))
    first = {row[1]: row for row in rows(migrated)}
    changed = collection(
        feature("Depot", DOCKS), feature("Yard", YARD, radius_m=75.5, active=False), feature("Gate", YARD, radius_m=10)
    )
    result = import_file(migrated, write_geojson(changed))
    assert [n for _, n in result.updated] == ["Depot", "Yard"] and [n for _, n in result.inserted] == ["Gate"]
    second = {row[1]: row for row in rows(migrated)}
    for name in ("Depot", "Yard"):
        assert second[name][0] == first[name][0]
        assert second[name][5] > first[name][5]
    assert second["Depot"][2] == DOCKS
    assert second["Yard"][3:5] == (75.5, False)
    assert second["Docks"] == first["Docks"]  # not in the file: left alone
    assert dict(result.updated) == {first["Depot"][0]: "Depot", first["Yard"][0]: "Yard"}


def test_reimport_leaves_unchanged_geofences_alone(migrated: str, write_geojson: WriteGeojson) -> None:
    """A feature stored exactly so already is reported unchanged, and its row (updated_at included) is not
    touched; one changed beside it is updated."""
    import_file(migrated, write_geojson(THREE))
    first = {row[1]: row for row in rows(migrated)}
    result = import_file(migrated, write_geojson(collection(
        feature("Depot", DEPOT), feature("Docks", DOCKS), feature("Yard", YARD, radius_m=75.5))))
    assert ([n for _, n in result.unchanged], [n for _, n in result.updated], result.inserted) == (["Depot", "Docks"], ["Yard"], [])
    assert dict(result.unchanged) == {first["Depot"][0]: "Depot", first["Docks"][0]: "Docks"}
    second = {row[1]: row for row in rows(migrated)}
    assert (second["Depot"], second["Docks"]) == (first["Depot"], first["Docks"])
    assert second["Yard"][5] > first["Yard"][5]


def test_an_invalid_feature_writes_nothing(migrated: str, write_geojson: WriteGeojson) -> None:
    """One bad feature among good ones: every problem is named by index and name, no row changes."""
    import_file(migrated, write_geojson(collection(feature("Depot", DEPOT))))
    before = rows(migrated)
    document = collection(
        feature("Depot", DOCKS),
        feature("Bowtie", BOWTIE),
        feature("Yard", YARD),
        feature("", DEPOT),
        feature("Depot", YARD, radius_m=5),
    )
    with pytest.raises(InvalidGeofences) as caught:
        import_file(migrated, write_geojson(document))
    problems = caught.value.problems
    assert len(problems) == 4, problems
    assert 'feature 1 "Bowtie"' in problems[0] and "Self-intersection" in problems[0]
    assert 'feature 2 "Yard"' in problems[1] and "radius_m" in problems[1]
    assert "feature 3 (no name)" in problems[2] and "properties.name" in problems[2]
    assert 'feature 4 "Depot"' in problems[3] and "feature 0" in problems[3]
    assert rows(migrated) == before


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (feature("P", DEPOT, radius_m=5), "applies only to a Point"),
        (feature("C", YARD, radius_m="5"), "positive number"),
        (feature("C", YARD, radius_m=True), "positive number"),
        (feature("A", DEPOT, active="yes"), "true or false"),
        (feature(None, DEPOT), "properties.name is required"),
        (feature("tab\there", DEPOT), "control characters"),
        ({"type": "Feature", "properties": {"name": "G"}}, "no geometry"),
        ({"type": "Geometry", "properties": {"name": "G"}, "geometry": DEPOT}, '"type" must be "Feature"'),
        ({"type": "Feature", "properties": [], "geometry": DEPOT}, '"properties" must be an object'),
        ([1, 2], "not a GeoJSON Feature"),
        (feature("L", {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}), "LineString"),
    ],
)
def test_feature_problems_are_named(item: object, reason: str) -> None:
    """check_feature reports each kind of bad feature with its index and the reason."""
    parsed, problems = check_feature(5, item)
    assert parsed is None
    assert len(problems) == 1 and problems[0].startswith("feature 5") and reason in problems[0], problems


def test_a_single_feature_and_defaults(migrated: str, write_geojson: WriteGeojson) -> None:
    """A bare Feature is accepted; active defaults to true and an integer radius is stored as metres."""
    result = import_file(migrated, write_geojson(feature("Yard", YARD, radius_m=300, active=None)))
    assert [n for _, n in result.inserted] == ["Yard"]
    assert [row[3:5] for row in rows(migrated)] == [(300.0, True)]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "FeatureCollection or Feature, got a JSON array"),
        (b'{"type": "Polygon", "coordinates": []}', "got type 'Polygon'"),
        (b'{"type": "FeatureCollection"}', '"features" array'),
        (b'{"type": "FeatureCollection", "features": []}', "no features"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_bad_files_are_clear_errors(migrated: str, tmp_path: Path, content: bytes, reason: str) -> None:
    """A file that is not a GeoJSON FeatureCollection or Feature is one ProcessorError naming the file."""
    path = tmp_path / "bad.geojson"
    path.write_bytes(content)
    with pytest.raises(ProcessorError, match=reason) as caught:
        import_file(migrated, path)
    assert "bad.geojson" in str(caught.value) and "\n" not in str(caught.value)
    assert rows(migrated) == []


def test_import_needs_a_migrated_database(database_url: str, write_geojson: WriteGeojson) -> None:
    """Without the schema, import (and list) say to run `processor migrate` first."""
    with pytest.raises(SchemaMissing, match="run `processor migrate` first"):
        import_file(database_url, write_geojson(THREE))
    with pytest.raises(SchemaMissing, match="run `processor migrate` first"):
        list_geofences(database_url)


# --- the real command line ---------------------------------------------------------------


def test_cli_import_end_to_end(env: dict[str, str], migrated: str, write_geojson: WriteGeojson) -> None:
    """`processor geofences import` inserts, then re-importing with --json reports the updates."""
    path = write_geojson(THREE)
    first = run_cli(env, "geofences", "import", str(path))
    assert first.returncode == ExitCode.OK, first.stderr
    assert first.stdout.splitlines()[0] == f"{path}: inserted 3, updated 0, unchanged 0"
    assert first.stderr == ""
    again = run_cli(env, "geofences", "import", "--json", str(path))
    assert again.returncode == ExitCode.OK, again.stderr
    summary = orjson.loads(again.stdout)
    assert (summary["inserted"], summary["updated"], summary["unchanged"]) == (0, 0, 3)
    assert sorted((g["name"], g["action"]) for g in summary["geofences"]) == [
        ("Depot", "unchanged"), ("Docks", "unchanged"), ("Yard", "unchanged")]


def test_cli_import_reads_standard_input_for_a_dash(env: dict[str, str], migrated: str, write_geojson: WriteGeojson) -> None:
    """`processor geofences import -` reads the GeoJSON from standard input; an empty one is not JSON (exit 1)."""
    with write_geojson(THREE).open("rb") as piped:
        done = run_cli(env, "geofences", "import", "-", stdin=piped.fileno())
    assert done.returncode == ExitCode.OK, done.stderr
    assert done.stdout.splitlines()[0] == "-: inserted 3, updated 0, unchanged 0"
    assert sorted(row[1] for row in rows(migrated)) == ["Depot", "Docks", "Yard"]
    empty = run_cli(env, "geofences", "import", "-")
    assert empty.returncode == 1 and empty.stderr.startswith("processor: -: not valid JSON"), empty.stderr


def test_cli_reaches_postgres_through_a_libpq_url_naming_two_hosts(
    env: dict[str, str], migrated: str, write_geojson: WriteGeojson
) -> None:
    """SPEC §4: DATABASE_URL is a libpq URL, which may list hosts to try in turn (a failover
    pair). The first one here refuses connections; the second is the test's server."""
    parts = urlsplit(env["DATABASE_URL"])
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    hosts = f"127.0.0.1:{free_port()},{parts.hostname}:{parts.port or 5432}"
    two_hosts = urlunsplit((parts.scheme, userinfo + hosts, parts.path, parts.query, ""))
    done = run_cli({**env, "DATABASE_URL": two_hosts}, "geofences", "import", str(write_geojson(THREE)))
    assert done.returncode == ExitCode.OK, done.stderr
    assert done.stdout.splitlines()[0].endswith("inserted 3, updated 0, unchanged 0")


def test_cli_invalid_file_exits_1_with_one_line_per_problem(
    env: dict[str, str], migrated: str, write_geojson: WriteGeojson
) -> None:
    """An invalid feature: exit 1, a stderr line naming it, a summary line, nothing written."""
    path = write_geojson(collection(feature("Depot", DEPOT), feature("Bowtie", BOWTIE)))
    done = run_cli(env, "geofences", "import", str(path))
    assert done.returncode == ExitCode.FAILED
    lines = done.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"processor: {path}: feature 1 \"Bowtie\": Polygon is not valid")
    assert lines[1] == f"processor: {path}: 1 problem found; nothing was written"
    assert rows(migrated) == []


def test_cli_errors_and_exit_codes(env: dict[str, str], database_url: str, tmp_path: Path) -> None:
    """Missing file exits 1, bad usage 2, missing schema and bad config 78; each one line on stderr."""
    missing = run_cli(env, "geofences", "import", str(tmp_path / "nope.geojson"))
    assert (missing.returncode, missing.stderr.strip()) == (1, f"processor: {tmp_path / 'nope.geojson'}: no such file")
    unmigrated = run_cli(env, "geofences", "list")
    assert unmigrated.returncode == ExitCode.CONFIG and "run `processor migrate` first" in unmigrated.stderr
    assert len(unmigrated.stderr.splitlines()) == 1
    assert run_cli(env, "geofences").returncode == ExitCode.USAGE
    assert run_cli(env, "rehydrate", "x" * 65).returncode == ExitCode.USAGE
    bad_config = run_cli({**env, "SHARDS": "many"}, "geofences", "list")
    assert bad_config.returncode == ExitCode.CONFIG and "SHARDS" in bad_config.stderr


def test_cli_never_prints_passwords(env: dict[str, str], migrated: str) -> None:
    """Unreachable Postgres or Redis with a password in the URL: exit 1, the password nowhere in the output."""
    no_postgres = run_cli({**env, "DATABASE_URL": f"postgresql://app:{SECRET}@127.0.0.1:1/x"}, "geofences", "list")
    assert no_postgres.returncode == ExitCode.FAILED and "cannot connect to Postgres" in no_postgres.stderr
    no_redis = run_cli({**env, "REDIS_URL": f"redis://:{SECRET}@127.0.0.1:1/0"}, "rehydrate", "dev-1")
    assert no_redis.returncode == ExitCode.FAILED and "cannot notify the shards" in no_redis.stderr
    for done in (no_postgres, no_redis):
        assert SECRET not in done.stdout + done.stderr
        assert len(done.stderr.splitlines()) == 1


def test_cli_list(env: dict[str, str], migrated: str, write_geojson: WriteGeojson) -> None:
    """`geofences list --json`: every geofence, its type and devices inside now; --active-only hides inactive ones."""
    import_file(migrated, write_geojson(collection(*THREE_FEATURES, feature("Old", DEPOT, active=False))))
    ids = {row[1]: row[0] for row in rows(migrated)}
    with psycopg.connect(migrated) as conn:
        visits = [("a", "Depot", None), ("b", "Depot", None), ("c", "Depot", "2026-03-01T10:00Z"),
                  ("a", "Yard", None), ("a", "Yard", None)]  # the last: a duplicate open row counts once
        for n, (device, geofence, exited) in enumerate(visits):
            conn.execute(
                "INSERT INTO timing_records (device_id, geofence_id, entered_at, exited_at)"
                " VALUES (%s, %s, now() - %s * interval '1 minute', %s)",
                (device, ids[geofence], n, exited),
            )
    listed = run_cli(env, "geofences", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    by_name = {g["name"]: g for g in orjson.loads(listed.stdout)}
    assert list(by_name) == ["Depot", "Docks", "Yard", "Old"]  # id order
    assert {n: (g["type"], g["radius_m"], g["active"], g["inside_now"]) for n, g in by_name.items()} == {
        "Depot": ("Polygon", None, True, 2),
        "Docks": ("MultiPolygon", None, True, 0),
        "Yard": ("Circle", 250.0, True, 1),
        "Old": ("Polygon", None, False, 0),
    }
    assert by_name["Depot"]["id"] == ids["Depot"] and by_name["Depot"]["updated_at"]
    active_only = run_cli(env, "geofences", "list", "--json", "--active-only")
    assert [g["name"] for g in orjson.loads(active_only.stdout)] == ["Depot", "Docks", "Yard"]
    table = run_cli(env, "geofences", "list", "--all").stdout.splitlines()
    assert table[0].split() == ["ID", "NAME", "TYPE", "RADIUS_M", "ACTIVE", "UPDATED_AT", "INSIDE_NOW"]
    assert len(table) == 5 and table[4].split()[1:5] == ["Old", "Polygon", "-", "no"]


# --- rehydrate ---------------------------------------------------------------------------


def insert_device(database_url: str, device_id: str, state_version: int) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO last_position (device_id, ts, lat, lon, state_version) VALUES (%s, now(), 1, 2, %s)",
            (device_id, state_version),
        )


def state_version(database_url: str, device_id: str) -> int | None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT state_version FROM last_position WHERE device_id = %s", (device_id,)).fetchone()
    return row[0] if row else None


def test_rehydrate_bumps_the_version_and_publishes(
    env: dict[str, str], migrated: str, redis_client: redis.Redis, stream_key: str
) -> None:
    """The device's state_version goes up by one and a subscriber on the channel receives its id."""
    insert_device(migrated, "dev-1", 4)
    pubsub = redis_client.pubsub()
    try:
        pubsub.subscribe(rehydrate_channel(stream_key))
        wait_for(lambda: (m := pubsub.get_message(timeout=0.1)) and m["type"] == "subscribe", 10, what="subscription")
        done = run_cli(env, "rehydrate", "--json", "dev-1")
        assert done.returncode == 0, done.stderr
        expected = {"device_id": "dev-1", "known": True, "state_version": 5, "shards_notified": 1}
        assert orjson.loads(done.stdout) == expected
        message = wait_for(lambda: pubsub.get_message(timeout=0.1), 10, what="the rehydrate message")
        assert (message["type"], message["data"]) == ("message", b"dev-1")
    finally:
        pubsub.close()
    assert state_version(migrated, "dev-1") == 5


def test_rehydrate_of_an_unknown_device_succeeds(env: dict[str, str], migrated: str) -> None:
    """An unknown device: exit 0, the output says it is not known, nothing is created."""
    done = run_cli(env, "rehydrate", "ghost")
    assert done.returncode == 0, done.stderr
    assert "'ghost' is not known" in done.stdout and "0 shard(s)" in done.stdout
    assert state_version(migrated, "ghost") is None


def test_rehydrate_waits_for_a_batch_holding_the_device(settings: Settings, migrated: str) -> None:
    """The bump takes the writer's device lock, so it cannot be overwritten by a batch in flight."""
    insert_device(migrated, "dev-1", 0)
    outcome: list[object] = []
    with psycopg.connect(migrated) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (DEVICE_LOCK_CLASS, "dev-1"))
        worker = threading.Thread(target=lambda: outcome.append(rehydrate(settings, "dev-1")))
        worker.start()
        with psycopg.connect(migrated, autocommit=True) as watcher:
            wait_for(
                lambda: watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = 'processor-cli' AND wait_event = 'advisory'"
                ).fetchone()[0],  # type: ignore[index]
                10,
                what="rehydrate to wait for the device lock",
            )
        assert outcome == [] and state_version(migrated, "dev-1") == 0
        holder.commit()
    worker.join(timeout=30)
    (result,) = outcome
    assert (result.known, result.state_version) == (True, 1)  # type: ignore[attr-defined]




def test_cli_list_escapes_names_that_could_drive_the_terminal(env: dict[str, str], migrated: str) -> None:
    """A name edited in with psql (an escape sequence, a right-to-left override) is listed escaped."""
    with psycopg.connect(migrated) as conn:
        conn.execute(
            "INSERT INTO geofences (name, geometry, radius_m) VALUES (%s, %s, 10)",
            ("evil\x1b[31mRED\u202e", '{"type": "Point", "coordinates": [5, 5]}'),
        )
    listed = run_cli(env, "geofences", "list")
    assert listed.returncode == ExitCode.OK, listed.stderr
    assert "\x1b" not in listed.stdout and "\u202e" not in listed.stdout
    assert "evil\\x1b[31mRED\\u202e" in listed.stdout
