"""The container files: Dockerfile and docker-compose.yml keep the properties operations rely on."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from supervisor.arbiter import STOP_MARGIN_S

ROOT = Path(__file__).parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
SPEC = Path(__file__).parents[1].parent / "shared" / "SPEC.md"
DEFAULT_DRAIN_TIMEOUT_S = 20.0  # SPEC §4
DURATION_UNITS_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)")
DEFAULTED_VARIABLE = re.compile(r"\$\{\w+:?-(?P<default>[^}]*)\}")  # ${NAME:-default} or ${NAME-default}
PASSWORD_IN_URL = re.compile(r"://(?:\$\{[^}]*\}|[^/@:$]+):([^@]+)@")  # user (literal or ${...}):password@


# --- parsing -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the last build stage: the image that runs."""
    instructions = dockerfile_instructions()
    start = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[start:]


def only(stage: list[tuple[str, str]], keyword: str) -> str:
    """The arguments of the last `keyword` instruction of the stage (the one that counts)."""
    found = [arguments for kw, arguments in stage if kw == keyword]
    assert found, f"no {keyword} in the final stage of the Dockerfile"
    return found[-1]


def exec_form(arguments: str) -> list[str]:
    """A JSON-array (exec form) argument list; shell form fails the test."""
    assert arguments.startswith("["), f"not exec form: {arguments}"
    return json.loads(arguments)


def dockerfile_healthcheck() -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's options and its exec-form command (after CMD)."""
    arguments = only(final_stage(), "HEALTHCHECK")
    options_text, _, command = arguments.partition("CMD ")
    options = dict(re.findall(r"--([\w-]+)=(\S+)", options_text))
    return options, exec_form(command.strip())


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def service(name: str) -> dict:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return services[name]


def environment(svc: dict) -> dict[str, str]:
    """A service's environment as a mapping, whichever of the two Compose forms it uses."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {name: "" if value is None else str(value) for name, value in env.items()}


def command_words(svc: dict) -> list[str]:
    command = svc.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def mounts(svc: dict) -> dict[str, str]:
    """Container path → source, for the short and the long volume syntax; a `${VARIABLE:-default}`
    in the short syntax is read as Compose reads it with the variable unset: its default."""
    found = {}
    for volume in svc.get("volumes") or []:
        if isinstance(volume, str):
            source, _, rest = DEFAULTED_VARIABLE.sub(r"\g<default>", volume).partition(":")
            found[rest.split(":")[0]] = source
        else:
            found[volume["target"]] = volume.get("source", "")
    return found


def parse_duration_s(text: str | int | float) -> float:
    """A Compose/Go duration ("30s", "1m", "1m30s", "500ms") in seconds."""
    if isinstance(text, int | float):
        return float(text)
    text = text.strip()
    parts = DURATION_PART.findall(text)
    assert parts and "".join(number + unit for number, unit in parts) == text, f"not a duration: {text!r}"
    return sum(float(number) * DURATION_UNITS_S[unit] for number, unit in parts)


def spec_variables() -> set[str]:
    """The variable names of SPEC §4's table."""
    text = SPEC.read_text()
    section = re.search(r"^## 4\..*?(?=^## )", text, re.M | re.S)
    assert section, "SPEC.md has no section 4"
    names = set()
    for first_cell in re.findall(r"^\|([^|]*)\|", section.group(0), re.M):  # a row may name several
        names |= set(re.findall(r"`([A-Z][A-Z0-9_]*)`", first_cell))
    return names


# --- Dockerfile ----------------------------------------------------------------------------


def test_base_image_is_slim_official_python() -> None:
    """Every stage starts from the official slim Python image, at least the 3.11 the project needs."""
    images = [arguments.split()[0] for keyword, arguments in dockerfile_instructions() if keyword == "FROM"]
    assert images
    for image in images:
        match = re.fullmatch(r"python:3\.(\d+)(?:\.\d+)?-slim(?:-[a-z]+)?(?:@sha256:[0-9a-f]{64})?", image)
        assert match, f"{image} is not an official python:3.x-slim image"
        assert int(match.group(1)) >= 11, f"{image} is older than requires-python >=3.11"


def test_runs_as_a_non_root_user_set_before_cmd() -> None:
    """The running image switches to a user that is not root before its CMD."""
    stage = final_stage()
    keywords = [keyword for keyword, _ in stage]
    assert "USER" in keywords and "CMD" in keywords
    user_at = max(i for i, keyword in enumerate(keywords) if keyword == "USER")
    assert user_at < keywords.index("CMD")
    user = stage[user_at][1].split(":")[0]
    assert user not in ("root", "0"), f"USER {user} is root"


def test_command_is_processor_run() -> None:
    """The container's command is `processor run`, in exec form so the supervisor gets SIGTERM itself."""
    stage = final_stage()
    assert exec_form(only(stage, "CMD")) == ["processor", "run"]
    assert "ENTRYPOINT" not in [keyword for keyword, _ in stage], "an ENTRYPOINT would turn CMD into its arguments"


def test_healthcheck_requests_healthz_with_python() -> None:
    """HEALTHCHECK asks /healthz with Python's urllib (slim has no curl), with explicit timings."""
    options, command = dockerfile_healthcheck()
    assert {"interval", "timeout", "start-period", "retries"} <= options.keys()
    assert parse_duration_s(options["timeout"]) < parse_duration_s(options["interval"])
    assert command[:2] == ["python", "-c"]
    assert "/healthz" in command[2] and "urllib" in command[2]


def test_stop_signal_is_sigterm() -> None:
    """STOPSIGNAL is SIGTERM, the supervisor's graceful drain."""
    assert only(final_stage(), "STOPSIGNAL") == "SIGTERM"


# --- the health check, run for real ---------------------------------------------------------


class HealthHandler(BaseHTTPRequestHandler):
    """Answers /healthz with the status its server holds."""

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        code = self.server.status if self.path == "/healthz" else 404  # type: ignore[attr-defined]
        body = b'{"healthy": %s}' % (b"true" if code == 200 else b"false")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        """Quiet."""


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    """A local /healthz on a free port; set `.status` to what it answers."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), HealthHandler)
    server.status = 200  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join()
    server.server_close()


def run_check(command: list[str], port: int) -> int:
    """Exit status of a health check command run with HTTP_PORT=port and no proxy settings."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["HTTP_PORT"] = str(port)
    assert command[0] == "python"
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30).returncode


@pytest.mark.parametrize("source", ["Dockerfile", "docker-compose.yml"])
def test_health_check_passes_on_200_and_fails_on_503(source: str, health_server: ThreadingHTTPServer) -> None:
    """The health check command exits 0 while /healthz answers 200, non-zero on 503 or no answer."""
    if source == "Dockerfile":
        command = dockerfile_healthcheck()[1]
    else:
        test = service("processor")["healthcheck"]["test"]
        assert test[0] == "CMD"
        command = test[1:]
    port = health_server.server_address[1]
    assert run_check(command, port) == 0
    health_server.status = 503  # type: ignore[attr-defined]
    assert run_check(command, port) != 0
    health_server.shutdown()
    health_server.server_close()
    assert run_check(command, port) != 0


# --- docker-compose.yml --------------------------------------------------------------------


def test_redis_keeps_the_stream_on_a_volume_with_appendonly() -> None:
    """Redis runs with --appendonly yes and keeps /data in a named volume."""
    redis = service("redis")
    words = command_words(redis)
    assert "--appendonly" in words and words[words.index("--appendonly") + 1] == "yes"
    assert mounts(redis).get("/data") in (compose().get("volumes") or {})


def test_postgres_keeps_its_data_on_a_volume() -> None:
    """Postgres keeps its data directory in a named volume."""
    postgres = service("postgres")
    assert mounts(postgres).get("/var/lib/postgresql/data") in (compose().get("volumes") or {})


def test_processor_restarts_unless_stopped() -> None:
    """The processor comes back after a crash or a reboot, but not after a deliberate stop."""
    assert service("processor")["restart"] == "unless-stopped"


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30.0), ("1m", 60.0), ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0), (45, 45.0)]
)
def test_duration_parser(text: str | int, seconds: float) -> None:
    """The Compose duration forms used below parse to the right number of seconds."""
    assert parse_duration_s(text) == seconds


def test_stop_grace_period_outlasts_the_drain() -> None:
    """stop_grace_period exceeds DRAIN_TIMEOUT_S plus the supervisor's stop margin, so no drain is cut by SIGKILL."""
    processor = service("processor")
    drain_s = float(environment(processor).get("DRAIN_TIMEOUT_S", DEFAULT_DRAIN_TIMEOUT_S))
    assert STOP_MARGIN_S >= 2.0
    assert parse_duration_s(processor["stop_grace_period"]) > drain_s + STOP_MARGIN_S
    assert processor.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_two_replicas_and_no_host_port() -> None:
    """Two processor replicas; none publishes a host port (two would collide), the port is only exposed."""
    processor = service("processor")
    assert processor["deploy"]["replicas"] == 2
    assert "ports" not in processor
    assert "container_name" not in processor, "a fixed container name allows one replica only"
    assert "INSTANCE_ID" not in environment(processor), "one INSTANCE_ID would give both replicas the same consumers"


def test_processor_waits_for_healthy_servers() -> None:
    """The processor starts after Redis and Postgres pass their own health checks."""
    processor = service("processor")
    for name in ("redis", "postgres"):
        assert processor["depends_on"][name]["condition"] == "service_healthy"
        assert service(name)["healthcheck"]["test"]


def test_no_password_is_in_any_environment() -> None:
    """No environment holds a password, literal or ${VARIABLE}: a *PASSWORD* variable is a *_FILE
    naming a Docker secret, and no URL carries a password (`docker inspect` shows environments)."""
    for name, svc in compose()["services"].items():
        for variable, value in environment(svc).items():
            assert not PASSWORD_IN_URL.findall(value), f"{name}.{variable} puts a password in a URL: {value!r}"
            if re.search("PASSWORD|SECRET|TOKEN", variable):
                assert variable.endswith("_FILE") and value.startswith("/run/secrets/"), (
                    f"{name}.{variable} must be a *_FILE naming a secret under /run/secrets/, not {value!r}"
                )
    assert not re.search(r"\$\{\w*(PASSWORD|TOKEN)\w*", COMPOSE.read_text()), "a password from a variable"


def test_processor_environment_names_are_in_spec() -> None:
    """Each variable the processor is given is one SPEC §4 defines (a misspelt name would be silently ignored)."""
    if not SPEC.exists():
        pytest.skip(f"{SPEC} is absent")
    known = spec_variables()
    assert "DRAIN_TIMEOUT_S" in known  # the table was found and read
    unknown = set(environment(service("processor"))) - known
    assert not unknown, f"not in SPEC §4: {sorted(unknown)}"
