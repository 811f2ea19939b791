"""TLS failures at the error boundary: a certificate the client does not trust is a refusal (exit 78), not an outage."""

from __future__ import annotations

import ssl

import psycopg
import pytest
import redis.exceptions as rx

from common.errors import ConfigError, ExitCode
from common.faults import Outcome, classify, untrusted_certificate
from common.redis_client import check_tls_files
from common.retry import ServerUnreachable, refused, retry_blocking

SELF_SIGNED = "self-signed certificate in certificate chain"


def handshake_error(reason: str = SELF_SIGNED) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {reason}")
    error.verify_message = reason  # what the ssl module's handshake sets
    return error


def redis_wrapped(error: BaseException) -> rx.ConnectionError:
    """As redis-py raises it: a ConnectionError raised while handling the ssl module's error."""
    try:
        try:
            raise error
        except OSError as exc:
            raise rx.ConnectionError(f"Error 1 connecting to localhost:6380. {exc}.")  # noqa: B904 - as redis-py does
    except rx.ConnectionError as wrapped:
        return wrapped


UNTRUSTED = [
    redis_wrapped(handshake_error()),
    redis_wrapped(handshake_error("Hostname mismatch, certificate is not valid for 'redis'.")),
    redis_wrapped(handshake_error("certificate has expired")),
    handshake_error(),  # from a client that does not wrap it
    psycopg.OperationalError(
        'connection failed: connection to server at "127.0.0.1", port 5433 failed: SSL error: certificate verify failed'
    ),
    psycopg.OperationalError(
        'connection failed: server certificate for "db.example" does not match host name "localhost"'
    ),
]


@pytest.mark.parametrize("exc", UNTRUSTED, ids=repr)
def test_an_untrusted_certificate_is_refused(exc: BaseException) -> None:
    """Wrong CA, another host's name, expiry: waiting cannot fix them, so they are REFUSED."""
    assert classify(exc) is Outcome.REFUSED
    assert untrusted_certificate(exc)


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.OperationalError('connection failed: root certificate file "/ca.crt" does not exist'),
        psycopg.OperationalError("connection failed: server does not support SSL, but SSL was required"),
    ],
    ids=repr,
)
def test_other_tls_misconfigurations_of_postgres_are_refused(exc: BaseException) -> None:
    """A missing sslrootcert file, or sslmode=require against a server without TLS."""
    assert classify(exc) is Outcome.REFUSED
    assert untrusted_certificate(exc) is None


@pytest.mark.parametrize(
    "exc",
    [
        rx.ConnectionError("Error 104 while writing to socket. Connection reset by peer."),
        rx.TimeoutError("Timeout connecting to server"),
        redis_wrapped(ConnectionResetError(104, "Connection reset by peer")),
        psycopg.OperationalError("connection failed: SSL SYSCALL error: EOF detected"),
    ],
    ids=repr,
)
def test_a_lost_tls_connection_is_still_an_outage(exc: BaseException) -> None:
    """Only verification failures are refusals: a TLS connection that drops is waited out."""
    assert classify(exc) is Outcome.OUTAGE
    assert untrusted_certificate(exc) is None


def test_the_refusal_says_the_certificate_is_not_trusted() -> None:
    """One line naming the server and why its certificate was refused, exit 78."""
    error = refused("Redis at REDIS_URL", redis_wrapped(handshake_error()))
    assert str(error) == f"TLS certificate of Redis at REDIS_URL not trusted: certificate verify failed: {SELF_SIGNED}"
    assert error.exit_code == ExitCode.CONFIG


def test_start_up_does_not_wait_out_an_untrusted_certificate() -> None:
    """retry_blocking ends at the first attempt, long before its deadline."""
    attempts = []

    def connect() -> None:
        attempts.append(1)
        raise redis_wrapped(handshake_error())

    with pytest.raises(Exception) as raised:
        retry_blocking("Redis at REDIS_URL", connect, deadline_s=60)
    assert not isinstance(raised.value, ServerUnreachable)
    assert raised.value.exit_code == ExitCode.CONFIG  # type: ignore[attr-defined]
    assert len(attempts) == 1


def test_a_tls_file_that_cannot_be_read_is_a_configuration_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """redis-py would report ENOENT at connect time, like an outage; it is named before connecting."""
    ca = tmp_path / "ca.crt"
    ca.write_text("not checked here: only that it can be read")
    check_tls_files(f"rediss://localhost:6380/0?ssl_ca_certs={ca}")
    check_tls_files("redis://localhost:6379/0")
    for query in (f"ssl_ca_certs={tmp_path}/missing.crt", f"ssl_certfile={ca}&ssl_keyfile={tmp_path}/nope.key"):
        with pytest.raises(ConfigError, match=r"ssl_(ca_certs|keyfile)=.* in the Redis URL cannot be read: No such file"):
            check_tls_files(f"rediss://localhost:6380/0?{query}")
