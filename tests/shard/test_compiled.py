"""The shard's per-fix path runs compiled (setup.py), and from its source whenever the build cannot be trusted."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "shard"
# Imports every module setup.py compiles, and says where each came from.
PROBE = """
import importlib, json, sys
from shard import compiled
names = sys.argv[1:]
files = {name: importlib.import_module(name).__file__ for name in names}
print(json.dumps({"files": files, "describe": compiled.describe()}))
"""


def compiled_sources() -> list[str]:
    """setup.py's COMPILED, read without running setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    (value,) = [node.value for node in tree.body if isinstance(node, ast.Assign) and node.targets[0].id == "COMPILED"]
    return ast.literal_eval(value)


def module_names() -> list[str]:
    return [path.removesuffix(".py").replace("/", ".") for path in compiled_sources()]


def probe(root: Path, **env: str) -> dict:
    full_env = {key: value for key, value in os.environ.items() if key != "PROCESSOR_PURE_PYTHON"}
    out = subprocess.run([sys.executable, "-c", PROBE, *module_names()], cwd=root, env={**full_env, "PYTHONPATH": str(root), **env},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)


def kind(path: str) -> str:
    return "source" if path.endswith(".py") else "compiled"


def test_the_test_install_compiled_every_module_setup_lists() -> None:
    """make's install compiles; if it quietly fell back to pure Python, this is where it shows."""
    manifest = json.loads((PACKAGE / "compiled.json").read_text())
    assert sorted(manifest) == sorted(compiled_sources())
    seen = probe(ROOT)
    assert {name: kind(path) for name, path in seen["files"].items()} == dict.fromkeys(module_names(), "compiled")
    assert seen["describe"] == {"compiled_modules": len(module_names()), "from_source": {}}


def test_pure_python_on_request() -> None:
    seen = probe(ROOT, PROCESSOR_PURE_PYTHON="1")
    assert {kind(path) for path in seen["files"].values()} == {"source"}
    assert seen["describe"]["compiled_modules"] == 0
    assert probe(ROOT, PROCESSOR_PURE_PYTHON="0")["describe"]["compiled_modules"] == len(module_names())


@pytest.fixture
def built_copy(tmp_path: Path) -> Path:
    """A copy of the built package, to edit."""
    shutil.copytree(PACKAGE, tmp_path / "shard", ignore=shutil.ignore_patterns("__pycache__", "*.c"))
    shutil.copytree(ROOT / "common", tmp_path / "common", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_a_module_edited_since_its_build_runs_from_its_source(built_copy: Path) -> None:
    """An edit is never silently shadowed by the stale extension module; the rest stay compiled."""
    with open(built_copy / "shard" / "geo.py", "a") as source:
        source.write("\nEDITED = True\n")
    seen = probe(built_copy)
    assert kind(seen["files"]["shard.geo"]) == "source"
    assert [name for name, path in seen["files"].items() if kind(path) == "source"] == ["shard.geo"]
    assert "changed since it was compiled" in seen["describe"]["from_source"]["shard.geo"]


def test_without_a_manifest_nothing_runs_compiled(built_copy: Path) -> None:
    """A build that never finished (no manifest) is not trusted."""
    (built_copy / "shard" / "compiled.json").unlink()
    seen = probe(built_copy)
    assert {kind(path) for path in seen["files"].values()} == {"source"}
    assert set(seen["describe"]["from_source"]) == set(module_names())
