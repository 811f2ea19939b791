"""docker-compose.yml's secrets and pins, and the files `python -m scripts.secrets` writes for it.

Read as text and YAML: no Docker engine is needed. tests/e2e/test_compose_stack.py runs the
generated secrets against real servers.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from common.config import Settings
from scripts import secrets as stack_secrets
from tests.e2e.acl import USER, documented_rule
from tests.test_deployment import COMPOSE, command_words, compose, environment, mounts, service

ROOT = Path(__file__).parents[1]
OPERATIONS = ROOT / "OPERATIONS.md"
INIT_DIR = "/docker-entrypoint-initdb.d"
SECRET_PATH = re.compile(r"/run/secrets/(\w+)")


def secrets_used_by(name: str) -> set[str]:
    """The secrets a service mounts (short or long syntax)."""
    return {entry if isinstance(entry, str) else entry["source"] for entry in service(name).get("secrets") or []}


def secret_paths(text: str) -> set[str]:
    return set(SECRET_PATH.findall(text))


# --- docker-compose.yml ---------------------------------------------------------------------


def test_every_secret_a_service_uses_is_defined_from_a_generated_file() -> None:
    """Each mounted secret is a top-level secret read from ${SECRETS_DIR:-./secrets}/<its name>, which scripts.secrets writes."""
    defined = compose().get("secrets") or {}
    generated = set(stack_secrets.PASSWORDS) | set(stack_secrets.derived(dict.fromkeys(stack_secrets.PASSWORDS, "x"), "s", "d"))
    for name in compose()["services"]:
        for secret in secrets_used_by(name):
            assert secret in defined, f"{name} mounts the secret {secret!r}, which the top-level secrets lack"
    for secret, spec in defined.items():
        assert spec.get("file") == f"${{SECRETS_DIR:-./secrets}}/{secret}", f"secret {secret}: {spec}"
        assert secret in generated, f"python -m scripts.secrets does not write {secret}"


def test_every_secret_path_a_service_names_is_mounted_in_it() -> None:
    """A /run/secrets/<name> in a service's environment, command or health check is one of its own secrets."""
    for name, svc in compose()["services"].items():
        named = set()
        for value in environment(svc).values():
            named |= secret_paths(value)
        named |= secret_paths(" ".join(command_words(svc)))
        named |= secret_paths(" ".join((svc.get("healthcheck") or {}).get("test") or []))
        assert named <= secrets_used_by(name), f"{name} names secrets it does not mount: {named - secrets_used_by(name)}"


def test_the_processor_reads_every_url_from_a_secret() -> None:
    """DATABASE_URL, MIGRATION_DATABASE_URL and REDIS_URL come from files; the plain variables are unset."""
    env = environment(service("processor"))
    for name in ("DATABASE_URL", "MIGRATION_DATABASE_URL", "REDIS_URL"):
        assert name not in env
        assert env[f"{name}_FILE"] == f"/run/secrets/{name.lower()}"


def test_postgres_owner_password_from_a_secret_and_roles_from_the_init_script() -> None:
    """POSTGRES_PASSWORD_FILE is a secret; the init directory holds the roles script, which reads a mounted secret."""
    postgres = service("postgres")
    assert environment(postgres)["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_owner_password"
    init_dir = ROOT / mounts(postgres)[INIT_DIR]
    scripts = sorted(init_dir.glob("*.sh"))
    assert scripts, f"no init script in {init_dir}"
    for script in scripts:
        assert script.stat().st_mode & stat.S_IXOTH, f"{script.name} is not executable"
        assert secret_paths(script.read_text()) <= secrets_used_by("postgres")
    assert "postgres_runtime_password" in secret_paths(scripts[0].read_text())
    assert environment(postgres)["POSTGRES_USER"] == stack_secrets.POSTGRES_OWNER


def test_redis_loads_the_acl_file_and_checks_health_as_a_user() -> None:
    """Redis starts with --aclfile from a secret; its health check authenticates (the default user is off)."""
    redis = service("redis")
    words = command_words(redis)
    assert words[words.index("--aclfile") + 1] == "/run/secrets/redis_acl"
    test = " ".join(redis["healthcheck"]["test"])
    assert "--user healthcheck" in test and "REDISCLI_AUTH=" in test and " -a " not in test


@pytest.mark.parametrize(("name", "major", "minimum"), [("redis", 7, 0), ("postgres", 15, None)])
def test_server_images_are_pinned_to_supported_releases(name: str, major: int, minimum: int | None) -> None:
    """redis:7.x.y (7.0 or later) and postgres:15.z: exact releases, never a moving tag."""
    image = service(name)["image"]
    match = re.fullmatch(rf"{name}:(\d+)\.(\d+)(?:\.(\d+))?(?:-[a-z0-9]+)?(?:@sha256:[0-9a-f]{{64}})?", image)
    assert match, f"{image} is not pinned to an exact release"
    assert int(match.group(1)) == major
    if minimum is not None:  # Redis: major.minor.patch, all three
        assert match.group(3) is not None and int(match.group(2)) >= minimum, image


def test_the_compose_file_says_how_to_make_the_secrets() -> None:
    """The header names the command that makes the secrets, and the Portainer way."""
    text = COMPOSE.read_text()
    assert "python -m scripts.secrets" in text and "SECRETS_DIR" in text and "Portainer" in text
    assert re.search(r"^/secrets/$", (ROOT / ".gitignore").read_text(), re.M), "secrets/ is not git-ignored"


# --- scripts/secrets.py ---------------------------------------------------------------------


def test_generator_writes_every_file_private_and_keeps_passwords(tmp_path: Path) -> None:
    """Files in a 0700 directory; a second run keeps every password and rewrites what derives from them."""
    directory = tmp_path / "secrets"
    first = stack_secrets.generate(directory, "telemetry:t", "telemetry:t:dlq")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    contents = {path.name: path.read_text() for path in directory.iterdir()}
    assert set(contents) == set(first)
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == stack_secrets.FILE_MODE
    passwords = [contents[name].strip() for name in stack_secrets.PASSWORDS]
    assert all(re.fullmatch(r"[0-9a-f]{48}", password) for password in passwords)
    assert len(set(passwords)) == len(passwords)

    again = stack_secrets.generate(directory, "gps:in", "gps:in:dlq")
    assert {again[name] for name in stack_secrets.PASSWORDS} == {"kept"}
    assert all((directory / name).read_text() == contents[name] for name in stack_secrets.PASSWORDS)
    assert "~gps:in:*" in (directory / "redis_acl").read_text()


def test_generated_urls_are_valid_settings(tmp_path: Path) -> None:
    """The URL files pass the Processor's own validation, read as the compose file has it read them."""
    stack_secrets.generate(tmp_path, "telemetry:t", "telemetry:t:dlq")
    settings = Settings.from_env({f"{name}_FILE": str(tmp_path / name.lower())
                                  for name in ("DATABASE_URL", "MIGRATION_DATABASE_URL", "REDIS_URL")})
    runtime = (tmp_path / "postgres_runtime_password").read_text().strip()
    assert settings.database_url == f"postgresql://processor_app:{runtime}@postgres:5432/processor"
    assert settings.migration_database_url.startswith("postgresql://processor:")
    assert settings.redis_url.startswith("redis://processor:") and settings.redis_url.endswith("@redis:6379/0")


def test_acl_file_hashes_passwords_and_turns_the_default_user_off(tmp_path: Path) -> None:
    """No password in the ACL file, only SHA-256 hashes; `default` is off."""
    stack_secrets.generate(tmp_path, "telemetry:t", "telemetry:t:dlq")
    acl = (tmp_path / "redis_acl").read_text()
    for name in stack_secrets.PASSWORDS:
        assert (tmp_path / name).read_text().strip() not in acl
    users = {line.split()[1]: line.split()[2:] for line in acl.splitlines()}
    assert users["default"][0] == "off"
    assert set(users) == {"default", "processor", "ingestion", "healthcheck", "admin"}


def acl_line(directory: Path, user: str) -> list[str]:
    """The permissions of `user` in the generated ACL file (after: user <name> on #<sha256>)."""
    line = next(line for line in (directory / "redis_acl").read_text().splitlines() if line.startswith(f"user {user} "))
    words = line.split()
    assert words[2] == "on" and re.fullmatch(r"#[0-9a-f]{64}", words[3])
    return words[4:]


def documented_permissions(rule: str, user: str) -> list[str]:
    words = rule.split()
    assert words[:5] == ["ACL", "SETUSER", user, "reset", "on"] and words[5] == "><PASSWORD>", rule
    return words[6:]


def test_acl_users_have_the_permissions_of_operations_md(tmp_path: Path) -> None:
    """The ACL file's `processor` and `ingestion` lines grant what OPERATIONS.md's ACL SETUSER rules grant
    (the processor's plus +client|setinfo, which OPERATIONS.md advises for Redis 7.2 and the stack runs 7.2)."""
    text = OPERATIONS.read_text()
    producer = re.search(r"`(ACL SETUSER ingestion [^`]*)`", text)
    assert producer, "OPERATIONS.md gives no rule for the producer's user `ingestion`"
    stack_secrets.generate(tmp_path, "<STREAM_KEY>", "<DLQ_KEY>")
    documented = documented_permissions(documented_rule(), USER)
    assert acl_line(tmp_path, USER) == [*documented, stack_secrets.REDIS_7_2_PERMISSIONS]
    assert f"add `{stack_secrets.REDIS_7_2_PERMISSIONS}`" in " ".join(text.split())
    major, minor = map(int, re.match(r"redis:(\d+)\.(\d+)", service("redis")["image"]).groups())  # type: ignore[union-attr]
    assert (major, minor) >= (7, 2), "Redis 7.0 rejects +client|setinfo: the ACL file would not load"
    assert acl_line(tmp_path, "ingestion") == documented_permissions(producer.group(1), "ingestion")
