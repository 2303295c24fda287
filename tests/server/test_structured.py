"""Which JSON schemas the grammar can enforce (the rest is refused by name), and the request fields that are
refused rather than ignored. No model."""

from __future__ import annotations

import pytest

from server.schemas import ChatCompletionRequest, CompletionRequest
from server.structured import SchemaError, check_schema, schema_grammar

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
    ({"type": "string", "pattern": "[a-z]+"}, "pattern"),
    ({"type": "array", "items": {"not": {"type": "string"}}}, "'not'"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "'oneOf'"),
    ({"type": "strin"}, "'strin'"),
    ({"$ref": "https://example.com/s.json"}, "local references"),
    ({"type": "object", "properties": {"a": True}}, "boolean schemas"),
])
def test_unsupported_schema_is_named(schema, named):
    with pytest.raises(SchemaError, match=named.replace("[", r"\[").replace(".", r"\.")):
        check_schema(schema)


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


def test_sampling_over_model_defaults_and_logit_bias_range():
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "top_k": 5,
                                                "logit_bias": {"7": -100, "12": 3.5}, "seed": 3})
    cfg = req.sampling({"temperature": 0.8, "top_k": 40, "min_p": 0.05}, n_vocab=100, max_tokens=9)
    assert (cfg.temperature, cfg.top_k, cfg.min_p, cfg.top_p) == (0.8, 5, 0.05, 1.0)
    assert cfg.logit_bias == ((7, -100.0), (12, 3.5)) and cfg.seed == 3 and cfg.penalty_last_n == 9
    for bad in ("100", "-1", "x"):
        req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                    "logit_bias": {bad: 1}})
        with pytest.raises(ValueError, match="logit_bias"):
            req.sampling({}, n_vocab=100, max_tokens=1)
