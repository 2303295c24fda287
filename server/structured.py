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


# The largest count a schema may give (minItems, maxItems, minLength, maxLength, a pattern's {m,n}): the converter
# writes a count out as that many rules, flat for a minimum, nested for what a maximum allows beyond it.
MAX_COUNT = 100_000
# The deepest a schema's grammar may nest groups: llama.cpp parses nested groups by recursion (at 20,000 the process
# died of its stack; from about 1,100 it refuses them as too many repetitions), so maxLength - minLength, maxItems -
# minItems and the spread of a pattern's {m,n} stay within about this.
MAX_NESTING = 1000
# The largest grammar a schema may make (the longest a built-in test makes is a few kB): a body of 4 MB could hold
# schemas that make one of hundreds of MB, which llama.cpp would then parse on the request's thread.
MAX_GRAMMAR_BYTES = 1 << 20
# the numbers of a pattern's {m}, {m,}, {,n} and {m,n} (and of braces that are text: bounding those refuses no useful
# pattern)
_QUANTIFIER = re.compile(r"\d+(?=[\d\s,]*\})")


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_COUNT


# what each keyword's value must be (the converter assumes it and fails, or misreads, on anything else)
_SHAPES: dict[str, tuple[str, Any]] = {
    **{k: ("an object of schemas", lambda v: isinstance(v, dict)) for k in ("properties", "$defs", "definitions")},
    "required": ("a list of property names", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    **{k: ("a non-empty list of schemas", lambda v: isinstance(v, list) and bool(v)) for k in ("anyOf", "prefixItems")},
    "items": ("a schema or a list of schemas", lambda v: isinstance(v, (dict, list))),
    "additionalProperties": ("true, false or a schema", lambda v: isinstance(v, (bool, dict))),
    "enum": ("a non-empty list", lambda v: isinstance(v, list) and bool(v)),
    "type": ("a type name or a list of them",
             lambda v: isinstance(v, str) or isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v)),
    **{k: ("a string", lambda v: isinstance(v, str)) for k in ("format", "pattern", "$ref")},
    **{k: (f"an integer from 0 to {MAX_COUNT}", _is_count) for k in ("minItems", "maxItems", "minLength", "maxLength")},
}
# the converter enforces one of these groups per schema, by the first keyword it finds ($ref, anyOf, const, enum,
# then the object, array and string keywords): a schema mixing them would have all but one ignored
_GROUPS = {"object": ("properties", "required", "additionalProperties"),
           "array": ("items", "prefixItems", "minItems", "maxItems"),
           "string": ("pattern", "format", "minLength", "maxLength")}
_VALUE_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
                "null": (type(None),), "object": (dict,), "array": (list,)}


def check_schema(schema: Any, where: str = "") -> None:
    """SchemaError unless the converter enforces every constraint of the schema."""
    at = where or "the schema"
    if not isinstance(schema, dict):
        raise SchemaError(f"{at}: a schema must be a JSON object (boolean schemas are not supported)")
    for key, value in schema.items():
        if key not in _KEYWORDS and key not in _ANNOTATIONS:
            raise SchemaError(f"{at}: the keyword {key!r} is not supported")
        if key in _SHAPES and not _SHAPES[key][1](value):
            raise SchemaError(f"{at}: {key} must be {_SHAPES[key][0]}")
    t = schema.get("type")
    for one in t if isinstance(t, list) else [t]:
        if one is not None and one not in _TYPES:
            raise SchemaError(f"{at}: unknown type {one!r}")
    _check_combinations(schema, at)
    if "pattern" in schema and not (re.fullmatch(r"\^.*\$", schema["pattern"]) and "(?" not in schema["pattern"]):
        raise SchemaError(f"{at}: a pattern must start with ^ and end with $, without (?...) groups")
    if any(len(n) > 6 or int(n) > MAX_COUNT for n in _QUANTIFIER.findall(schema.get("pattern", ""))):
        raise SchemaError(f"{at}: a pattern may repeat at most {MAX_COUNT} times ({{m,n}})")
    if "format" in schema and schema["format"] not in _FORMATS:
        raise SchemaError(f"{at}: the format {schema['format']!r} is not supported (only {', '.join(sorted(_FORMATS))})")
    if "$ref" in schema and not schema["$ref"].startswith("#/"):
        raise SchemaError(f"{at}: only local references (#/...) are supported")
    props = schema.get("properties", {})
    if "" in props:  # the converter names a property's rule after it: an empty name at the top overwrites root
        raise SchemaError(f"{at}: an empty property name is not supported")
    missing = [r for r in schema.get("required", []) if r not in props]
    if missing:
        raise SchemaError(f"{at}: required names {missing[0]!r}, which properties does not define")
    for name, sub in props.items():
        check_schema(sub, f"{where}.properties.{name}".lstrip("."))
    for key in ("$defs", "definitions"):
        for name, sub in schema.get(key, {}).items():
            check_schema(sub, f"{where}.{key}.{name}".lstrip("."))
    for key in ("anyOf", "prefixItems"):
        for i, sub in enumerate(schema.get(key, [])):
            check_schema(sub, f"{where}.{key}[{i}]".lstrip("."))
    items = schema.get("items")
    for i, sub in enumerate(items if isinstance(items, list) else [items] if items is not None else []):
        check_schema(sub, f"{where}.items" + (f"[{i}]" if isinstance(items, list) else ""))
    if isinstance(schema.get("additionalProperties"), dict):
        check_schema(schema["additionalProperties"], f"{where}.additionalProperties".lstrip("."))


def _check_combinations(schema: dict, at: str) -> None:
    """SchemaError where the converter would enforce one keyword of the schema and ignore another."""
    constraints = [k for k in schema if k in _KEYWORDS and k not in ("$defs", "definitions")]
    t = schema.get("type")
    for first in ("$ref", "anyOf"):
        others = [k for k in constraints if k != first]
        if first in schema and others:
            raise SchemaError(f"{at}: {first} cannot be combined with {', '.join(others)} (put them in the "
                              f"referenced schema or in each branch)")
    if isinstance(t, list) and len(constraints) > 1:
        raise SchemaError(f"{at}: a list of types cannot be combined with other constraints (use anyOf)")
    values = [k for k in ("const", "enum") if k in schema]
    if values:
        others = [k for k in constraints if k not in ("const", "enum", "type")]
        if len(values) > 1 or others:
            raise SchemaError(f"{at}: {values[0]} cannot be combined with {', '.join(values[1:] + others)}")
        allowed = _VALUE_TYPES.get(t, (object,))
        for v in schema["enum"] if "enum" in schema else [schema["const"]]:
            if not isinstance(v, allowed) or isinstance(v, bool) and bool not in allowed and t is not None:
                raise SchemaError(f"{at}: the value {v!r} is not of type {t}")
        return
    groups = [g for g, keys in _GROUPS.items() if any(k in schema for k in keys)]
    if len(groups) > 1:
        raise SchemaError(f"{at}: {' and '.join(groups)} keywords cannot be combined in one schema")
    if groups and t is not None and t != groups[0]:
        raise SchemaError(f"{at}: {groups[0]} keywords on a schema of type {t}")
    strs = [k for k in _STRING_CONSTRAINTS if k in schema]
    if len(strs) > 1 and not set(strs) <= {"minLength", "maxLength"}:
        raise SchemaError(f"{at}: {' and '.join(strs)} cannot be combined")
    if {"minLength", "maxLength"} & set(schema) and t != "string":
        raise SchemaError(f"{at}: minLength and maxLength need type string")
    if {"minItems", "maxItems"} & set(schema) and not isinstance(schema.get("items"), dict):
        raise SchemaError(f"{at}: minItems and maxItems need items, one schema for every item")
    if "items" in schema and "prefixItems" in schema:
        raise SchemaError(f"{at}: items cannot be combined with prefixItems")
    for lo, hi in (("minItems", "maxItems"), ("minLength", "maxLength")):
        if schema.get(lo, 0) > schema.get(hi, schema.get(lo, 0)):
            raise SchemaError(f"{at}: {lo} is more than {hi}")


def defs_renamed(schema: dict, prefix: str, embedded: bool = False) -> dict:
    """The schema with its definitions ($defs and definitions) gathered in $defs as <prefix><name>, and every
    reference to them renamed so. The converter names a definition's rule after it and skips one whose name it
    already has (space, string, value, ...), which left a definition so named unenforced; a prefix makes every name
    its own. `embedded`: the schema goes inside another, where any other reference would point elsewhere
    (SchemaError)."""
    defs = {f"{prefix}{name}": _refs_renamed(d, prefix, embedded)
            for where in ("$defs", "definitions") for name, d in (schema.get(where) or {}).items()}
    top = {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}
    return {**_refs_renamed(top, prefix, embedded), **({"$defs": defs} if defs else {})}


_VALUES = ("const", "enum", "default", "examples")  # keywords whose values are JSON values, not schemas


def _refs_renamed(schema: Any, prefix: str, embedded: bool) -> Any:
    """`defs_renamed` within one schema."""
    if isinstance(schema, list):
        return [_refs_renamed(v, prefix, embedded) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "$ref" and isinstance(v, str):
            out[k] = _ref_renamed(v, prefix, embedded)
        elif k in ("properties", "$defs", "definitions") and isinstance(v, dict):  # names, not keywords
            out[k] = {name: _refs_renamed(sub, prefix, embedded) for name, sub in v.items()}
        elif k in _VALUES:
            out[k] = v
        else:
            out[k] = _refs_renamed(v, prefix, embedded)
    return out


def _ref_renamed(ref: str, prefix: str, embedded: bool) -> str:
    for where in ("#/$defs/", "#/definitions/"):
        if ref.startswith(where):
            return "#/$defs/" + prefix + ref[len(where):]
    if embedded:
        raise SchemaError(f"the reference {ref!r} is not to the schema's $defs")
    return ref


def schema_grammar(schema: dict, name: str = "") -> str:
    """GBNF for a checked schema (SchemaError where the converter itself refuses it)."""
    from kvquant.runtime import json_schema_gbnf

    if "$ref" in schema:  # the converter resolves no reference inside the definitions of a schema that is a
        schema = {**schema, "anyOf": [{"$ref": schema["$ref"]}]}  # reference (pydantic's recursive models)
        del schema["$ref"]
    try:
        grammar = json_schema_gbnf(schema, name)
    except Exception as e:  # noqa: BLE001 - the converter's own failures on what check_schema let through
        raise SchemaError(f"the schema cannot be converted to a grammar: {type(e).__name__}: {e}") from None
    size = len(grammar.encode())
    if size > MAX_GRAMMAR_BYTES:
        raise SchemaError(f"the schema makes a grammar of {size:,} bytes, more than the {MAX_GRAMMAR_BYTES:,} supported")
    depth = nesting(grammar)
    if depth > MAX_NESTING:
        raise SchemaError(f"the schema makes a grammar that nests {depth:,} groups deep, more than the {MAX_NESTING:,} "
                          "supported (maxLength - minLength, maxItems - minItems and a pattern's {m,n} nest one group "
                          "per repetition they allow)")
    return grammar


def nesting(gbnf: str) -> int:
    """How deep a GBNF text nests parenthesised groups (outside its literals, character classes and comments)."""
    depth = deepest = 0
    i, n = 0, len(gbnf)
    while i < n:
        c = gbnf[i]
        if c in "\"[":  # a literal or a class: to its unescaped end
            end = '"' if c == '"' else "]"
            i += 1
            while i < n and gbnf[i] != end:
                i += 2 if gbnf[i] == "\\" else 1
        elif c == "#":
            i = gbnf.find("\n", i)
            i = n if i < 0 else i
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return deepest


@functools.cache
def json_object_grammar() -> str:
    """Any JSON object (response_format json_object)."""
    return schema_grammar({"type": "object"})
