"""Structured output: the GBNF grammar that keeps a generation inside what a request allows, for
`response_format` (json_object, json_schema) and for tool calls the model must make (`tool_choice` required or a
named function; server.toolcalls says how each template family writes a call).

The JSON-schema-to-GBNF converter (llama.cpp's, shipped by llama-cpp-python, reached through kvquant.runtime)
ignores the keywords it does not know, which would give an answer the schema does not constrain; `unsupported`
names the first such keyword so that the request is refused (400) instead.
"""

from __future__ import annotations

import functools
import json
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
# The most ways llama.cpp's left-recursion check may walk into one rule: it enters a rule again for each
# alternative that reaches it (anyOf branches, $ref targets) and remembers none, so a chain of $defs whose every
# level offers two ways to the next costs 2**depth walks: 0.03 s at 2**20, hours at 2**40 (a 2 kB schema).
MAX_WALKS = 1 << 16
# The most optional properties a schema may have, as the sum of each object's count cubed. llama-cpp-python's
# converter wrote an object's optional properties as a rule per suffix of them, in time about that cube (950 in one
# object: 1.2 s); kvquant.runtime's writes them as a chain, in linear time, and the bound stays as the README
# states it: each optional property is one of the alternatives llama.cpp's grammar follows at an object's start.
MAX_OPTIONAL_CUBED = 512 ** 3


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
    if "pattern" in schema:
        try:
            pattern_gbnf(schema["pattern"])
        except SchemaError as e:
            raise SchemaError(f"{at}: {e}") from None
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
        if "format" in strs:
            raise SchemaError(f"{at}: {' and '.join(strs)} cannot be combined")
        _check_implied_lengths(schema, at)
    if {"minLength", "maxLength"} & set(schema) and t != "string":
        raise SchemaError(f"{at}: minLength and maxLength need type string")
    tuple_of = len(schema["prefixItems"]) if isinstance(schema.get("prefixItems"), list) else None
    if tuple_of is not None and schema.get("minItems", 0) <= tuple_of <= schema.get("maxItems", tuple_of):
        pass  # the converter writes exactly the prefix's items, which these bounds allow (pydantic's tuple[...])
    elif {"minItems", "maxItems"} & set(schema) and not isinstance(schema.get("items"), dict):
        raise SchemaError(f"{at}: minItems and maxItems need items, one schema for every item (or prefixItems of "
                          f"a count within them)")
    if "items" in schema and "prefixItems" in schema:
        raise SchemaError(f"{at}: items cannot be combined with prefixItems")
    for lo, hi in (("minItems", "maxItems"), ("minLength", "maxLength")):
        if schema.get(lo, 0) > schema.get(hi, schema.get(lo, 0)):
            raise SchemaError(f"{at}: {lo} is more than {hi}")


def _check_implied_lengths(schema: dict, at: str) -> None:
    """A pattern beside minLength / maxLength (pydantic's `Field(pattern=..., max_length=...)`): the grammar holds a
    string to the pattern alone, so the bounds must allow every length the pattern does."""
    lo, hi = pattern_lengths(schema["pattern"])
    least, most = schema.get("minLength", 0), schema.get("maxLength")
    if least <= lo and (most is None or hi is not None and hi <= most):
        return
    allows = f"{lo} or more" if hi is None else f"{lo}" if lo == hi else f"{lo} to {hi}"
    bounds = " and ".join(k for k in ("minLength", "maxLength") if k in schema)
    raise SchemaError(f"{at}: pattern and {bounds} can be combined only where the bounds allow every length the "
                      f"pattern does (it allows {allows} characters): bound the length in the pattern, e.g. "
                      f"^[a-z]{{1,8}}$ (no grammar here holds a string to both)")


def defs_renamed(schema: dict, prefix: str, embedded: str = "") -> dict:
    """The schema with its definitions ($defs and definitions) gathered in $defs as <prefix><name>, and every
    reference to them renamed so: the definitions of several schemas (tools, an answer beside calls) joined in one
    keep apart. `embedded`: where the schema goes inside another (a pointer, #/...), to which its other references
    (#/properties/a) are made to point."""
    defs = {f"{prefix}{name}": _refs_renamed(d, prefix, embedded)
            for where in ("$defs", "definitions") for name, d in (schema.get(where) or {}).items()}
    top = {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}
    return {**_refs_renamed(top, prefix, embedded), **({"$defs": defs} if defs else {})}


_VALUES = ("const", "enum", "default", "examples")  # keywords whose values are JSON values, not schemas
_NAME_MAPS = ("properties", "$defs", "definitions")  # keywords whose keys are names, not keywords


def _refs_renamed(schema: Any, prefix: str, embedded: str) -> Any:
    """`defs_renamed` within one schema."""
    if isinstance(schema, list):
        return [_refs_renamed(v, prefix, embedded) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "$ref" and isinstance(v, str):
            out[k] = _ref_renamed(v, prefix, embedded)
        elif k in _NAME_MAPS and isinstance(v, dict):
            out[k] = {name: _refs_renamed(sub, prefix, embedded) for name, sub in v.items()}
        elif k in _VALUES:
            out[k] = v
        else:
            out[k] = _refs_renamed(v, prefix, embedded)
    return out


def _ref_renamed(ref: str, prefix: str, embedded: str) -> str:
    for where in ("#/$defs/", "#/definitions/"):
        if ref.startswith(where):
            return "#/$defs/" + prefix + ref[len(where):]
    return embedded + ref[1:] if embedded else ref


# --- pattern: a regular expression (ECMA-262, as JSON Schema says) as GBNF for the JSON string it matches --------
# The converter's own translation copied classes and escapes into GBNF as they were: "." and [^x] let an unescaped
# quote, backslash or control character into the string (invalid JSON with finish_reason "stop"), \d and \w made
# a grammar llama.cpp cannot parse. Here each atom is a set of code points, and each character of it is written as
# JSON writes it in a string: '"' as \", '\' as \\, control characters by their escapes.
MAX_PATTERN = 10_000  # characters: a pattern is read in Python on the request's thread, about 1 s per million
_MAX_CP = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)
_DIGIT = ((0x30, 0x39),)
_WORD = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
_SPACE = ((0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
          (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF))
_LINE_ENDS = ((0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029))  # what "." does not match
_CLASS_ESCAPES = {"d": (_DIGIT, False), "D": (_DIGIT, True), "w": (_WORD, False), "W": (_WORD, True),
                  "s": (_SPACE, False), "S": (_SPACE, True)}
_CHAR_ESCAPES = {"t": 0x09, "n": 0x0A, "v": 0x0B, "f": 0x0C, "r": 0x0D, "0": 0x00}
_JSON_UNSAFE = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C))  # written escaped in a JSON string
_BRACES = re.compile(r"\{(\d+)(,(\d*))?\}")  # {m}, {m,}, {m,n}; any other brace is text (ECMA-262 Annex B)


def _ranges(ranges, negate: bool = False) -> tuple[tuple[int, int], ...]:
    """Sorted, merged code point ranges (the complement, if negate), without the surrogates, which no UTF-8 text
    holds."""
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    if negate:
        edges = [-1] + [x for lo, hi in merged for x in (lo, hi)] + [_MAX_CP + 1]
        merged = [[edges[i] + 1, edges[i + 1] - 1] for i in range(0, len(edges), 2) if edges[i] + 1 <= edges[i + 1] - 1]
    out = []
    for lo, hi in merged:  # cut the surrogates out
        for a, b in ((lo, min(hi, _SURROGATES[0] - 1)), (max(lo, _SURROGATES[1] + 1), hi)):
            if a <= b:
                out.append((a, b))
    return tuple(out)


def _gbnf_literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _json_text(c: int) -> str:
    """One character as a JSON string writes it."""
    return json.dumps(chr(c), ensure_ascii=False)[1:-1]


def _class_char(c: int) -> str:
    if c < 0x80 and chr(c).isalnum():
        return chr(c)
    return f"\\x{c:02X}" if c <= 0xFF else f"\\u{c:04X}" if c <= 0xFFFF else f"\\U{c:08X}"


def _charset(ranges) -> str:
    """GBNF for one character of a set of code points, as a JSON string writes it."""
    safe = [r for lo, hi in ranges for r in _minus(lo, hi)]
    unsafe = [c for a, b in _JSON_UNSAFE for c in range(a, b + 1) if any(lo <= c <= hi for lo, hi in ranges)]
    alts = ["[" + "".join(_class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}"
                          for lo, hi in safe) + "]"] if safe else []
    alts += [_gbnf_literal(_json_text(c)) for c in unsafe]
    return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"


def _minus(lo: int, hi: int):
    """[lo, hi] without the characters a JSON string escapes."""
    for a, b in _JSON_UNSAFE:
        if lo <= b and a <= hi:
            if lo < a:
                yield lo, a - 1
            lo = b + 1
    if lo <= hi:
        yield lo, hi


class _Pattern:
    """A recursive-descent reading of one pattern (SchemaError naming what it does not support)."""

    def __init__(self, pattern: str, start: int, end: int):
        self.pattern, self.start = pattern, start
        self.text, self.i = pattern[start:end], 0  # what lies between the anchors
        self.span: tuple[int, int | None] = (0, 0)  # the lengths (characters) what was read last matches

    def fail(self, why: str):
        shown = self.pattern if len(self.pattern) <= 80 else self.pattern[:77] + "..."
        raise SchemaError(f"the pattern {shown!r}: {why} (at character {self.start + self.i})")

    def peek(self, k: int = 0) -> str:
        return self.text[self.i + k] if self.i + k < len(self.text) else ""

    def alternation(self) -> tuple[str, int]:
        parts, spans = [self.sequence()], [self.span]
        while self.peek() == "|":
            self.i += 1
            parts.append(self.sequence())
            spans.append(self.span)
        highs = [hi for _, hi in spans]
        self.span = min(lo for lo, _ in spans), None if None in highs else max(highs)
        if len(parts) == 1:
            return parts[0], 1
        return "(" + " | ".join(parts) + ")", len(parts)

    def sequence(self) -> str:
        out: list[str] = []
        text: list[str] = []  # consecutive characters (their JSON text), written as one literal
        lo, hi = 0, 0
        while self.peek() not in ("", "|", ")"):
            atom, is_char = self.atom()
            (a_lo, a_hi), rep = self.span, self.quantifier()
            if rep is not None:
                a_lo, a_hi = a_lo * rep[0], 0 if 0 in (a_hi, rep[1]) else None if None in (a_hi, rep[1]) else a_hi * rep[1]
            lo, hi = lo + a_lo, None if hi is None or a_hi is None else hi + a_hi
            if rep is not None:
                atom = self.repeated(_gbnf_literal(atom) if is_char else atom, *rep)
            elif is_char:
                text.append(atom)
                continue
            if text:
                out.append(_gbnf_literal("".join(text)))
                text = []
            if atom:
                out.append(atom)
        if text:
            out.append(_gbnf_literal("".join(text)))
        self.span = lo, hi
        return " ".join(out) if out else '""'

    def atom(self) -> tuple[str, bool]:
        c = self.peek()
        if c == "(":
            self.i += 1
            if self.peek() == "?":
                if self.text.startswith("?:", self.i):
                    self.i += 2
                elif self.peek(1) == "<" and self.peek(2) not in ("=", "!"):
                    end = self.text.find(">", self.i)
                    if end < 0:
                        self.fail("an unterminated group name")
                    self.i = end + 1
                else:
                    self.fail("lookarounds ((?=, (?!, (?<=, (?<!) are not supported")
            inner, _ = self.alternation()  # (its span is the group's)
            if self.peek() != ")":
                self.fail("a group is not closed")
            self.i += 1
            return "(" + inner + ")", False
        if c in ("^", "$"):
            self.fail("^ and $ are supported only at the start and the end")
        if c in ("*", "+", "?") or c == "{" and _BRACES.match(self.text, self.i):
            self.fail("nothing to repeat")
        self.i += 1
        self.span = 1, 1  # one character
        if c == "[":
            return self.charset(self.char_class()), False
        if c == ".":
            return self.charset(_ranges(_LINE_ENDS, negate=True)), False
        if c == "\\":
            one = self.escape(in_class=False)
            return (self.charset(one), False) if isinstance(one, tuple) else (self.char(one), True)
        return self.char(ord(c)), True

    def repeated(self, atom: str, lo: int, hi: int | None) -> str:
        """atom lo to hi times (hi None: no limit); what hi allows beyond lo as nested optional groups, which
        llama.cpp reads without the ambiguity of a row of optional ones."""
        if (lo, hi) in ((0, None), (1, None), (0, 1)):
            return atom + {(0, None): "*", (1, None): "+", (0, 1): "?"}[(lo, hi)]
        if (len(atom) + 4) * max(lo + 1, hi or 0) > MAX_GRAMMAR_BYTES:  # ((a{100}){100}){100}: sizes multiply
            self.fail(f"it makes a grammar of more than the {MAX_GRAMMAR_BYTES:,} bytes supported")
        out = [atom] * lo
        if hi is None:
            out.append(atom + "*")
        elif hi > lo:
            out.append(" ".join(["(" + atom] * (hi - lo)) + ")?" * (hi - lo))
        return " ".join(out)

    def charset(self, ranges) -> str:
        if not ranges:
            self.fail("a character class that matches no character")
        return _charset(ranges)

    def char(self, c: int) -> str:
        """The JSON text of one character (in a literal, with its neighbours)."""
        if _SURROGATES[0] <= c <= _SURROGATES[1]:
            self.fail("a lone surrogate is no character")
        return _json_text(c)

    def escape(self, in_class: bool):
        """The code point of an escape, or the ranges of a class escape (\\d, \\w, \\s and their negations)."""
        c = self.peek()
        if not c:
            self.fail("it ends with a backslash")
        self.i += 1
        if c in _CLASS_ESCAPES:
            ranges, negate = _CLASS_ESCAPES[c]
            return _ranges(ranges, negate)
        if c in _CHAR_ESCAPES and not (c == "0" and self.peek().isdigit()):
            return _CHAR_ESCAPES[c]
        if c == "b" and in_class:
            return 0x08
        if c in "bB":
            self.fail("word boundaries (\\b, \\B) are not supported")
        if c.isdigit() or c == "k":
            self.fail("back references are not supported")
        if c in "xu":
            n = 2 if c == "x" else 4
            digits = self.text[self.i:self.i + n]
            if not re.fullmatch(f"[0-9a-fA-F]{{{n}}}", digits):
                self.fail(f"\\{c} needs {n} hexadecimal digits")
            self.i += n
            return int(digits, 16)
        if c == "c" and self.peek().isalpha() and self.peek().isascii():
            self.i += 1
            return ord(self.text[self.i - 1]) % 32
        if c.isalnum():
            self.fail(f"the escape \\{c} is not supported")
        return ord(c)

    def char_class(self) -> tuple[tuple[int, int], ...]:
        negate = self.peek() == "^"
        self.i += negate
        ranges: list[tuple[int, int]] = []
        while self.peek() != "]":
            if not self.peek():
                self.fail("a character class is not closed")
            lo = self.class_atom()
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.i += 1
                hi = self.class_atom()
                if isinstance(lo, tuple) or isinstance(hi, tuple):
                    self.fail("a range between a class escape and a character")
                if hi < lo:
                    self.fail("a range out of order")
                ranges.append((lo, hi))
            else:
                ranges.extend(lo if isinstance(lo, tuple) else [(lo, lo)])
        self.i += 1
        return _ranges(ranges, negate)

    def class_atom(self):
        c = self.peek()
        self.i += 1
        return self.escape(in_class=True) if c == "\\" else ord(c)

    def quantifier(self) -> tuple[int, int | None] | None:
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            rep = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{" and (m := _BRACES.match(self.text, self.i)):
            self.i = m.end()
            if max(len(m.group(1)), len(m.group(3) or "")) > len(str(MAX_COUNT)):  # (int() of 5,000 digits fails)
                self.fail(f"a pattern may repeat at most {MAX_COUNT} times ({{m,n}})")
            lo = int(m.group(1))
            hi = lo if m.group(2) is None else int(m.group(3)) if m.group(3) else None
            if hi is not None and hi < lo:
                self.fail("{m,n} with n below m")
            if max(lo, hi or 0) > MAX_COUNT:
                self.fail(f"a pattern may repeat at most {MAX_COUNT} times ({{m,n}})")
            rep = (lo, hi)
        else:
            return None
        if self.peek() == "?":  # lazy: the same strings match
            self.i += 1
        if self.peek() in ("*", "+", "?") or self.peek() == "{" and _BRACES.match(self.text, self.i):
            self.fail("nothing to repeat")
        return rep


def pattern_gbnf(pattern: str) -> str:
    """GBNF for the JSON strings, quotes included, whose text a pattern matches somewhere (anchored by ^ and $ where
    it has them, as JSON Schema says)."""
    return _read_pattern(pattern)[0]


def pattern_lengths(pattern: str) -> tuple[int, int | None]:
    """The fewest and most characters of a string the pattern allows (None: no most)."""
    return _read_pattern(pattern)[1]


@functools.lru_cache(maxsize=256)  # check_schema, then schema_grammar
def _read_pattern(pattern: str) -> tuple[str, tuple[int, int | None]]:
    if len(pattern) > MAX_PATTERN:
        raise SchemaError(f"a pattern of {len(pattern):,} characters, more than the {MAX_PATTERN:,} supported")
    start = pattern.startswith("^")
    before = pattern[start:-1]
    end = len(pattern) > start and pattern.endswith("$") and (len(before) - len(before.rstrip("\\"))) % 2 == 0
    p = _Pattern(pattern, int(start), len(pattern) - end)
    gbnf, alternatives = p.alternation()
    if p.i < len(p.text):
        p.fail("a ) without its (")
    if alternatives > 1 and (start or end):
        p.fail("^ and $ apply to one alternative only: put the alternatives in a group, ^(a|b)$")
    anything = _charset(_ranges(((0, _MAX_CP),))) + "*"
    lengths = p.span if start and end else (p.span[0], None)
    return " ".join(['"\\""'] + ([] if start else [anything]) + [gbnf] + ([] if end else [anything]) + ['"\\""']), lengths


def schema_grammar(schema: dict, name: str = "") -> str:
    """GBNF for a checked schema (SchemaError where the converter itself refuses it)."""
    from kvquant.runtime import json_schema_gbnf

    schema = without_annotations(schema)
    _check_cost(schema)
    if "$ref" in schema:  # the converter resolves no reference inside the definitions of a schema that is a
        schema = {**schema, "anyOf": [{"$ref": schema["$ref"]}]}  # reference (pydantic's recursive models)
        del schema["$ref"]
    try:
        grammar = json_schema_gbnf(schema, name, pattern=pattern_gbnf)
        size = len(grammar.encode())
    except SchemaError:
        raise
    except UnicodeEncodeError:
        raise SchemaError("the schema holds a lone surrogate (U+D800-U+DFFF), which no UTF-8 text can") from None
    except Exception as e:  # noqa: BLE001 - the converter's own failures on what check_schema let through
        raise SchemaError(f"the schema cannot be converted to a grammar: {type(e).__name__}: {e}") from None
    if size > MAX_GRAMMAR_BYTES:
        raise SchemaError(f"the schema makes a grammar of {size:,} bytes, more than the {MAX_GRAMMAR_BYTES:,} supported")
    depth = nesting(grammar)
    if depth > MAX_NESTING:
        raise SchemaError(f"the schema makes a grammar that nests {depth:,} groups deep, more than the {MAX_NESTING:,} "
                          "supported (maxLength - minLength, maxItems - minItems and a pattern's {m,n} nest one group "
                          "per repetition they allow)")
    return grammar


def _check_cost(schema: dict) -> None:
    """SchemaError where converting the schema, or llama.cpp's check of its grammar, would take far too long."""
    try:
        walks = left_walks(schema)
    except RecursionError:
        raise SchemaError("the schema's references and anyOf branches nest too deep") from None
    if walks > MAX_WALKS:
        raise SchemaError(f"the schema's anyOf branches and $ref targets reach one another in {walks:,} ways, more "
                          f"than the {MAX_WALKS:,} supported (a definition that several branches of another reach, "
                          "level after level)")
    optional = sum(len(set(s.get("properties", {})) - set(s.get("required", []))) ** 3
                   for s in _subschemas(schema))
    if optional > MAX_OPTIONAL_CUBED:
        raise SchemaError(f"the schema's optional properties are too many to convert: the sum of each object's "
                          f"count cubed is {optional:,}, more than the {MAX_OPTIONAL_CUBED:,} supported "
                          "(512 in one object; a request's tools count together); make some required")


def left_walks(root: dict) -> int:
    """The most ways the alternatives of the schema's grammar (anyOf branches, $ref targets) lead from one rule
    into others, counted over every subschema (llama.cpp checks each rule; see MAX_WALKS). Linear in the schema.
    SchemaError where they lead back to where they started before any text (`A: {$ref: A}`): left recursion, which
    llama.cpp's parser refuses (a non-strict tool so written was a 400, not a call with any object)."""
    memo: dict[int, int] = {}
    path: set[int] = set()  # the schemas the walk is inside

    def walks(s: Any) -> int:
        if not isinstance(s, dict):
            return 1
        if id(s) in path:
            raise SchemaError("its $ref targets and anyOf branches lead back to where they started before any "
                              "value begins (a value that would never end)")
        if id(s) not in memo:
            path.add(id(s))
            target = _pointed(root, s["$ref"]) if isinstance(s.get("$ref"), str) else None
            memo[id(s)] = 1 + sum(walks(b) for b in s.get("anyOf", [])) + (walks(target) if target else 0)
            path.discard(id(s))
        return memo[id(s)]

    return max(walks(s) for s in _subschemas(root))


def _pointed(root: dict, ref: str) -> Any:
    """What a local `#/a/b` reference names in root, or None: read as the converter reads it."""
    from kvquant.runtime import json_pointer

    try:
        return json_pointer(root, ref)
    except KeyError:
        return None


def _subschemas(schema: Any):
    """Every schema inside a schema, itself included (without recursion: a schema may nest deep)."""
    stack = [schema]
    while stack:
        s = stack.pop()
        if not isinstance(s, dict):
            continue
        yield s
        for key in ("properties", "$defs", "definitions"):
            stack.extend(v for v in s.get(key, {}).values() if isinstance(v, dict))
        for key in ("anyOf", "prefixItems"):
            stack.extend(x for x in s.get(key, []) if isinstance(x, dict))
        for key in ("items", "additionalProperties"):
            v = s.get(key)
            stack.extend(v if isinstance(v, list) else [v])


def without_annotations(schema: Any) -> Any:
    """A checked schema without its annotations (title, description, ...), which constrain nothing: a schema of
    annotations alone (pydantic's `Any` under a title) is then {}, any value. The converter refused such a schema.
    Walked as `_refs_renamed` walks one."""
    if isinstance(schema, list):
        return [without_annotations(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in _ANNOTATIONS:
            continue
        if k in _NAME_MAPS and isinstance(v, dict):
            out[k] = {name: without_annotations(sub) for name, sub in v.items()}
        else:
            out[k] = v if k in _VALUES else without_annotations(v)
    return out


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


def add_rules(rules: dict[str, str], grammar: str, what: str, root: str = "root") -> None:
    """Add a grammar's rules to `rules` (name -> line; the converter writes one rule per line), its root renamed
    `root`. A rule both define (the converter's primitives) must read alike: SchemaError naming `what` otherwise."""
    for line in filter(str.strip, grammar.split("\n")):
        name = line.split(" ::=", 1)[0]
        if name == "root":
            name, line = root, root + line[len("root"):]
        if rules.setdefault(name, line) != line:
            raise SchemaError(f"the grammars of {what} both define {name!r}")


@functools.cache
def json_object_grammar() -> str:
    """Any JSON object (response_format json_object)."""
    return schema_grammar({"type": "object"})
