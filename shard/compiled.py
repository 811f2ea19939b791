"""Which shard modules run compiled, and the way back to their source.

setup.py compiles the per-fix path with Cython, unchanged, into extension modules beside
their .py files, which Python imports in their place. Its manifest (compiled.json) holds the
hash of each source it compiled. A module edited since (the build no longer matches its
source) is loaded from that source, so an edit is never silently ignored; with
`PROCESSOR_PURE_PYTHON=1` every module is, to rule the compiled code in or out when
something looks wrong. `install` runs from `shard/__init__.py`, before any module of the
package is imported; the shard logs `describe()` when it starts.

Never compiled itself: it decides what is.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path

PURE_ENV = "PROCESSOR_PURE_PYTHON"
_PACKAGE = Path(__file__).resolve().parent
_MANIFEST = _PACKAGE / "compiled.json"

compiled: list[str] = []  # module names running as extension modules
from_source: dict[str, str] = {}  # module name: why its extension module is not used


class _FromSource(importlib.abc.MetaPathFinder):
    """Finds the listed modules' .py files ahead of the extension modules that would shadow them."""

    def __init__(self, sources: dict[str, Path]) -> None:
        self.sources = sources

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        source = self.sources.get(fullname)
        return None if source is None else importlib.util.spec_from_file_location(fullname, source)


def install() -> None:
    """Route every shard module whose extension module must not run to its source."""
    if any(isinstance(finder, _FromSource) for finder in sys.meta_path):
        return
    pure = pure_requested()
    try:
        built: dict[str, str] = json.loads(_MANIFEST.read_text())
    except (OSError, ValueError):
        built = {}
    sources: dict[str, Path] = {}
    for extension in _extension_modules():
        name, source = _module_of(extension)
        if pure:
            reason = f"{PURE_ENV} is set"
        elif not source.is_file():
            reason = ""  # nothing to fall back on: the extension module is the module
        elif built.get(source.relative_to(_PACKAGE.parent).as_posix()) != _hash(source):
            reason = "its source changed since it was compiled (rebuild: make, or pip install)"
        else:
            reason = ""
        if reason:
            sources[name] = source
            from_source[name] = reason
        else:
            compiled.append(name)
    if sources:
        sys.meta_path.insert(0, _FromSource(sources))


def pure_requested() -> bool:
    return os.environ.get(PURE_ENV, "").strip() not in ("", "0")


def describe() -> dict[str, object]:
    """For the shard's start-up log line: what runs compiled and what from source, and why."""
    if pure_requested():
        return {"compiled_modules": 0, "from_source": f"all: {PURE_ENV} is set"}
    return {"compiled_modules": len(compiled), "from_source": dict(from_source)}


def _extension_modules() -> list[Path]:
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(path for path in _PACKAGE.rglob("*") if path.name.endswith(suffixes))


def _module_of(extension: Path) -> tuple[str, Path]:
    relative = extension.relative_to(_PACKAGE.parent)
    stem = extension.name.split(".", 1)[0]
    parts = [*relative.parent.parts, stem]
    return ".".join(parts), extension.with_name(stem + ".py")


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
