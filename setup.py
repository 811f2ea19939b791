"""Compiles the shard's per-fix path with Cython, where Cython and a C compiler are at hand.

The modules below stay plain Python and remain the only source: Cython compiles them
unchanged into extension modules that sit beside their .py files and are imported in their
place. In the drain benchmark that cut the shards' CPU per fix by about a quarter (issue 12).
Without Cython or a compiler the install still succeeds and runs the same source, slower.

Each build writes a manifest, shard/compiled.json, with the hash of every source it compiled,
so that a module edited since its build is loaded from its source again (shard/compiled.py).
Everything else is in pyproject.toml.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
# The code every fix passes through: decode, stage, derive, store, acknowledge.
COMPILED = [
    "shard/batch.py",
    "shard/decode.py",
    "shard/geo.py",
    "shard/pipeline.py",
    "shard/sources.py",
    "shard/staging_rows.py",
    "shard/stream.py",
    "shard/writer.py",
    "shard/devices/cache.py",
    "shard/devices/live.py",
    "shard/devices/states.py",
    "shard/devices/store.py",
    "shard/devices/track.py",
]
MANIFEST = "shard/compiled.json"
SKIP = "PROCESSOR_NO_COMPILE"  # set (to anything) to install pure Python


def source_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extensions() -> list:
    if os.environ.get(SKIP):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("processor: Cython is not installed; the shard runs as pure Python", file=sys.stderr)
        return []
    try:
        modules = cythonize(COMPILED, compiler_directives={"language_level": 3}, quiet=True)
    except Exception as exc:  # noqa: BLE001 - the source still runs
        print(f"processor: Cython could not translate the shard ({exc}); it runs as pure Python", file=sys.stderr)
        return []
    for module in modules:
        module.extra_compile_args = ["-w"]  # the generated C's warnings say nothing about ours
    return modules


class BuildOptional(build_ext):
    """Builds the extensions, or none: a failed compile leaves a pure-Python install that works."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler or toolchain fault; the source still runs
            print(f"processor: compiling the shard failed ({exc}); it runs as pure Python", file=sys.stderr)
            return
        manifest = {path: source_hash(HERE / path) for path in COMPILED}
        target = HERE / MANIFEST if self.inplace else Path(self.build_lib) / MANIFEST
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildOptional})
