"""The image is reproducible: a pinned base and every dependency from requirements.lock, hashed.

No Docker engine is needed: the Dockerfile, the lock and pyproject.toml are read as text.
A failure after changing pyproject's dependencies means: run `make lock` and commit the lock.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.test_deployment import dockerfile_instructions

ROOT = Path(__file__).parents[1]
LOCK = ROOT / "requirements.lock"
BUILD_INPUT = ROOT / "requirements-build.in"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# An exact Python release on a named Debian release, optionally pinned to a digest too.
PINNED_BASE = re.compile(r"python:(?P<minor>3\.\d+)\.\d+-slim-(?P<debian>[a-z]+)(?:@sha256:[0-9a-f]{64})?")
LOCK_ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?P<spec>[^\s\\;]*)(?P<rest>.*?)(?=^\S|\Z)", re.M | re.S)
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}\b")


def locked() -> dict[str, tuple[str, list[str]]]:
    """Canonical name → (version specifier as written, its hashes)."""
    text = "\n".join(line for line in LOCK.read_text().splitlines() if not line.lstrip().startswith("#"))
    entries = {}
    for match in LOCK_ENTRY.finditer(text + "\n"):
        entries[canonicalize_name(match.group("name"))] = (match.group("spec"), HASH.findall(match.group("rest")))
    assert entries, "requirements.lock lists nothing"
    return entries


def runtime_requirements() -> list[Requirement]:
    """pyproject's runtime dependencies (what an extra such as redis[hiredis] adds is the lock's to resolve)."""
    return [Requirement(text) for text in PYPROJECT["project"]["dependencies"]]


def build_requirements() -> list[Requirement]:
    return [Requirement(text) for text in PYPROJECT["build-system"]["requires"]]


def run_lines() -> list[str]:
    return [arguments for keyword, arguments in dockerfile_instructions() if keyword == "RUN"]


def test_every_locked_package_is_exact_and_hashed() -> None:
    """Each entry of the lock is `name==version` with at least one sha256 hash."""
    for name, (spec, hashes) in locked().items():
        assert re.fullmatch(r"==[0-9][0-9A-Za-z.+!-]*", spec), f"{name} is not pinned with ==: {spec!r}"
        assert hashes, f"{name} has no --hash"


@pytest.mark.parametrize("requirement", runtime_requirements() + build_requirements(), ids=str)
def test_every_dependency_is_locked_at_a_version_it_accepts(requirement: Requirement) -> None:
    """Each runtime dependency (and the build backend) is in the lock, at a version pyproject allows."""
    entries = locked()
    name = canonicalize_name(requirement.name)
    assert name in entries, f"{requirement} is not in requirements.lock: run `make lock`"
    version = Version(entries[name][0].removeprefix("=="))
    assert requirement.specifier.contains(version, prereleases=True), f"{name}=={version} does not satisfy {requirement}"


def test_the_build_backend_input_matches_pyproject() -> None:
    """requirements-build.in asks for exactly pyproject's [build-system] requires."""
    lines = [line.split("#")[0].strip() for line in BUILD_INPUT.read_text().splitlines()]
    assert sorted(filter(None, lines)) == sorted(PYPROJECT["build-system"]["requires"])


def test_dockerfile_installs_only_from_the_lock() -> None:
    """The dependencies install with --require-hashes from the lock; the project with --no-deps, built offline."""
    runs = run_lines()
    locked_install = [run for run in runs if "-r requirements.lock" in run]
    assert len(locked_install) == 1 and "--require-hashes" in locked_install[0]
    project = [run for run in runs if re.search(r"pip install .*(?<![\w/-])\.$", run)]
    assert len(project) == 1, f"one `pip install … .` for the project: {runs}"
    assert "--no-deps" in project[0] and "--no-build-isolation" in project[0]
    assert runs.index(locked_install[0]) < runs.index(project[0])
    copies = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "COPY"]
    assert any(arguments.split()[0] == "requirements.lock" for arguments in copies)


def test_base_image_is_pinned_and_the_same_in_every_stage() -> None:
    """Every FROM names one exact Python release on a named Debian (never a moving tag like 3.11-slim)."""
    images = {arguments.split()[0] for keyword, arguments in dockerfile_instructions() if keyword == "FROM"}
    assert len(images) == 1, f"the stages start from different images: {images}"
    (image,) = images
    match = PINNED_BASE.fullmatch(image)
    assert match, f"{image} is not pinned to an exact python:3.X.Y-slim-<debian> tag"
    requires = PYPROJECT["project"]["requires-python"]
    assert Requirement(f"python{requires}").specifier.contains(match.group("minor") + ".0")


def test_lock_is_resolved_for_the_image() -> None:
    """`make lock` resolves for the image's Python minor on Linux x86_64, with hashes, whatever host runs it."""
    image = next(arguments.split()[0] for keyword, arguments in dockerfile_instructions() if keyword == "FROM")
    minor = PINNED_BASE.fullmatch(image).group("minor")  # type: ignore[union-attr]
    recipe = re.search(r"^lock:.*?(?=^\S|\Z)", (ROOT / "Makefile").read_text(), re.M | re.S)
    assert recipe, "the Makefile has no `lock` target"
    words = " ".join(recipe.group(0).replace("\\\n", " ").split())
    for option in ("--generate-hashes", f"--python-version {minor}", "--python-platform x86_64-", "-o requirements.lock"):
        assert option in words, f"`make lock` lacks {option}"
    assert "make lock" in LOCK.read_text().splitlines()[1], "the lock's header names the command that made it"
