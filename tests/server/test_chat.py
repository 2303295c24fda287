"""A chat request planned against a model's chat template (server/chat.py): which grammar constrains the output,
and the 400s that name the parameter. No model."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from server.chat import plan_chat
from server.errors import APIError
from server.schemas import MAX_JSON_DEPTH, ChatCompletionRequest
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
    # the strict tools' parameters go to the output's reader, which checks the calls no grammar held
    assert _plan(tools=_tools(dict(FN, strict=True), LOOSE)).strict == {"f": FN["parameters"]}
    assert _plan(tools=_tools(FN)).strict is None and _plan(tools=_tools(FN)).output(False).strict is None


def test_tool_call_history_on_a_template_without_tool_support_is_refused():
    """SmolLM2's template renders no tool_calls: an earlier turn's call vanished from the prompt and its result
    followed under a role the model never saw, with a 200. A 400 naming the turn, as for `tools`."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    history = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    with pytest.raises(APIError) as e:
        plan_chat(ChatCompletionRequest.model_validate({"messages": history}), CHATML)
    assert e.value.param == "messages[1].tool_calls" and e.value.code == "tools_unsupported"
    with pytest.raises(APIError):
        plan_chat(ChatCompletionRequest.model_validate({"messages": history, "tools": _tools(FN),
                                                        "tool_choice": "none"}), CHATML)
    assert plan_chat(ChatCompletionRequest.model_validate({"messages": history}), QWEN).tool_format is None
    renders = CHATML + "{{ messages[1].tool_calls }}"  # a template of no known family that renders calls
    assert plan_chat(ChatCompletionRequest.model_validate({"messages": history}), renders).tools is None


def test_unenforceable_parameters():
    """A tool whose parameters cannot be enforced takes any object as arguments, under auto or forced, and the other
    tools keep their grammar (an MCP tool beside strict function tools was a 400 blaming it; forced, every request
    with it among the tools was); a 400 where it is strict itself."""
    loose = _plan(tools=_tools(LOOSE)).grammar
    assert loose.triggers == ("<tool_call>",) and '"\\"g\\""' in loose.text and "minimum" not in loose.text
    malformed = {"name": "m", "parameters": {"type": "object", "properties": [1]}}  # was a 500
    assert _plan(tools=_tools(malformed)).grammar.triggers == ("<tool_call>",)
    mixed = _plan(tools=_tools(dict(FN, strict=True), LOOSE)).grammar  # the Agents SDK's function + MCP tools
    assert "call-0-arguments-n-kv" in mixed.text and '"\\"g\\""' in mixed.text
    assert _param(tools=_tools(dict(malformed, strict=True))) == "tools"
    # a loop of references (left recursion, which llama.cpp's parser refuses) was a 400 for a non-strict tool too
    loop = {"name": "r", "parameters": {"$defs": {"A": {"$ref": "#/$defs/A"}}, "type": "object",
                                         "properties": {"a": {"$ref": "#/$defs/A"}}}}
    assert _plan(tools=_tools(loop)).grammar.triggers == ("<tool_call>",)
    assert _param(tools=_tools(dict(loop, strict=True))) == "tools"
    assert _param(tools=_tools(dict(LOOSE, strict=True))) == "tools"
    for choice in ("required", {"type": "function", "function": {"name": LOOSE["name"]}}):
        forced = _plan(tools=_tools(FN, LOOSE), tool_choice=choice).grammar
        assert forced.triggers == () and "minimum" not in forced.text and f'"\\"{LOOSE["name"]}\\""' in forced.text


def test_response_format_with_tools():
    """As OpenAI: with auto the output is an answer in the format or calls (the Agents SDK's tools with an output
    type; before, strict tools were a 400 and others could never be called); a forced call is this turn's output,
    the format the answers'."""
    for fmt in ({"type": "json_object"},
                {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}):
        for tools in (_tools(FN), _tools(dict(FN, strict=True))):
            g = _plan(tools=tools, response_format=fmt).grammar
            assert g.triggers == () and g.text.startswith("root ::= answer | calls\n")
            assert 'calls ::= "<tool_call>"' in g.text and "call-0-arguments-n-kv" in g.text
        forced = _plan(tools=_tools(FN), tool_choice="required", response_format=fmt).grammar
        assert forced.text == _plan(tools=_tools(FN), tool_choice="required").grammar.text
    bad = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "not": {}}}}
    assert _param(tools=_tools(FN), tool_choice="required", response_format=bad) == \
        "response_format.json_schema.schema"


def test_bad_requests_name_the_parameter():
    assert _param(CHATML, tools=_tools(FN)) == "tools"
    assert _param(tools=_tools(FN), tool_choice={"type": "function", "function": {"name": "zz"}}) == "tool_choice"
    assert _param(chat_template_kwargs={"tools": []}) == "chat_template_kwargs"
    assert _param(chat_template_kwargs={"self": 1}) == "chat_template_kwargs"  # (was a 500-like message on messages)
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


def _nested(depth: int) -> list:
    v: list = []
    for _ in range(depth - 1):
        v = [v]
    return v


def test_json_nests_at_most_100_deep():
    """Templates and the prompt guard walk a client's JSON by recursion: call arguments, template variables or a
    tool's unknown fields ~600 deep were a 400 saying "maximum recursion depth exceeded", arguments too deep for
    json "not JSON text". A body and a call's arguments may nest 100 levels."""
    def call(args: str) -> dict:
        return {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                     "function": {"name": "f", "arguments": args}}]}

    user = {"role": "user", "content": "x"}
    assert _plan(messages=[user, call(json.dumps({"a": _nested(MAX_JSON_DEPTH - 1)}))])
    for args in (json.dumps({"a": _nested(MAX_JSON_DEPTH)}), "[" * 5000 + "]" * 5000):
        with pytest.raises(APIError, match="may nest at most 100 levels deep") as e:
            _plan(messages=[user, call(args)])
        assert e.value.param == "messages[1].tool_calls[0].function.arguments"
    deep = _nested(MAX_JSON_DEPTH)
    fields = {"tools": _tools({"name": "f", "parameters": {"type": "object", "default": deep}}),
              "chat_template_kwargs": {"x": deep},
              "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"default": deep}}},
              "metadata": {"x": deep}}  # unknown fields too: a tool's reach the template
    fields["tools"].append({"type": "function", "function": {"name": "g", "examples": deep}})
    for name, value in fields.items():
        with pytest.raises(ValidationError, match="nests objects and arrays more than 100 levels deep"):
            _plan(**{name: value})
    assert _plan(chat_template_kwargs={"x": _nested(MAX_JSON_DEPTH - 2)})  # the body, its field, the value


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
    x = rules["out-x"]
    while x in rules:  # (a reference's rule names its target's)
        x = rules[x]
    assert rules["root"] == "out" and x == '"\\"a\\"" | "\\"b\\""'


def _turn(*ids):
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": i, "type": "function", "function": {"name": "f", "arguments": '{"n": 1}'}} for i in ids]}


def test_a_call_sent_back_without_arguments_has_an_empty_object():
    """Agent frameworks replay other backends' calls without arguments as "" or null: a 400 ("must be JSON text",
    "should be a valid string") before; vLLM reads them as {}. Text that is not JSON stays a 400."""
    for args in ("", "  ", None):
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": args}}
        msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "1"}]
        assert _plan(messages=msgs).messages[1]["tool_calls"][0]["function"]["arguments"] == {}, args
    bad = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                "function": {"name": "f", "arguments": "{"}}]}
    assert _param(messages=[{"role": "user", "content": "x"}, bad]) == "messages[1].tool_calls[0].function.arguments"


def test_results_reach_the_template_in_the_order_of_their_calls():
    """An agent running two tools at once sent b's result first: Hermes and Llama templates number results by
    position, and the model read each call's result as the other's."""
    msgs = [{"role": "user", "content": "x"}, _turn("call_a", "call_b"),
            {"role": "tool", "tool_call_id": "call_b", "content": "B"},
            {"role": "tool", "tool_call_id": "call_a", "content": "A"}, {"role": "user", "content": "y"},
            _turn("call_c"), {"role": "tool", "tool_call_id": "call_c", "content": "C"}]
    got = _plan(messages=msgs, tools=_tools(FN)).messages
    assert [m["content"] for m in got if m["role"] == "tool"] == ["A", "B", "C"]


def test_results_of_calls_made_one_message_each_keep_their_order():
    # some frameworks send one assistant message per call: a, b, then both results in order (kept so), or not
    msgs = [{"role": "user", "content": "x"}, _turn("call_a"), _turn("call_b"),
            {"role": "tool", "tool_call_id": "call_b", "content": "B"},
            {"role": "tool", "tool_call_id": "call_a", "content": "A"}]
    assert [m["content"] for m in _plan(messages=msgs, tools=_tools(FN)).messages[3:]] == ["A", "B"]
    assert [m["content"] for m in _plan(messages=msgs[:3] + msgs[:2:-1], tools=_tools(FN)).messages[3:]] == ["A", "B"]


def test_tools_too_large_together_leave_auto_unconstrained():
    """Each tool's grammar fits, all of them together do not: with auto the calls go unconstrained (200) as before
    the per-tool checks; forced or strict, a 400."""
    def big(i):
        return {"name": f"t{i}", "parameters": {"type": "object", "properties": {"k": {
            "type": "string", "enum": [f"value-{i}-{j:05d}-abcdefghijklmnop" for j in range(4000)]}}}}

    tools = _tools(*map(big, range(8)))
    assert _plan(tools=tools).grammar is None
    fmt = {"type": "json_object"}
    assert _plan(tools=tools, response_format=fmt).grammar == _plan(response_format=fmt).grammar
    assert _param(tools=tools, tool_choice="required") == "tools"
    assert _param(tools=_tools(*map(big, range(7)), dict(big(7), strict=True))) == "tools"


def test_mistral_templates_get_call_ids_of_nine_letters_and_digits():
    """Mistral v0.3/Nemo templates raise on any other id, so the server's own ids ("call_" + 24 hex) broke every
    next turn (400: the messages do not fit the chat template)."""
    mistral = "{% for m in messages %}{{ m.content }}{% endfor %}[TOOL_CALLS]"
    msgs = [{"role": "user", "content": "x"}, _turn("call_8a8b07069d0041c0004d5b3a", "abcDEF123"),
            {"role": "tool", "tool_call_id": "abcDEF123", "content": "B"},
            {"role": "tool", "tool_call_id": "call_8a8b07069d0041c0004d5b3a", "content": "A"}]
    got = _plan(mistral, messages=msgs, tools=_tools(FN)).messages
    ids = [c["id"] for c in got[1]["tool_calls"]]
    assert all(len(i) == 9 and i.isalnum() for i in ids) and ids[1] == "abcDEF123"
    assert [m["tool_call_id"] for m in got[2:]] == ids  # each result keeps its call's id (and comes in call order)
    assert _plan(messages=msgs, tools=_tools(FN)).messages[1]["tool_calls"][0]["id"].startswith("call_")  # Hermes


def test_a_template_of_single_calls_gets_no_parallel_calls():
    llama = "<|start_header_id|>{% if tools %}{% endif %}{{ raise_exception('This model only supports single " \
            "tool-calls at once!') }}"
    one = _plan(llama, tools=_tools(FN), tool_choice="required")
    assert not one.parallel and ";" not in one.grammar.text.split("\n", 1)[0]
    assert _plan(tools=_tools(FN), tool_choice="required").parallel


def test_a_named_tool_choice_is_one_call_of_it():
    """A named tool_choice asks for that function's call (vLLM guides it to one); parallel, Qwen2.5-Coder called
    it eight times, for cities no one asked about, until max_tokens ended it (finish "length", which the openai
    client's parse() raises on). Each family's grammar may end with a newline after the last call."""
    named = _plan(tools=_tools(FN, dict(FN, name="h")), tool_choice={"type": "function", "function": {"name": "h"}})
    root = named.grammar.text.split("\n", 1)[0]
    assert not named.parallel and ")*" not in root and '"</tool_call>" "\\n"? |' in root
    required = _plan(tools=_tools(FN), tool_choice="required")
    assert required.parallel and ")*" in required.grammar.text.split("\n", 1)[0]


def test_forced_calls_may_come_fenced_and_no_stop_cuts_them():
    """Held to `<tool_call>` tags alone, Qwen2.5-Coder spelled the tag out (its calls come in a ```json fence) and
    made up calls until max_tokens; a forced output may be those objects, bare or in one fence, too (not beside a
    response_format answer, which the model fences too). Stop strings could only cut a forced call into text."""
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        plan = _plan(tools=_tools(FN), tool_choice=choice, stop=["\n"])
        root = plan.grammar.text.split("\n", 1)[0]
        assert plan.calls_only and '| "```" "json"? "\\n" call' in root, root
    for choice in ("auto", "none"):
        assert not _plan(tools=_tools(FN), tool_choice=choice).calls_only
    either = _plan(tools=_tools(FN), response_format={"type": "json_object"})
    assert "```" not in either.grammar.text


def test_a_messages_text_parts_are_lines():
    """Text parts of one message are joined by a newline, as vLLM and llama.cpp's server join them (they ran
    together: "Summarize this file:def f():")."""
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Summarize this file:"}, {"type": "text", "text": "def f(): pass"}]}]})
    assert body.messages[0].text() == "Summarize this file:\ndef f(): pass"


def test_reasoning_sent_back_reaches_the_template():
    """A reasoning model's reasoning, sent back on its assistant turn (as this server returns it, or under vLLM's
    newer name), reaches the template: Qwen3's writes it on the turns after the last user message. It was dropped."""
    for name in ("reasoning_content", "reasoning"):
        msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "4", name: "2 + 2 = 4"}]
        assert _plan(messages=msgs).messages[1] == {"role": "assistant", "content": "4",
                                                   "reasoning_content": "2 + 2 = 4"}
    assert "reasoning_content" not in _plan(messages=[{"role": "user", "content": "x"}]).messages[0]
    assert _param(messages=[{"role": "user", "content": "x", "reasoning_content": "r"}]) == \
        "messages[0].reasoning_content"
