"""Validating manifest.json against manifest.schema.json, the one description of the bundle format.

Every manifest is checked here before any other code reads a field of it. A violation becomes one
line that names the field (`models[1].engines.ort.file`) and what is wrong with it.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from tstitch_trt.errors import BundleError

FORMAT = "tstitch-bundle"
FORMAT_VERSION = 1
SCHEMA_FILE = "manifest.schema.json"


@cache
def schema() -> dict[str, Any]:
    return json.loads(resources.files("tstitch_trt.bundle").joinpath(SCHEMA_FILE).read_text())


@cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema())


def check_header(raw: Any, where: str) -> None:
    """format / format_version first, so a newer or foreign file gets the message that fits it."""
    if not isinstance(raw, dict):
        raise BundleError(f"{where} holds a JSON {type(raw).__name__}, not a manifest object; rebuild the bundle")
    if raw.get("format") != FORMAT:
        raise BundleError(f"{where} is not a tstitch bundle manifest (format is {_short(raw.get('format'))}, "
                          f"expected {FORMAT!r}); rebuild the bundle")
    version = raw.get("format_version")
    if type(version) is not int:
        raise BundleError(f"{where}: format_version must be an integer, got {_short(version)}; rebuild the bundle")
    if version > FORMAT_VERSION:
        raise BundleError(f"{where} has bundle format version {version}, newer than this tstitch-trt reads "
                          f"({FORMAT_VERSION}); upgrade tstitch-trt or rebuild the bundle with this version")
    if version < 1:
        raise BundleError(f"{where}: format_version {version} does not exist; rebuild the bundle")


def validate_schema(raw: Any, where: str) -> None:
    """Raise BundleError naming the first field that breaks the schema."""
    check_header(raw, where)
    from jsonschema.exceptions import best_match

    error = best_match(_validator().iter_errors(raw))
    if error is not None:
        raise BundleError(f"{where}: {describe(error)}; rebuild the bundle with `tstitch-trt build`")


def field_path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "the manifest"


def describe(error: Any) -> str:
    """One readable clause for a jsonschema ValidationError (never a dump of the whole instance)."""
    where = field_path(error.absolute_path)
    v, inst, expected = error.validator, error.instance, error.validator_value
    if v == "required":
        missing = [k for k in expected if isinstance(inst, dict) and k not in inst]
        return f"{where} lacks the required field {missing[0] if missing else expected!r}"
    if v == "additionalProperties":
        extra = sorted(k for k in inst if k not in error.schema.get("properties", {})) if isinstance(inst, dict) else []
        name = field_path([*error.absolute_path, extra[0]]) if extra else where
        return f"{name} is a field this tstitch-trt does not understand (it would be ignored, so it is refused)"
    if v == "enum" and "propertyNames" in list(error.schema_path)[-2:]:
        return f"{where} has the key {_short(inst)}; this tstitch-trt knows only {', '.join(map(repr, expected))}"
    if v == "type":
        return f"{where} must be of type {expected}, got {_json_type(inst)} {_short(inst)}"
    if v == "enum":
        return f"{where} is {_short(inst)}; this tstitch-trt knows only {', '.join(map(repr, expected))}"
    if v == "const":
        return f"{where} is {_short(inst)}, expected {expected!r}"
    if v == "pattern" and error.schema.get("description", "").startswith("A path inside the bundle"):
        return f"{where} is {_short(inst)}, not a relative path inside the bundle (no '..', no absolute path)"
    if v == "pattern":
        return f"{where} is {_short(inst)}, which is not of the expected form"
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[v]
        return f"{where} is {_short(inst)}, must be {op} {expected}"
    if v in ("minItems", "maxItems", "minLength", "maxLength", "minProperties"):
        return f"{where} has the wrong size ({v} {expected})"
    if v == "oneOf" and error.context:
        from jsonschema.exceptions import best_match

        inner = best_match(error.context)
        return describe(inner) if inner is not None else f"{where} is not valid"
    return f"{where}: {error.message[:200]}"


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
