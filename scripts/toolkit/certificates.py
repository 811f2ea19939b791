"""Certificates for TLS tests: a private CA, a server certificate it signs, and an unrelated CA.

Made with the `openssl` command line (no Python dependency for a test-only need). The server
certificate names both `localhost` and `127.0.0.1`, so a client verifying the host name
(libpq's sslmode=verify-full, redis-py's default) accepts either. The second CA has never
signed anything: a client that trusts only it must refuse the server.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

VALID_DAYS = 2  # outlives any test run, so an expiry never masquerades as a wrong CA
SERVER_NAMES = ("DNS:localhost", "IP:127.0.0.1")
# P-256 keys: generated in milliseconds, accepted by Redis, Postgres and both clients.
KEY_OPTIONS = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
SERVER_EXTENSIONS = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature\n"
    "extendedKeyUsage=serverAuth\n"
    "subjectKeyIdentifier=hash\n"
    "authorityKeyIdentifier=keyid,issuer\n"
    f"subjectAltName={','.join(SERVER_NAMES)}\n"
)


@dataclass(frozen=True)
class Certificates:
    """PEM files in one directory: `ca` signed `cert` (whose key is `key`); `other_ca` signed only
    `other_cert` (key `other_key`), for the same names: what a server rotated to a CA the
    clients do not know presents."""

    ca: Path
    cert: Path
    key: Path
    other_ca: Path
    other_cert: Path
    other_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl") or "/usr/bin/openssl"
    result = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode:
        raise RuntimeError(f"openssl {args[0]} failed (exit {result.returncode}): {result.stderr.strip()}")


def _authority(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA certificate and its key."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", *KEY_OPTIONS, "-keyout", key.name, "-out", cert.name, "-days", str(VALID_DAYS),
        "-subj", f"/CN=Processor test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    return cert, key


def make_certificates(directory: Path) -> Certificates:
    """Create both CAs and a server certificate for localhost/127.0.0.1 from each in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "server.ext").write_text(SERVER_EXTENSIONS)
    ca, ca_key = _authority(directory, "ca")
    other_ca, other_ca_key = _authority(directory, "other-ca")
    cert, key = _server(directory, "server", ca, ca_key)
    other_cert, other_key = _server(directory, "other-server", other_ca, other_ca_key)
    return Certificates(ca=ca, cert=cert, key=key, other_ca=other_ca, other_cert=other_cert, other_key=other_key)


def _server(directory: Path, name: str, ca: Path, ca_key: Path) -> tuple[Path, Path]:
    """A server certificate for SERVER_NAMES signed by `ca`, and its key."""
    cert, key, request = directory / f"{name}.crt", directory / f"{name}.key", f"{name}.csr"
    _openssl("req", *KEY_OPTIONS, "-keyout", key.name, "-out", request, "-subj", "/CN=localhost", cwd=directory)
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca.name, "-CAkey", ca_key.name, "-CAcreateserial",
        "-out", cert.name, "-days", str(VALID_DAYS), "-extfile", "server.ext",
        cwd=directory,
    )
    return cert, key


def redis_arguments(certs: Certificates, tls_port: int) -> list[str]:
    """redis-server options adding a TLS-only port; clients need no certificate of their own."""
    return ["--tls-port", str(tls_port), "--tls-cert-file", str(certs.cert), "--tls-key-file", str(certs.key),
            "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no"]


def postgres_options(certs: Certificates, directory: Path, owner: tuple[int, int] | None = None) -> str:
    """postgres -c options for ssl=on, after copying the pair into `directory` (the server's own).

    Postgres refuses a key others may read, and runs as the `postgres` OS user, who may not
    reach a test's private temp dir: the copies are its own (`owner`, its (uid, gid) when we
    are root), key 0600.
    """
    for source, mode in ((certs.cert, 0o644), (certs.key, 0o600)):
        target = directory / f"tls-{source.name}"
        shutil.copyfile(source, target)
        os.chmod(target, mode)
        if owner is not None:
            os.chown(target, *owner)
    files = (f"ssl_cert_file={directory / 'tls-server.crt'}", f"ssl_key_file={directory / 'tls-server.key'}")
    return "-c ssl=on " + " ".join(f"-c {shlex.quote(setting)}" for setting in files)


def rediss_url(tls_port: int, ca: Path) -> str:
    """rediss:// by host name, trusting `ca`; redis-py takes ssl_ca_certs from the query."""
    return f"rediss://localhost:{tls_port}/0?ssl_ca_certs={quote(str(ca))}"


def verify_full_url(url: str, ca: Path) -> str:
    """The Postgres `url` by host name (verify-full checks it against the certificate), trusting `ca`."""
    parts = urlsplit(url)
    # username and password as the URL spells them (urlsplit does not unquote them)
    userinfo = "" if parts.username is None else parts.username
    if parts.password is not None:
        userinfo += f":{parts.password}"
    netloc = (f"{userinfo}@" if userinfo else "") + "localhost" + (f":{parts.port}" if parts.port else "")
    query = f"sslmode=verify-full&sslrootcert={quote(str(ca))}"
    return urlunsplit(parts._replace(netloc=netloc, query=query, fragment=""))
