"""The layers point one way, and no module grows past a readable size.

    ops/         the operator's command line; may import everything below
    supervisor/  shard/
    common/      what all of them share; imports none of the above

Imports are read with `ast` from every module, those inside functions included (a lazy
import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
MAX_LINES = 400
SKIPPED_DIRS = {"tests", ".venv", ".git", "build", "dist", "__pycache__", "node_modules"}

# package -> top-level packages it must not import
FORBIDDEN = {
    "common": {"supervisor", "shard", "ops"},
    "shard": {"ops"},
    "supervisor": {"ops"},
}


def python_files() -> list[Path]:
    """Every .py file of the project outside tests/ (and outside virtualenvs and build output)."""
    files = []
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in parts[:-1]):
            continue
        files.append(path)
    return sorted(files)


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth.

    For `from X import a` the module is X; a relative X is resolved against the file's package.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = path.relative_to(root).parts[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
    return found


def test_layers_point_one_way() -> None:
    """common/ imports neither supervisor/, shard/ nor ops/; shard/ and supervisor/ never import ops/."""
    offences = []
    for path in python_files():
        layer = path.relative_to(ROOT).parts[0]
        forbidden = FORBIDDEN.get(layer)
        if not forbidden:
            continue
        for line, module in imported_modules(path):
            if module.split(".")[0] in forbidden:
                offences.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not offences, "imports against the layering:\n" + "\n".join(offences)


def test_no_module_over_400_lines() -> None:
    """Every .py file outside tests/ has at most 400 lines: split a module that grows past it."""
    too_long = []
    for path in python_files():
        with path.open(encoding="utf-8") as handle:
            lines = sum(1 for _ in handle)
        if lines > MAX_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not too_long, f"modules over {MAX_LINES} lines (split them):\n" + "\n".join(too_long)


@pytest.mark.parametrize(
    ("source", "where", "expected"),
    [
        ("import shard.geo", "common/x.py", "shard.geo"),
        ("def f():\n    from supervisor.arbiter import Halt", "common/x.py", "supervisor.arbiter"),
        ("from . import lag", "ops/cli.py", "ops"),
        ("from ..keys import A", "ops/sub/x.py", "ops.keys"),
        ("from .geo import parse", "shard/__init__.py", "shard.geo"),
    ],
)
def test_imports_are_found_at_any_depth(tmp_path: Path, source: str, where: str, expected: str) -> None:
    """The checker sees lazy imports inside functions and resolves relative imports."""
    path = tmp_path / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source + "\n", encoding="utf-8")
    assert expected in [module for _, module in imported_modules(path, tmp_path)]
