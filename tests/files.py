"""Files the tests hand to the code under test: secrets (`*_FILE`) and GeoJSON documents."""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson


def secret_file(directory: Path, content: str, name: str | None = None) -> Path:
    """`content` verbatim in a file only its owner may read, as a mounted secret is; a new name unless given."""
    path = directory / (name or f"secret-{uuid.uuid4().hex[:6]}")
    path.write_text(content)
    path.chmod(0o600)
    return path


def feature(name: object, geometry: object, **properties: object) -> dict[str, object]:
    """A GeoJSON Feature with properties.name and any other properties (radius_m, active)."""
    return {"type": "Feature", "properties": {"name": name, **properties}, "geometry": geometry}


def collection(*features: dict[str, object]) -> dict[str, object]:
    return {"type": "FeatureCollection", "features": list(features)}


def geojson_file(path: Path, document: object) -> Path:
    """`document` written to `path` as JSON, for `processor geofences import`."""
    path.write_bytes(orjson.dumps(document))
    return path
