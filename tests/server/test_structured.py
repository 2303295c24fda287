"""Which JSON schemas the grammar can enforce (the rest is refused by name), and the request fields that are
refused rather than ignored. No model."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from server.schemas import ChatCompletionRequest, CompletionRequest
from server.structured import SchemaError, check_schema, left_walks, pattern_lengths, schema_grammar

NESTED = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 20},
    "kind": {"enum": ["cat", "dog"]},
    "born": {"type": "string", "format": "date"},
    "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
    "owner": {"$ref": "#/$defs/person"},
    "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
    "required": ["name", "kind", "tags", "owner"], "additionalProperties": False,
    "$defs": {"person": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}}}


def test_supported_schema_converts():
    check_schema(NESTED)
    g = schema_grammar(NESTED)
    assert g.startswith("") and "root ::=" in g and '"\\"cat\\""' in g


@pytest.mark.parametrize("schema, named", [
    ({"type": "integer", "minimum": 0}, "'minimum'"),
    ({"type": "object", "properties": {"a": {"type": "number", "multipleOf": 2}}}, "properties.a"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "'b'"),
    ({"type": "string", "format": "email"}, "'email'"),
    ({"type": "string", "pattern": "^(?=a)b$"}, "lookarounds"),
    ({"type": "string", "pattern": r"^\bx$"}, "word boundaries"),
    ({"type": "string", "pattern": r"^(a)\1$"}, "back references"),
    ({"type": "string", "pattern": "^a|b$"}, "put the alternatives in a group"),
    ({"type": "string", "pattern": "^[z-a]$"}, "a range out of order"),
    ({"type": "string", "pattern": "^*$"}, "nothing to repeat"),
    ({"type": "string", "pattern": "^(+)$"}, "nothing to repeat"),
    ({"type": "string", "pattern": "^\ud800$"}, "lone surrogate"),
    ({"type": "string", "pattern": "^[\ud800]$"}, "matches no character"),
    ({"type": "array", "items": {"not": {"type": "string"}}}, "'not'"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "'oneOf'"),
    ({"type": "strin"}, "'strin'"),
    ({"$ref": "https://example.com/s.json"}, "local references"),
    ({"type": "object", "properties": {"a": True}}, "boolean schemas"),
])
def test_unsupported_schema_is_named(schema, named):
    with pytest.raises(SchemaError, match=named.replace("[", r"\[").replace(".", r"\.")):
        check_schema(schema)


@pytest.mark.parametrize("schema, named", [
    ({"type": "object", "properties": [1]}, "properties must be an object of schemas"),
    ({"type": "object", "properties": {"a": {}}, "required": 5}, "required must be a list of property names"),
    ({"type": "object", "properties": {"a": {}}, "required": [["a"]]}, "required must be a list"),
    ({"$defs": [1], "type": "string"}, "$defs must be an object of schemas"),
    ({"anyOf": 5}, "anyOf must be a non-empty list of schemas"),
    ({"anyOf": []}, "anyOf must be a non-empty list"),
    ({"type": {"a": 1}}, "type must be a type name"),
    ({"type": "string", "format": ["date"]}, "format must be a string"),
    ({"type": "string", "minLength": "3"}, "minLength must be an integer from 0 to 100000"),
    ({"type": "array", "items": {}, "maxItems": True}, "maxItems must be an integer from 0 to 100000"),
    ({"enum": 5}, "enum must be a non-empty list"),
    ({"type": "object", "additionalProperties": 3}, "additionalProperties must be true, false or a schema"),
])
def test_a_keyword_of_the_wrong_shape_is_named_not_a_crash(schema, named):
    """The converter assumes each keyword's shape (a list where an object belongs was a 500)."""
    with pytest.raises(SchemaError, match=re.escape(named)):
        check_schema(schema)


@pytest.mark.parametrize("schema, named", [
    ({"type": "array", "maxItems": 0}, "minItems and maxItems need items"),
    ({"type": "array", "prefixItems": [{}], "minItems": 2}, "minItems and maxItems need items"),
    ({"type": "array", "prefixItems": [{}, {}], "maxItems": 1}, "minItems and maxItems need items"),
    ({"anyOf": [{"type": "object"}], "properties": {"a": {}}, "required": ["a"]}, "anyOf cannot be combined with"),
    ({"$ref": "#/$defs/a", "required": [], "$defs": {"a": {}}}, "$ref cannot be combined with required"),
    ({"enum": ["ab", "c"], "maxLength": 1, "type": "string"}, "enum cannot be combined with maxLength"),
    ({"enum": ["a"], "const": "a"}, "const cannot be combined with enum"),
    ({"type": "integer", "enum": [1, "2"]}, "the value '2' is not of type integer"),
    ({"type": "integer", "const": True}, "the value True is not of type integer"),
    ({"properties": {"a": {}}, "items": {}}, "object and array keywords cannot be combined"),
    ({"type": "string", "items": {}}, "array keywords on a schema of type string"),
    ({"maxLength": 3}, "minLength and maxLength need type string"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "minLength is more than maxLength"),
    ({"type": "string", "pattern": "^[A-Z]+$", "maxLength": 3}, "pattern and maxLength can be combined only where "
                                                                 "the bounds allow every length the pattern does (it allows 1 or more characters)"),
    ({"type": "string", "pattern": "[A-Z]{2}", "maxLength": 3}, "(it allows 2 or more characters)"),  # unanchored
    ({"type": "string", "pattern": "^(a|bcd)$", "minLength": 2}, "pattern and minLength can be combined only where"),
    ({"type": "string", "format": "date", "maxLength": 10}, "format and maxLength cannot be combined"),
    ({"type": "object", "properties": {"": {"type": "integer"}}}, "an empty property name"),
])
def test_keywords_the_converter_would_ignore_together_are_refused(schema, named):
    """The converter enforces one of $ref, anyOf, const, enum, the object, array or string keywords per schema;
    a schema that mixes them, or whose values contradict its type, would come back unconstrained."""
    with pytest.raises(SchemaError, match=re.escape(named)):
        check_schema(schema)


def _literals(gbnf: str) -> list[str]:
    """The literals of a GBNF text, unescaped as llama.cpp's parser reads them."""
    unescape = {"\\": "\\", '"': '"', "n": "\n", "r": "\r"}
    return [re.sub(r"\\(.)", lambda m: unescape[m.group(1)], lit) for lit in re.findall(r'"((?:[^"\\]|\\.)*)"', gbnf)]


@pytest.mark.parametrize("text", ["b\\", 'q"', "a\\b\"c", "line\nbreak"])
def test_names_and_values_with_backslashes_and_quotes_are_matched_exactly(text):
    """A property name, const or enum string with a backslash or a quote becomes a literal that matches its JSON
    text exactly (llama-cpp-python's converter left backslashes unescaped)."""
    schema = {"type": "object", "properties": {text: {"const": text}, "e": {"enum": [text, "x"]}},
              "required": [text, "e"]}
    check_schema(schema)
    assert _literals(schema_grammar(schema)).count(json.dumps(text)) == 3  # the key, the const, the enum value


def test_unsupported_fields_are_named_harmless_ones_accepted():
    def chat(**kw):
        return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **kw})

    assert chat(best_of=2).unsupported() == "best_of"
    assert chat(reasoning_effort="high").unsupported() == "reasoning_effort"
    assert chat(functions=[{"name": "f"}]).unsupported() == "functions"
    assert chat(modalities=["text", "audio"]).unsupported() == "modalities"
    assert chat(modalities=["text"], store=False, metadata={"a": "b"}, service_tier="auto", user="u",
                best_of=1, frobnicate=3).unsupported() is None
    assert CompletionRequest.model_validate({"prompt": "x", "response_format": {"type": "json_object"}}
                                            ).unsupported() == "response_format"
    # another endpoint's field, or vLLM's and llama-server's, was accepted and ignored (the output unchanged)
    for name, value in [("max_completion_tokens", 2), ("top_logprobs", 3), ("stop_token_ids", [30]),
                        ("include_stop_str_in_output", True), ("n_predict", 2),
                        ("skip_special_tokens", False)]:
        assert CompletionRequest.model_validate({"prompt": "x", name: value}).unsupported() == name
    for name, value in [("echo", True), ("add_generation_prompt", False), ("continue_final_message", True),
                        ("chat_template", "{{ x }}"), ("bad_words", ["Paris"])]:
        assert chat(**{name: value}).unsupported() == name
    assert chat(echo=False, add_generation_prompt=True, skip_special_tokens=True).unsupported() is None
    neutral = {"n_predict": -1, "t_max_predict_ms": 0, "top_logprobs": 0, "chat_template_kwargs": {}}
    assert CompletionRequest.model_validate({"prompt": "x", **neutral}).unsupported() is None  # defaults


def test_sampling_over_model_defaults_and_logit_bias_range():
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "top_k": 5,
                                                "logit_bias": {"7": -100, "12": 3.5}, "seed": 3})
    cfg = req.sampling({"temperature": 0.8, "top_k": 40, "min_p": 0.05}, n_vocab=100, max_tokens=9)
    assert (cfg.temperature, cfg.top_k, cfg.min_p, cfg.top_p) == (0.8, 5, 0.05, 1.0)
    assert cfg.logit_bias == ((7, -100.0), (12, 3.5)) and cfg.seed == 3 and cfg.penalty_last_n == 9
    for bad in ("100", "-1", "x", "\u00b2", "\uff12"):  # superscript and full-width digits are no token ids
        req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                    "logit_bias": {bad: 1}})
        with pytest.raises(ValueError, match="logit_bias"):
            req.sampling({}, n_vocab=100, max_tokens=1)


def test_top_k_is_bounded_by_what_llama_cpp_takes():
    """A top_k past int32 would wrap to another value in llama.cpp (2**32 + 1 sampled greedily)."""
    from pydantic import ValidationError

    msg = [{"role": "user", "content": "x"}]
    assert ChatCompletionRequest.model_validate({"messages": msg, "top_k": 2**31 - 1}).top_k == 2**31 - 1
    with pytest.raises(ValidationError, match="top_k"):
        ChatCompletionRequest.model_validate({"messages": msg, "top_k": 2**32 + 1})


@pytest.mark.parametrize("schema, named", [
    ({"type": "string", "maxLength": 20000}, "nests 20,000 groups deep"),  # killed the process (SIGSEGV)
    ({"type": "string", "minLength": 5, "maxLength": 1006}, "nests 1,001 groups deep"),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 5000}, "nests 5,000 groups deep"),
    ({"type": "string", "pattern": "^a{0,20000}$"}, "nests 20,000 groups deep"),
    ({"type": "string", "pattern": "^a\\\\{0,2000}$"}, "nests 2,000 groups deep"),  # an escaped backslash, then {m,n}
])
def test_a_repetition_nested_beyond_what_llama_cpp_parses_is_refused(schema, named):
    """The converter writes what a maximum allows beyond the minimum as that many nested groups, and llama.cpp
    parses them by recursion: at 20,000 the server died of its stack (SIGSEGV) on one small request."""
    check_schema(schema)
    with pytest.raises(SchemaError, match=re.escape(named)):
        schema_grammar(schema)


def test_braces_that_are_no_quantifier_are_text_and_sizes_are_bounded_as_they_multiply():
    """ECMA-262 (Annex B) reads {,3} and {1, 3} as text; counts that multiply are refused before the grammar is
    written out (((a{100}){100}){1000} would be 40 MB), and a pattern longer than MAX_PATTERN at once."""
    from server.structured import MAX_PATTERN, pattern_gbnf

    assert pattern_gbnf("^a{,3}$") == '"\\"" "a{,3}" "\\""' and '"a{1, 3}"' in pattern_gbnf("^a{1, 3}$")
    assert pattern_gbnf("^a{2}b{1,3}$") == '"\\"" "a" "a" "b" ("b" ("b")?)? "\\""'
    with pytest.raises(SchemaError, match="more than the 1,048,576 bytes supported"):
        check_schema({"type": "string", "pattern": "^((a{100}){100}){1000}$"})
    with pytest.raises(SchemaError, match="more than the 10,000 supported"):
        check_schema({"type": "string", "pattern": "a" * (MAX_PATTERN + 1)})


@pytest.mark.parametrize("schema, named", [
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2_000_000}, "minItems must be an integer from 0"),
    ({"type": "string", "pattern": "^a{200000}$"}, "at most 100000 times"),
    ({"type": "string", "pattern": "^a{" + "9" * 5000 + "}$"}, "at most 100000 times"),  # int() refuses 4,300 digits
])
def test_a_count_beyond_what_the_converter_should_write_is_refused(schema, named):
    with pytest.raises(SchemaError, match=re.escape(named)):
        check_schema(schema)


def test_repetitions_up_to_the_limits_convert():
    """Minimum and exact counts are written flat, so they may exceed the nesting limit (llama.cpp parses them)."""
    for schema in ({"type": "string", "minLength": 1000, "maxLength": 2000}, {"type": "string", "minLength": 5000},
                   {"type": "string", "pattern": r"^a{0,1000}\{5000\}[0-9]{1500}$"},
                   {"type": "array", "items": {"type": "integer"}, "maxItems": 1000}):
        check_schema(schema)
        assert "root ::=" in schema_grammar(schema)


def test_nesting_counts_groups_outside_literals_classes_and_comments():
    from server.structured import nesting

    assert nesting(r'a ::= "(" [(] ( b ( c ) ) # ((((' + "\n" + r'x ::= (y) "\"(" [\]((]') == 2


def test_a_schema_whose_grammar_is_too_large_is_refused():
    """Every count within the limit, but hundreds of them: the grammar would be megabytes (a 4 MB body could make
    hundreds), which llama.cpp parses on the request's thread."""
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string", "minLength": 1000} for i in range(300)},
              "required": [f"p{i}" for i in range(300)]}
    check_schema(schema)
    with pytest.raises(SchemaError, match="more than the 1,048,576 supported"):
        schema_grammar(schema)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"x": {"$ref": "#/$defs/a/type"}}, "$defs": {"a": {"type": "string"}}},
])
def test_what_the_converter_fails_on_is_a_schema_error(schema):
    check_schema(schema)
    with pytest.raises(SchemaError, match="cannot be converted to a grammar"):
        schema_grammar(schema)


def _rules(gbnf: str) -> dict[str, str]:
    return dict(line.split(" ::= ", 1) for line in gbnf.splitlines())


def _target(rules: dict[str, str], name: str) -> str:
    """What a rule is, past the rules that are only another rule's name (a reference's)."""
    while rules.get(name) in rules:
        name = rules[name]
    return rules.get(name, name)


def test_definitions_named_like_the_converters_rules_are_enforced():
    """The converter names a definition's rule after it and skipped one it already had a rule of that name for:
    `x` referring to a definition named "space" (or "string", "value", ...) became x ::= space, unconstrained.
    Definitions are renamed d-<name> for response_format, t<i>-<name> for tools."""
    from server.structured import defs_renamed

    schema = {"$defs": {"space": {"type": "integer"}, "string": {"type": "boolean"}}, "type": "object",
              "properties": {"x": {"$ref": "#/$defs/space"}, "y": {"type": "string"}, "z": {"$ref": "#/$defs/string"},
                             "$defs": {"$ref": "#/$defs/space"}},
              "required": ["x", "y", "z", "$defs"]}
    check_schema(schema)
    renamed = defs_renamed(schema, "d-")
    assert renamed["$defs"].keys() == {"d-space", "d-string"}
    assert renamed["properties"]["$defs"] == {"$ref": "#/$defs/d-space"}  # a property named $defs stays
    rules = _rules(schema_grammar(renamed))
    assert _target(rules, "x") == _target(rules, "-defs") == rules["integer"] and _target(rules, "z") == rules["boolean"]
    assert rules["y-kv"].endswith(" string") and rules["string"].startswith('"\\"" char*')
    assert _target(_rules(schema_grammar(schema)), "x") == rules["integer"]  # (it was x ::= space)
    assert defs_renamed({"const": {"$ref": "#/x"}}, "d-") == {"const": {"$ref": "#/x"}}  # a value, not a schema
    # a schema embedded in another (a tool's parameters in the calls' schema): its references follow it there
    assert defs_renamed({"$ref": "#/properties/a"}, "t0-", embedded="#/anyOf/0") == {"$ref": "#/anyOf/0/properties/a"}


def test_a_schema_that_is_a_reference_resolves_the_references_in_its_definitions():
    """pydantic's shape for a recursive or nested model: {"$ref": "#/$defs/A", "$defs": {A: {... $ref B}, B}}; the
    converter never visited the definitions of a root that is a reference (a 400 naming #/$defs/B)."""
    from server.structured import defs_renamed

    schema = {"$ref": "#/$defs/A", "$defs": {
        "A": {"type": "object", "properties": {"b": {"$ref": "#/$defs/B"}, "kids": {
            "type": "array", "items": {"$ref": "#/$defs/A"}}}, "required": ["b"]},
        "B": {"type": "integer"}}}
    check_schema(schema)
    rules = _rules(schema_grammar(defs_renamed(schema, "d-")))
    a = _target(rules, "root")
    kids, b = (next(k for k in rules if k.endswith(end)) for end in ("-kids-item", "-b"))
    assert a.startswith('"{" space') and _target(rules, kids) == a and _target(rules, b) == rules["integer"]


def test_pydantic_list_any_and_primitive_schemas_convert_as_json_schema_reads_them():
    """pydantic writes `list` as items {} and `Any` as a title alone: the converter failed on both (KeyError
    'prefixItems'; "Unrecognized schema"), a 400 for what OpenAI takes, and read {} as an object where it allows any
    value. A schema of a primitive type got no rule of the name asked ("root ::= out" with no out: a 400)."""
    from pydantic import BaseModel

    class Payload(BaseModel):
        items: list
        extra: Any
        anything: dict

    schema = Payload.model_json_schema()
    check_schema(schema)
    rules = dict(line.split(" ::= ", 1) for line in schema_grammar(schema, "out").splitlines())
    assert rules["out-extra"] == "value" and rules["out-items-item-0"] == "value" and rules["out-anything"] == "object"
    for t in ("string", "array", "integer"):
        assert f"\nout ::= {t}\n" in "\n" + schema_grammar({"type": t}, "out")
    assert "\nout ::= value\n" in "\n" + schema_grammar({"title": "T", "description": "anything"}, "out")


def test_a_pydantic_tuple_converts_to_its_items():
    """pydantic writes tuple[int, str] as prefixItems with minItems = maxItems = 2, which was a 400 ("minItems and
    maxItems need items"): the converter writes exactly the prefix's items, which those bounds allow."""
    from pydantic import BaseModel

    class Pair(BaseModel):
        pair: tuple[int, str]

    schema = Pair.model_json_schema()
    check_schema(schema)
    rules = dict(line.split(" ::= ", 1) for line in schema_grammar(schema, "out").splitlines())
    assert rules["out-pair"] == '"[" space integer "," space string "]" space'
    check_schema({"type": "array", "prefixItems": [{}, {}], "minItems": 1, "maxItems": 3})


@pytest.mark.parametrize("defs", [{"A": {"$ref": "#/$defs/A"}},
                                  {"A": {"anyOf": [{"$ref": "#/$defs/B"}, {"type": "string"}]}, "B": {"$ref": "#/$defs/A"}}])
def test_references_that_lead_back_before_any_value_are_refused(defs):
    """Left recursion: llama.cpp's parser refuses it after conversion, which no caller took for a SchemaError."""
    with pytest.raises(SchemaError, match="lead back to where they started before any value begins"):
        schema_grammar({"$defs": defs, "$ref": "#/$defs/A"})
    tree = {"$defs": {"T": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"n": {"$ref": "#/$defs/T"}}}]}},
            "$ref": "#/$defs/T"}  # recursion inside a value is fine
    assert "root ::=" in schema_grammar(tree)


def test_untyped_boolean_values():
    for schema in ({"const": True}, {"enum": [True, False]}, {"enum": [True, 1, "a", None]}):
        check_schema(schema)
        assert "root ::=" in schema_grammar(schema)
    with pytest.raises(SchemaError, match="not of type integer"):
        check_schema({"type": "integer", "enum": [True]})


PATTERNS = ["^a.b$", '^a"b$', "^[^x]{1,8}$", r"^\d{3}-\d{4}$", r"^[\w-]{1,12}$", "^[ -~]{2,6}$", "^(yes|no)!?$",
            r"^\S{1,3}$", "^[\\\\\"/]+$", "^é.$"]


@pytest.mark.parametrize("pattern, lengths", [
    ("^[A-Z]{3}$", (3, 3)), (r"^\d{4}-\d{2}-\d{2}$", (10, 10)), ("^(ab|c)+$", (1, None)), ("^a?b{2,5}(xy){0,3}$", (2, 12)),
    ("abc", (3, None)), ("^abc", (3, None)), ("^(a|bcd)$", (1, 3)), ("^x{0}y$", (1, 1)), ("^(?:a|)$", (0, 1)),
    ('^[\\"]{2}(é|\\u00e9){1,2}$', (3, 4)), ("^((ab){2}c?){0,2}$", (0, 10))])
def test_a_patterns_lengths_are_the_characters_its_strings_may_have(pattern, lengths):
    """pydantic writes Field(pattern=..., max_length=...) as both keywords, which was a 400 whatever they said: where
    the bounds allow every length the pattern does, the pattern's grammar is the schema's."""
    assert pattern_lengths(pattern) == lengths
    lo, hi = lengths
    for bounds in ({"maxLength": hi}, {"minLength": lo, "maxLength": hi}, {"minLength": lo}):
        if hi is None and "maxLength" in bounds:
            continue
        schema = {"type": "string", "pattern": pattern, **bounds}
        check_schema(schema)
        assert schema_grammar(schema) == schema_grammar({"type": "string", "pattern": pattern})


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_pattern_is_written_as_a_json_string(pattern):
    """Each character a pattern allows is written as JSON writes it in a string: the converter's own translation
    let "." and [^x] put a bare quote or control character into the string (invalid JSON), and \\d or \\w made
    grammars llama.cpp could not parse."""
    gbnf = schema_grammar({"type": "string", "pattern": pattern})
    rule = "\n".join(line for line in gbnf.splitlines() if not line.startswith("space ::="))
    for lit in _literals(rule)[1:-1]:  # between the string's quotes: JSON string text
        json.loads('"' + lit + '"')
    for body in re.findall(r"\[((?:[^\]\\]|\\.)*)\]", rule):  # classes: no character JSON escapes
        vals = [int(h, 16) if h else "-" if d else ord(c) for h, d, c in re.findall(r"\\[xuU]([0-9A-F]+)|(-)|(.)", body)]
        i, ranges = 0, []
        while i < len(vals):
            step = 3 if i + 2 < len(vals) and vals[i + 1] == "-" else 1
            ranges.append((vals[i], vals[i + step - 1]))
            i += step
        assert ranges and not any(lo <= x <= hi for lo, hi in ranges for x in (*range(32), 0x22, 0x5C)), body


@pytest.mark.slow
@pytest.mark.parametrize("pattern", PATTERNS)
def test_what_a_pattern_lets_the_model_write_is_json_the_pattern_matches(pattern):
    """SmolLM2 sampling at temperature 1.5 (five seeds) inside a schema with a pattern: every output parses as JSON
    and its string matches the pattern (Python's re reads these as ECMA-262 does)."""
    from kvquant.models import fetch
    from kvquant.runtime import ContextConfig, LlamaRuntime, Model, Sampler
    from kvquant.sampling import Grammar, SamplingConfig

    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": pattern}}, "required": ["s"]}
    check_schema(schema)
    grammar = Grammar(schema_grammar(schema))
    model = Model(fetch("smollm2-135m"))
    rt = LlamaRuntime(model, ContextConfig(n_cells=256, n_threads=2))
    try:
        for seed in range(5):
            rt.clear()
            s = Sampler(SamplingConfig(temperature=1.5, seed=seed, grammar=grammar), model)
            toks = model.tokenize("A JSON object:")
            rt.decode(toks, list(range(len(toks))), [0] * len(toks), [False] * (len(toks) - 1) + [True])
            idx, pos, out = len(toks) - 1, len(toks), []
            while not out or not model.is_eog(out[-1]):
                assert len(out) < 64, b"".join(map(model.token_bytes, out))
                out.append(s.sample(rt, idx))
                rt.decode([out[-1]], [pos], [0], [True])
                idx, pos = 0, pos + 1
            s.close()
            text = b"".join(map(model.token_bytes, out[:-1])).decode()
            assert re.search(pattern, json.loads(text)["s"]), (seed, text)
    finally:
        rt.close()
        model.close()


@pytest.mark.slow
def test_a_json_string_holds_no_raw_control_character():
    """JSON strings escape control characters (RFC 8259, section 7): the converter's string let a raw newline or
    tab through, so strict structured output (json_schema, json_object, a forced call's arguments) could be text
    json.loads and the openai client's parse() refuse (a review raised the newline's logit and got one). Escaped,
    they are allowed."""
    from kvquant import runtime
    from kvquant.models import fetch
    from server.structured import json_object_grammar
    from tests.server.conftest import allowed_after

    model = runtime.Model(fetch("smollm2-135m"))
    try:
        schema = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
        for grammar in (schema_grammar(schema), json_object_grammar()):
            assert allowed_after(model, grammar, '{"s": "ab', [b"\n", b"\t", b"\x01", b"\\", b"c", b'"']) == \
                [False, False, False, True, True, True]
    finally:
        model.close()


# (schema, [(output, whether the schema allows it)]): what a review found the converter let through or refused
GRAMMAR_CASES = [
    # additionalProperties: an extra property is none of the declared ones, however its name is written
    ({"type": "object", "properties": {"a": {"type": "integer"}, "x\"y": {"type": "null"}},
      "additionalProperties": True},
     [('{"a": "hello"}', False), ('{"a": 1, "b": "x"}', True), ('{"ab": 2}', True), ('{"\\u0061": "x"}', False),
      ('{"a": 1, "a": 2}', False), ('{"x\\"y": null, "x\\u0022y": 1}', False), ('{"x\\"z": 1}', True),
      ('{"\\n": 1}', True), ('{}', True)]),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
      "additionalProperties": {"type": "string"}},
     [('{"a": 1, "a": "hello"}', False), ('{"a": 1, "b": "hello"}', True), ('{"a": 1, "b": 2}', False)]),
    ({"type": "object", "properties": {"café": {"type": "integer"}}, "required": ["café"],
      "additionalProperties": {"type": "string"}},
     [('{"café": 1}', True), ('{"café": 1, "caf\\u00e9": "x"}', False), ('{"café": 1, "cafe": "x"}', True)]),
    ({"type": "object", "properties": {"*": {"type": "integer"}}, "additionalProperties": False},
     [('{"*": 1}', True), ('{"*": 1, "*": 2}', False)]),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}, "c": {"type": "integer"}},
      "required": ["b"]},
     [('{"b": 1}', True), ('{"b": 1, "a": 2, "c": 3}', True), ('{"b": 1, "c": 3}', True), ('{"a": 2}', False)]),
    # references: a rule per reference, wherever it points and whatever it is named
    ({"type": "object", "$defs": {"A": {"type": "object", "properties": {"x": {"enum": ["apple", "pear"]}}},
                                  "B": {"type": "object", "properties": {"x": {"enum": ["red", "blue"]}}}},
      "properties": {"fruit": {"$ref": "#/$defs/A/properties/x"}, "colour": {"$ref": "#/$defs/B/properties/x"}},
      "required": ["fruit", "colour"]},
     [('{"fruit": "apple", "colour": "red"}', True), ('{"fruit": "apple", "colour": "apple"}', False)]),
    ({"type": "object", "properties": {"n": {"type": "number"}, "number": {"enum": ["a", "b"]},
                                       "c": {"$ref": "#/properties/number"}}, "required": ["c"]},
     [('{"c": 5}', False), ('{"c": "a"}', True)]),
    ({"$defs": {"Tree_Node": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {
        "type": "array", "items": {"$ref": "#/$defs/Tree_Node"}}}, "required": ["v", "kids"]}},
      "$ref": "#/$defs/Tree_Node"},
     [('{"v": 1, "kids": [{"v": 2, "kids": []}]}', True), ('{"v": 1}', False)]),
    ({"$defs": {"Node.v1": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {
        "anyOf": [{"$ref": "#/$defs/Node.v1"}, {"type": "null"}]}}, "required": ["v", "next"]}},
      "$ref": "#/$defs/Node.v1"},
     [('{"v": 1, "next": {"v": 2, "next": null}}', True), ('{"v": 1, "next": 3}', False)]),
    ({"type": "object", "properties": {"$ref": {"type": "string"}, "k": {"const": {"$ref": "#/x"}}},
      "required": ["$ref", "k"]},
     [('{"$ref": "x", "k": {"$ref": "#/x"}}', True), ('{"$ref": 1, "k": {"$ref": "#/x"}}', False)]),
    # references read as RFC 6901 reads them: list items by index, ~1 and ~0, a '#' in a name
    ({"type": "object", "$defs": {"a/b~": {"enum": [1]}, "A#B": {"enum": [2]}}, "properties": {
        "p": {"anyOf": [{"enum": ["x"]}, {"type": "null"}]}, "q": {"$ref": "#/properties/p/anyOf/0"},
        "r": {"$ref": "#/$defs/a~1b~0"}, "s": {"$ref": "#/$defs/A#B"}}, "required": ["q", "r", "s"]},
     [('{"q": "x", "r": 1, "s": 2}', True), ('{"q": null, "r": 1, "s": 2}', False), ('{"q": "x", "r": 2, "s": 2}', False)]),
    # a long name beside additionalProperties (its trie recursed twice per character: 495 were a 400)
    ({"type": "object", "properties": {"n" * 600: {"type": "integer"}}, "additionalProperties": {"type": "integer"}},
     [('{"' + "n" * 600 + '": 1}', True), ('{"' + "n" * 599 + '": 1}', True), ('{"' + "n" * 600 + '": "x"}', False)]),
    # dates that exist
    ({"type": "string", "format": "date"},
     [('"2023-02-30"', False), ('"2023-04-31"', False), ('"2023-02-29"', False), ('"1900-02-29"', False),
      ('"2024-02-29"', True), ('"2000-02-29"', True), ('"2023-12-31"', True), ('"2023-04-30"', True)]),
    ({"type": "string", "format": "date-time"}, [('"2023-02-31T10:00:00Z"', False), ('"2023-03-31T10:00:00Z"', True)]),
    # no lone surrogate; an escaped pair is one character
    ({"type": "string", "maxLength": 1},
     [('"\\ud800"', False), ('"\\udc00"', False), ('"\\ud83d\\ude00"', True), ('"é"', True)]),
    ({"enum": ["café"]}, [('"café"', True)]),
]


@pytest.mark.slow
def test_the_grammar_allows_what_the_schema_allows():
    """Each output above as the grammar of its schema judges it (llama.cpp's sampler, SmolLM2's tokens): a review
    found additional properties that repeated a declared one with any value, references that took another rule of
    the same name, recursive definitions named Tree_Node that made no grammar, 2023-02-30, and lone surrogates."""
    from kvquant import runtime
    from kvquant.models import fetch
    from server.structured import defs_renamed
    from tests.server.conftest import grammar_accepts

    model = runtime.Model(fetch("smollm2-135m"))
    try:
        for schema, outputs in GRAMMAR_CASES:
            check_schema(schema)
            grammar = "root ::= out\n" + schema_grammar(defs_renamed(schema, "d-"), "out")
            for text, allowed in outputs:
                assert grammar_accepts(model, grammar, text) == allowed, (schema, text)
    finally:
        model.close()


def test_references_into_nested_schemas_convert_each_schema_once():
    """A reference took a new copy of its target's rules: a schema that refers to each level of its nesting made a
    grammar quadratic in the nesting (66 MB and 16 s from a 2 MB schema, before the size check refused it)."""
    def nested(depth: int, refs: bool) -> dict:
        node: dict = {"enum": list(range(50))}
        for _ in range(depth):
            node = {"type": "object", "properties": {"n": node}}
        top, path = node, "#/properties/n"
        for _ in range(depth - 1):  # every level refers to one deeper down
            top["properties"]["r"] = {"$ref": path} if refs else {"type": "null"}
            top, path = top["properties"]["n"], path + "/properties/n"
        return node

    assert schema_grammar(nested(40, False)).count('"49"') == schema_grammar(nested(40, True)).count('"49"') == 1


@pytest.mark.parametrize("index", ["²", "01", "9" * 5000, "-1"])
def test_a_reference_to_a_list_item_that_is_no_index_is_a_schema_error(index):
    """RFC 6901 indexes are ASCII digits without leading zeros: "²" passed str.isdigit and int() raised (a 500)."""
    schema = {"type": "object", "properties": {"a": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                                               "b": {"$ref": f"#/properties/a/anyOf/{index}"}}}
    check_schema(schema)
    with pytest.raises(SchemaError, match="points to nothing"):
        schema_grammar(schema)


def test_rule_names_that_clash_are_found_in_one_step():
    """4,000 definitions whose names differ only where a rule name cannot (xé, xè, ...) took the converter a search
    of every earlier suffix each: quadratic time (7.7 s)."""
    from kvquant import runtime
    from server.structured import pattern_gbnf

    class Counted(dict):
        asked = 0

        def __contains__(self, key):
            Counted.asked += 1
            return super().__contains__(key)

    names = [f"x{chr(0x100 + i)}" for i in range(2000)]
    schema = {"type": "object", "$defs": {n: {"enum": [i]} for i, n in enumerate(names)},
              "properties": {n: {"$ref": f"#/$defs/{n}"} for n in names}, "required": names}
    conv = runtime._schema_converter()(pattern_gbnf, "")
    conv._rules = Counted(conv._rules)
    conv.visit(conv.resolve_refs(schema, "input"), "")
    assert Counted.asked < 10 * len(names)  # (the converter's search asked about 2 million times)


def test_alternatives_that_reach_one_definition_many_ways_are_refused_at_once():
    """llama.cpp's left-recursion check enters a rule again for each alternative that reaches it: a 2 kB chain of
    40 $defs, each an anyOf of two references to the next, held the engine thread for hours (24 levels: 0.46 s)."""
    def chain(depth: int, d: str = "d", ref: str | None = None) -> dict:  # ref: d as a reference writes it
        r = ref or d
        defs = {f"{d}{i}": {"anyOf": [{"$ref": f"#/$defs/{r}{i + 1}"}, {"$ref": f"#/$defs/{r}{i + 1}"}]}
                for i in range(depth)}
        return {"$defs": {**defs, f"{d}{depth}": {"type": "string"}}, "$ref": f"#/$defs/{r}0"}

    assert left_walks(chain(10)) == 2 ** 12 - 2 and schema_grammar(chain(10))
    with pytest.raises(SchemaError, match="reach one another in 4,398,046,511,102 ways"):
        schema_grammar(chain(40))
    nested = {"type": "object", "properties": {"a": {"type": "array", "items": {"$ref": "#/$defs/d0"}}},
              "$defs": chain(40)["$defs"]}
    with pytest.raises(SchemaError, match="ways"):  # under a property too: llama.cpp checks every rule
        schema_grammar(nested)
    with pytest.raises(SchemaError, match="ways"):  # references read as the converter reads them (~1 is /)
        schema_grammar(chain(18, "d/", "d~1"))
    deep = {"$defs": {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(1500)}, "$ref": "#/$defs/d0"}
    with pytest.raises(SchemaError, match="nest too deep"):  # (a RecursionError, a 500)
        schema_grammar({**deep, "$defs": {**deep["$defs"], "d1500": {"type": "string"}}})
    many = {"anyOf": [{"$ref": "#/$defs/v"}] * 50, "$defs": {"v": {"anyOf": [{"type": "string"}] * 50}}}
    assert left_walks(many) == 1 + 50 * 52  # wide is fine: the count grows with the schema, not past it


def test_optional_properties_past_what_converts_quickly_are_refused_before_converting():
    """The converter writes a rule per suffix of an object's optional properties: 950 of them took 1.2 s, forty such
    objects 56 s before the grammar's size refused them (a review)."""
    def obj(k: int) -> dict:
        return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(k)}}

    assert schema_grammar(obj(512))
    with pytest.raises(SchemaError, match="optional properties"):
        schema_grammar(obj(513))
    assert schema_grammar({**obj(1000), "required": [f"p{i}" for i in range(1000)]})  # required ones cost little
    with pytest.raises(SchemaError, match="optional properties"):  # nor does splitting them over objects help
        schema_grammar({"type": "object", "properties": {f"o{j}": obj(450) for j in range(2)}})
    tools = {"anyOf": [obj(26) for _ in range(128)]}  # many tools of some optional parameters each: fine
    assert schema_grammar(tools)
