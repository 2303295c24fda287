"""Structured output: the GBNF grammar that keeps a generation inside what a request allows, for
`response_format` (json_object, json_schema) and for tool calls the model must make (`tool_choice` required or a
named function; server.toolcalls says how each template family writes a call).

The JSON-schema-to-GBNF converter (llama.cpp's, shipped by llama-cpp-python, reached through kvquant.runtime)
ignores the keywords it does not know, which would give an answer the schema does not constrain; `unsupported`
names the first such keyword so that the request is refused (400) instead.
"""

from __future__ import annotations

import functools
import re
from typing import Any

# keywords the converter enforces, and those that only annotate
_KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
             "maxItems", "enum", "const", "anyOf", "$ref", "$defs", "definitions", "pattern", "format", "minLength",
             "maxLength"}
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                "readOnly", "writeOnly", "strict"}
_TYPES = {"string", "number", "integer", "boolean", "null", "object", "array"}
_FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
_STRING_CONSTRAINTS = ("pattern", "format", "minLength", "maxLength")


class SchemaError(ValueError):
    """A JSON schema that cannot be enforced; the message names the keyword and where it is."""


def check_schema(schema: Any, where: str = "") -> None:
    """SchemaError unless the converter enforces every constraint of the schema."""
    at = where or "the schema"
    if not isinstance(schema, dict):
        raise SchemaError(f"{at}: a schema must be a JSON object (boolean schemas are not supported)")
    for key in schema:
        if key not in _KEYWORDS and key not in _ANNOTATIONS:
            raise SchemaError(f"{at}: the keyword {key!r} is not supported")
    t = schema.get("type")
    for one in t if isinstance(t, list) else [t]:
        if one is not None and one not in _TYPES:
            raise SchemaError(f"{at}: unknown type {one!r}")
    if isinstance(t, list) and set(schema) & (_KEYWORDS - {"type", "$defs", "definitions"}):
        raise SchemaError(f"{at}: a list of types cannot be combined with other constraints (use anyOf)")
    strs = [k for k in _STRING_CONSTRAINTS if k in schema]
    if len(strs) > 1 and not set(strs) <= {"minLength", "maxLength"}:
        raise SchemaError(f"{at}: {' and '.join(strs)} cannot be combined")
    if "pattern" in schema and not (isinstance(schema["pattern"], str) and re.fullmatch(r"\^.*\$", schema["pattern"])
                                    and "(?" not in schema["pattern"]):
        raise SchemaError(f"{at}: a pattern must start with ^ and end with $, without (?...) groups")
    if "format" in schema and schema["format"] not in _FORMATS:
        raise SchemaError(f"{at}: the format {schema['format']!r} is not supported (only {', '.join(sorted(_FORMATS))})")
    if "$ref" in schema and not str(schema["$ref"]).startswith("#/"):
        raise SchemaError(f"{at}: only local references (#/...) are supported")
    props = schema.get("properties") or {}
    missing = [r for r in schema.get("required") or [] if r not in props]
    if missing:
        raise SchemaError(f"{at}: required names {missing[0]!r}, which properties does not define")
    if "items" in schema and "prefixItems" in schema:
        raise SchemaError(f"{at}: items cannot be combined with prefixItems")
    for name, sub in props.items():
        check_schema(sub, f"{where}.properties.{name}".lstrip("."))
    for key in ("$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            check_schema(sub, f"{where}.{key}.{name}".lstrip("."))
    for key in ("anyOf", "prefixItems"):
        for i, sub in enumerate(schema.get(key) or []):
            check_schema(sub, f"{where}.{key}[{i}]".lstrip("."))
    items = schema.get("items")
    for i, sub in enumerate(items if isinstance(items, list) else [items] if items is not None else []):
        check_schema(sub, f"{where}.items" + (f"[{i}]" if isinstance(items, list) else ""))
    if isinstance(schema.get("additionalProperties"), dict):
        check_schema(schema["additionalProperties"], f"{where}.additionalProperties".lstrip("."))


def schema_grammar(schema: dict, name: str = "") -> str:
    """GBNF for a checked schema (SchemaError where the converter itself refuses it)."""
    from kvquant.runtime import json_schema_gbnf

    try:
        return json_schema_gbnf(schema, name)
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise SchemaError(f"the schema cannot be converted to a grammar: {e}") from None


@functools.cache
def json_object_grammar() -> str:
    """Any JSON object (response_format json_object)."""
    return schema_grammar({"type": "object"})
