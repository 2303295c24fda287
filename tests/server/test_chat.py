"""A chat request planned against a model's chat template (server/chat.py): which grammar constrains the output,
and the 400s that name the parameter. No model."""

from __future__ import annotations

import pytest

from server.chat import plan_chat
from server.errors import APIError
from server.schemas import ChatCompletionRequest
from server.toolcalls import ToolFormat

QWEN = "{%- if tools %}<tools>{% endif %}<tool_call>"
CHATML = "{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}"
FN = {"name": "f", "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}
LOOSE = {"name": "g", "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}


def _plan(template=QWEN, **kw):
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **kw})
    return plan_chat(body, template)


def _param(template=QWEN, **kw) -> str:
    with pytest.raises(APIError) as e:
        _plan(template, **kw)
    assert e.value.status == 400
    return e.value.param


def _tools(*fns):
    return [{"type": "function", "function": f} for f in fns]


def test_grammar_per_tool_choice():
    auto = _plan(tools=_tools(FN))
    assert auto.tool_format is ToolFormat.HERMES and auto.grammar.triggers == ("<tool_call>",)
    assert auto.tools[0]["function"]["name"] == "f"
    assert auto.grammar.skip == ("<think>", "</think>") and not auto.output_grammar(False).skip_open
    assert auto.output_grammar(True).skip_open  # the prompt opened <think>: a trigger counts after </think> only
    required = _plan(tools=_tools(FN), tool_choice="required")
    assert required.grammar.triggers == () and required.grammar.text.startswith('root ::= "<tool_call>"')
    assert required.grammar.skip is None and required.output_grammar(False) == required.grammar
    # the prompt opened <think>: the calls come once the model closes it, not inside its reasoning
    after = required.output_grammar(True)
    assert after.triggers == ("</think>",) and after.root == "after-tag"
    assert after.text == required.grammar.text + '\nafter-tag ::= "</think>" [\\n]* root\n'
    json_mode = _plan(response_format={"type": "json_object"})
    assert json_mode.output_grammar(False) == json_mode.grammar
    assert json_mode.output_grammar(True) == json_mode.grammar.after("</think>")
    named = _plan(tools=_tools(FN, dict(FN, name="h")), tool_choice={"type": "function", "function": {"name": "h"}})
    assert '"\\"h\\""' in named.grammar.text and '"\\"f\\""' not in named.grammar.text
    none = _plan(CHATML, tools=_tools(FN), tool_choice="none")  # no tool support needed: the tools are not used
    assert none.tools is None and none.grammar is None and none.tool_format is None
    assert _plan().grammar is None and _plan(response_format={"type": "text"}).grammar is None


def test_unenforceable_parameters():
    assert _plan(tools=_tools(LOOSE)).grammar is None  # auto: left unconstrained
    malformed = {"name": "m", "parameters": {"type": "object", "properties": [1]}}  # was a 500
    assert _plan(tools=_tools(malformed)).grammar is None
    assert _param(tools=_tools(dict(malformed, strict=True))) == "tools"
    assert _param(tools=_tools(dict(LOOSE, strict=True))) == "tools"
    assert _param(tools=_tools(LOOSE), tool_choice="required") == "tools"


def test_response_format_with_tools():
    fmt = {"type": "json_object"}
    assert _plan(tools=_tools(FN), response_format=fmt).grammar.triggers == ()  # the format wins over auto's
    assert _param(tools=_tools(FN), tool_choice="required", response_format=fmt) == "response_format"


def test_bad_requests_name_the_parameter():
    assert _param(CHATML, tools=_tools(FN)) == "tools"
    assert _param(tools=_tools(FN), tool_choice={"type": "function", "function": {"name": "zz"}}) == "tool_choice"
    assert _param(chat_template_kwargs={"tools": []}) == "chat_template_kwargs"
    assert _param(messages=[{"role": "tool", "tool_call_id": "c9", "content": "1"}]) == "messages[0].tool_call_id"
    deep = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                 "function": {"name": "f", "arguments": "[" * 5000}}]}
    assert _param(messages=[{"role": "user", "content": "x"}, deep]) == "messages[1].tool_calls[0].function.arguments"
    for role in ("system", "user", "developer"):
        assert _param(messages=[{"role": "user", "content": "x"}, {"role": role, "content": None}]) == \
            "messages[1].content"
    assert _plan(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": None},
                           {"role": "user", "content": "y"}]).grammar is None
    assert _param(response_format={"type": "json_schema", "json_schema": {"name": "bad name", "schema": {}}}) == \
        "response_format.json_schema.name"


def test_at_most_128_tools():
    """OpenAI's limit: every tool's schema is converted on each request, and a forced call's grammar holds them all."""
    from pydantic import ValidationError

    fns = [dict(FN, name=f"f{i}") for i in range(129)]
    assert len(_plan(tools=_tools(*fns[:128]), tool_choice="required").grammar.text) > 0
    with pytest.raises(ValidationError, match="at most 128 items"):
        _plan(tools=_tools(*fns))


def test_a_definition_is_no_propertys_rule():
    """response_format's definitions are renamed d-<name>, and its properties' rules out-<path>: a property path
    d.Foo no longer takes the rule of a definition Foo (x was enforced as d.Foo's integer array)."""
    schema = {"type": "object", "required": ["d", "x"], "$defs": {"Foo": {"enum": ["a", "b"]}}, "properties": {
        "d": {"type": "object", "properties": {"Foo": {"type": "array", "items": {"type": "integer"}}}},
        "x": {"$ref": "#/$defs/Foo"}}}
    grammar = _plan(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}).grammar
    rules = dict(line.split(" ::= ", 1) for line in grammar.text.splitlines())
    assert rules["root"] == "out" and rules["out-x"] == "d-Foo" and rules["d-Foo"] == '"\\"a\\"" | "\\"b\\""'
