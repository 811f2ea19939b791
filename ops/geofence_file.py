"""A GeoJSON file of geofences, read and checked before anything is written (`processor geofences import`)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from common.contract import CONTROL_CHARACTERS
from common.errors import ProcessorError
from ops.terminal import is_terminal


class InvalidGeofences(ProcessorError):
    """The file has problems; `problems` holds one line each. Nothing was written."""

    def __init__(self, source: str, problems: list[str]) -> None:
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{source}: {count} found; nothing was written")
        self.problems = problems


@dataclass(frozen=True)
class GeofenceFeature:
    """One validated feature of an import file."""

    name: str
    geometry: dict[str, Any]
    radius_m: float | None
    active: bool


def read_document(path: Path) -> object:
    """The parsed JSON of `path` (`-`: standard input); a missing, unreadable or non-JSON file is a ProcessorError."""
    try:
        raw = _standard_input() if str(path) == "-" else path.read_bytes()
    except FileNotFoundError:
        raise ProcessorError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ProcessorError(f"{path}: is a directory, not a GeoJSON file") from None
    except OSError as exc:
        raise ProcessorError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProcessorError(f"{path}: not valid JSON: {exc}") from None


def _standard_input() -> bytes:
    stream = sys.stdin
    if stream is None or stream.closed:
        raise ProcessorError("-: standard input is closed; give the GeoJSON file's path")
    if is_terminal(stream):
        raise ProcessorError("-: standard input is a terminal; pipe the GeoJSON in, or give the file's path")
    return stream.buffer.read()


def validate_document(document: object, source: str) -> list[GeofenceFeature]:
    """Every feature checked (properties, geometry, unique names) before anything is written.

    Raises InvalidGeofences listing every problem, each naming its feature's index and name.
    """
    features = _features_of(document, source)
    problems: list[str] = []
    valid: list[GeofenceFeature] = []
    first_index: dict[str, int] = {}
    for index, feature in enumerate(features):
        parsed, feature_problems = check_feature(index, feature)
        problems.extend(f"{source}: {problem}" for problem in feature_problems)
        if parsed is None:
            continue
        if parsed.name in first_index:
            problems.append(
                f"{source}: {_label(index, parsed.name)}: the name is also used by feature "
                f"{first_index[parsed.name]}; names must be unique"
            )
            continue
        first_index[parsed.name] = index
        valid.append(parsed)
    if problems:
        raise InvalidGeofences(source, problems)
    return valid


def _features_of(document: object, source: str) -> list[object]:
    if not isinstance(document, dict):
        kind = _json_kind(document)
        raise ProcessorError(f"{source}: expected a GeoJSON FeatureCollection or Feature, got a JSON {kind}")
    kind = document.get("type")
    if kind == "Feature":
        return [document]
    if kind != "FeatureCollection":
        raise ProcessorError(f"{source}: expected a GeoJSON FeatureCollection or Feature, got type {kind!r}")
    features = document.get("features")
    if not isinstance(features, list):
        raise ProcessorError(f"{source}: a FeatureCollection needs a \"features\" array")
    if not features:
        raise ProcessorError(f"{source}: the FeatureCollection has no features; nothing to import")
    return features


def check_feature(index: int, feature: object) -> tuple[GeofenceFeature | None, list[str]]:
    """The feature as a GeofenceFeature, or None and one line per problem."""
    from shard.geo import GeometryError, parse_geofence  # shapely: loaded only when a file is checked

    if not isinstance(feature, dict):
        return None, [f"feature {index}: not a GeoJSON Feature object (got a JSON {_json_kind(feature)})"]
    properties = feature.get("properties")
    if properties is None:
        properties = {}
    if not isinstance(properties, dict):
        return None, [f"feature {index}: \"properties\" must be an object"]
    name = properties.get("name")
    label = _label(index, name if isinstance(name, str) else None)
    problems: list[str] = []
    if feature.get("type") != "Feature":
        problems.append(f"{label}: \"type\" must be \"Feature\", got {feature.get('type')!r}")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{label}: properties.name is required (a non-empty string)")
    elif CONTROL_CHARACTERS.search(name):
        problems.append(f"{label}: properties.name must not contain control characters")
    radius_m = properties.get("radius_m")
    radius_ok = radius_m is None or (_is_number(radius_m) and math.isfinite(radius_m) and radius_m > 0)
    if not radius_ok:
        problems.append(f"{label}: properties.radius_m must be a positive number of metres, got {radius_m!r}")
    active = properties.get("active")
    if active is not None and not isinstance(active, bool):
        problems.append(f"{label}: properties.active must be true or false, got {active!r}")
    geometry = feature.get("geometry")
    if not isinstance(geometry, dict):
        problems.append(f"{label}: the feature has no geometry object")
    elif geometry.get("type") != "Point" and radius_m is not None:
        problems.append(f"{label}: properties.radius_m applies only to a Point geometry (a circle)")
    elif radius_ok:
        try:
            parse_geofence(index, name if isinstance(name, str) else "", geometry, radius_m)
        except GeometryError as exc:
            problems.append(f"{label}: {exc}")
    if problems:
        return None, problems
    assert isinstance(name, str) and isinstance(geometry, dict)
    radius = float(radius_m) if radius_m is not None else None
    return GeofenceFeature(name, geometry, radius, active if active is not None else True), []


def _label(index: int, name: str | None) -> str:
    return f"feature {index} {orjson.dumps(name).decode()}" if name else f"feature {index} (no name)"


def _is_number(value: object) -> bool:
    return type(value) in (int, float)


def _json_kind(value: object) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return kinds.get(type(value), "null")
