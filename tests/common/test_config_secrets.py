"""Secrets in the configuration: URLs read from files (`*_FILE`), and every secret masked."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from common import config, logs
from common.config import Settings, redact_url
from common.errors import ConfigError, ExitCode
from tests.files import secret_file

SECRET = "f1le-s3cret"
URLS = {
    "DATABASE_URL": f"postgresql://app:{SECRET}@db:5432/gps",
    "MIGRATION_DATABASE_URL": f"postgresql://owner:{SECRET}@db:5432/gps",
    "REDIS_URL": f"redis://processor:{SECRET}@cache:6379/0",
}
FIELDS = {"DATABASE_URL": "database_url", "MIGRATION_DATABASE_URL": "migration_database_url", "REDIS_URL": "redis_url"}

pytestmark = pytest.mark.usefixtures("fresh_secrets")  # each test's secrets are its own (common.logs._SECRETS)


def config_error(env: dict[str, str]) -> str:
    """The one-line message of the ConfigError (exit 78) that `env` raises."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert info.value.exit_code == ExitCode.CONFIG == 78
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", list(URLS))
@pytest.mark.parametrize("ending", ["", "\n", "\r\n", "  \n\n"], ids=["bare", "newline", "crlf", "blank-lines"])
def test_url_is_read_from_its_file(tmp_path: Path, name: str, ending: str) -> None:
    """<NAME>_FILE gives the URL as Docker and Kubernetes mount a secret: the trailing newline is dropped."""
    path = secret_file(tmp_path, URLS[name] + ending)
    settings = Settings.from_env({f"{name}_FILE": str(path)})
    assert getattr(settings, FIELDS[name]) == URLS[name]
    assert SECRET not in repr(settings.redacted())


def test_migration_url_defaults_to_the_database_url_from_its_file(tmp_path: Path) -> None:
    """MIGRATION_DATABASE_URL (and its file) unset: the migrations use DATABASE_URL, wherever that came from."""
    path = secret_file(tmp_path, URLS["DATABASE_URL"] + "\n")
    settings = Settings.from_env({"DATABASE_URL_FILE": str(path)})
    assert settings.migration_database_url == settings.database_url == URLS["DATABASE_URL"]


@pytest.mark.parametrize("name", list(URLS))
def test_both_forms_set_is_a_configuration_error(tmp_path: Path, name: str) -> None:
    """Setting a variable and its _FILE is ambiguous: exit 78 naming both, whatever either holds."""
    path = secret_file(tmp_path, URLS[name])
    message = config_error({name: URLS[name], f"{name}_FILE": str(path)})
    assert name in message and f"{name}_FILE" in message
    assert SECRET not in message


def fifo(directory: Path) -> str:
    path = directory / "fifo"
    os.mkfifo(path)
    return str(path)


def test_a_symlink_to_the_secret_is_followed(tmp_path: Path) -> None:
    """Kubernetes mounts each secret as a symlink into a hidden directory of files."""
    link = tmp_path / "link"
    link.symlink_to(secret_file(tmp_path, URLS["DATABASE_URL"] + "\n"))
    assert Settings.from_env({"DATABASE_URL_FILE": str(link)}).database_url == URLS["DATABASE_URL"]


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda d: str(d / "absent"), "No such file"),
        (lambda d: str(d), "not a regular file"),
        (lambda d: fifo(d), "not a regular file"),  # opening one to read would wait for a writer for ever
        (lambda d: "/dev/null", "not a regular file"),
        (lambda d: str(secret_file(d, "")), "is empty"),
        (lambda d: str(secret_file(d, " \n\n")), "is empty"),
        (lambda d: str(secret_file(d, "x" * 70_000)), "larger than"),
    ],
    ids=["missing", "directory", "fifo", "device", "empty", "blank", "huge"],
)
def test_unusable_file_names_the_variable_and_the_path(tmp_path: Path, setup, expected: str) -> None:  # type: ignore[no-untyped-def]
    """A file that cannot be read, or holds nothing, is a one-line error with the variable and the path."""
    path = setup(tmp_path)
    message = config_error({"DATABASE_URL_FILE": path})
    assert "DATABASE_URL_FILE" in message and path in message
    assert expected in message


def test_unreadable_file_is_a_configuration_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret the process may not read (mounted for another uid) names the path, never the content."""
    path = secret_file(tmp_path, URLS["REDIS_URL"])
    path.chmod(0)
    try:
        path.read_text()
    except PermissionError:
        pass
    else:  # root reads it anyway: the refusal the kernel gives any other uid, from open itself

        def refused(name: object, *args: object, **kwargs: object) -> object:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(name))

        monkeypatch.setattr(config, "_read_regular_file", refused)
    message = config_error({"REDIS_URL_FILE": str(path)})
    assert "REDIS_URL_FILE" in message and str(path) in message and "Permission denied" in message


def test_not_utf8_is_a_configuration_error(tmp_path: Path) -> None:
    """Binary content is refused without quoting a byte of it."""
    path = tmp_path / "binary"
    path.write_bytes(b"postgresql://u:\xff\xfe@h/db")
    message = config_error({"DATABASE_URL_FILE": str(path)})
    assert "UTF-8" in message and str(path) in message and "\\xff" not in message and "0xff" not in message


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("DATABASE_URL", f"mysql://u:{SECRET}@h/db"),
        ("DATABASE_URL", f"postgresql://u:{SECRET}@h:99999/db"),
        ("DATABASE_URL", f"host=db password={SECRET}"),
        ("MIGRATION_DATABASE_URL", f"postgresql://h/db?sslpassword={SECRET}&sslmode=bogus%"),
        ("REDIS_URL", f"http://:{SECRET}@cache/0"),
        ("REDIS_URL", f"redis://:{SECRET}@cache:port/0"),
        # A secret file holding the password alone, or a URL cut short before its `@`.
        ("REDIS_URL", SECRET), ("DATABASE_URL", f"app:{SECRET}"),
        ("REDIS_URL", f"redis://processor:{SECRET}"), ("DATABASE_URL", f"postgresql://app:{SECRET}/gps"),
        ("MIGRATION_DATABASE_URL", f"postgresql://h1:5432,h2:{SECRET}/gps"),
        ("REDIS_URL", f"redis:processor:{SECRET}"), ("DATABASE_URL", f"postgresql:app:{SECRET}"),
        # An `@` in the password, not percent-encoded: libpq would take the rest for the host.
        ("DATABASE_URL", f"postgresql://app:pre@{SECRET}@db/gps"), ("DATABASE_URL", f"postgresql://app:pre@s/{SECRET}@db/gps"),
        # A file of several settings (an .env file): its other lines are secrets too.
        ("DATABASE_URL", f"DATABASE_URL=postgresql://app@db/gps\nPGPASSWORD={SECRET}"),
    ],
    ids=["scheme", "port", "conninfo", "bad-escape", "redis-scheme", "redis-port", "password-alone", "userinfo-alone",
         "redis-no-at", "postgres-no-at", "second-host-no-at", "redis-no-slashes", "postgres-no-slashes",
         "at-in-password", "at-and-slash-in-password", "env-file"],
)
def test_file_content_is_validated_like_the_variable(tmp_path: Path, name: str, content: str) -> None:
    """A malformed URL from a file is refused as the variable would be, naming the file, not its secret."""
    path = secret_file(tmp_path, content + "\n")
    message = config_error({f"{name}_FILE": str(path)})
    assert f"{name}_FILE" in message and str(path) in message
    assert SECRET not in message
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({name: content})
    assert SECRET not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://app:{SECRET}@db/gps",
        f"postgresql://db/gps?user=app&password={SECRET}",
        f"postgresql://db/gps?sslmode=verify-full&sslpassword={SECRET}",
        f"postgresql://db/gps?pass%77ord={SECRET}",
        f"redis://processor:{SECRET}@cache:6379/0",
        f"rediss://cache:6380/0?ssl_password={SECRET}",
        f"redis://cache:6379/0?password={SECRET}",
    ],
    ids=["userinfo", "password", "sslpassword", "encoded-name", "redis-userinfo", "redis-ssl-password", "redis-query"],
)
def test_every_secret_of_an_accepted_url_is_masked(tmp_path: Path, url: str) -> None:
    """The secrets of a URL read from a file are registered: redacted settings and any log text mask them."""
    name = "REDIS_URL" if url.startswith("redis") else "DATABASE_URL"
    settings = Settings.from_env({f"{name}_FILE": str(secret_file(tmp_path, url))})
    assert SECRET not in repr(settings.redacted())
    assert logs.scrub(f"a driver quoting it bare: {SECRET}.") == "a driver quoting it bare: ***."


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://h/db?sslmode=require&sslpassword=k3y", "postgresql://h/db?sslmode=require&sslpassword=***"),
        ("postgresql://u:pw@h/db?sslpassword=k3y&password=pw", "postgresql://u:***@h/db?sslpassword=***&password=***"),
        ("postgresql://h/db?PassWord=pw#frag", "postgresql://h/db?PassWord=***#frag"),
        ("postgresql://h/db?pass%77ord=pw", "postgresql://h/db?pass%77ord=***"),
        ("rediss://h:6380/0?ssl_password=k3y&ssl_ca_certs=/ca.pem", "rediss://h:6380/0?ssl_password=***&ssl_ca_certs=/ca.pem"),
        ("postgresql://h/db?application_name=passwords", "postgresql://h/db?application_name=passwords"),
        ("host=db password=pw port=5432", "host=db password=*** port=5432"),
        (r"host=db password = 'p w\'d' sslpassword=k3y", "host=db password = *** sslpassword=***"),
    ],
)
def test_redact_url_masks_libpq_and_redis_secrets(url: str, expected: str) -> None:
    """redact_url masks password, sslpassword and ssl_password in a query or a key=value string, nothing else."""
    assert redact_url(url) == expected


def test_an_at_sign_percent_encoded_is_no_problem() -> None:
    """`%40` in a password, or in a socket directory given as `host=`, is what the '@' check asks for."""
    for url in (f"postgresql://app:pre%40{SECRET}@db/gps", "postgresql://app@/gps?host=/run/pg%40x"):
        assert Settings.from_env({"DATABASE_URL": url}).database_url == url
