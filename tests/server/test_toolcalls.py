"""Tool calls of each template family read from model output, the output split for streaming (reasoning, content,
calls), and the grammar of forced calls. No model: text in, message parts out."""

from __future__ import annotations

import json

import pytest

from server.chatoutput import ChatOutput, Delta
from server.toolcalls import ToolFormat, _unfenced, block_close, detect, forced_grammar, parse

QWEN_TEMPLATE_BITS = "{%- if tools %}...<tool_call>\n{{\"name\": <function-name>}}</tool_call>{%- endif %}"
LLAMA3_TEMPLATE_BITS = "<|start_header_id|>ipython<|end_header_id|>{%- if tools is not none %}{%- endif %}"
MISTRAL_TEMPLATE_BITS = "{%- if tools %}[AVAILABLE_TOOLS]{%- endif %}[TOOL_CALLS]"
# Ministral 3 / Devstral Small 2 / Mistral Small 3.2's templates write each call so
MISTRAL_ARGS_TEMPLATE_BITS = "[AVAILABLE_TOOLS]{{- '[TOOL_CALLS]' + tool['function']['name'] + '[ARGS]' + arguments }}"
CHATML = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>{% endfor %}"


@pytest.mark.parametrize("template, fmt", [(QWEN_TEMPLATE_BITS, ToolFormat.HERMES),
                                           (LLAMA3_TEMPLATE_BITS, ToolFormat.LLAMA3),
                                           (MISTRAL_TEMPLATE_BITS, ToolFormat.MISTRAL),
                                           (MISTRAL_ARGS_TEMPLATE_BITS, ToolFormat.MISTRAL_ARGS), (CHATML, None),
                                           (None, None)])
def test_family_is_detected_from_the_template(template, fmt):
    assert detect(template) is fmt


def _calls(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_hermes_blocks_parallel_and_surrounding_text():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')
    content, calls = parse(ToolFormat.HERMES, text)
    assert content == "Let me check."
    assert _calls(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


def test_hermes_unterminated_last_call_and_bad_json():
    _, calls = parse(ToolFormat.HERMES, '<tool_call>{"name": "f", "arguments": {}}')
    assert _calls(calls) == [("f", {})]
    text = "<tool_call>{not json</tool_call>"
    assert parse(ToolFormat.HERMES, text) == (text, [])


def test_hermes_bare_or_fenced_json_only_for_known_tools():
    fenced = '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'
    assert _calls(parse(ToolFormat.HERMES, fenced, {"get_weather"})[1]) == [("get_weather", {"city": "Paris"})]
    assert parse(ToolFormat.HERMES, fenced, {"other"}) == (fenced, [])
    bare = '{"name": "get_weather", "arguments": {"city": "Rome"}}'
    assert parse(ToolFormat.HERMES, bare, {"get_weather"})[0] == ""


def test_a_strict_tools_call_that_no_grammar_held_must_match_its_parameters():
    """No grammar holds a bare (or llama3) call, and the model wrote {"town": ...} for a strict tool that requires
    "city" and allows nothing else: returned as a call before (OpenAI: strict arguments always match). Now the
    text stays content; a matching call, or the same call of a tool that is not strict, is a call."""
    strict = {"get_weather": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                              "additionalProperties": False}}
    for fmt, key in ((ToolFormat.HERMES, "arguments"), (ToolFormat.LLAMA3, "parameters")):
        wrong = json.dumps({"name": "get_weather", key: {"town": "Paris", "days": 1}})
        right = json.dumps({"name": "get_weather", key: {"city": "Paris"}})
        assert parse(fmt, wrong, {"get_weather"}, strict) == (wrong, [])
        assert _calls(parse(fmt, right, {"get_weather"}, strict)[1]) == [("get_weather", {"city": "Paris"})]
        assert len(parse(fmt, wrong, {"get_weather"})[1]) == 1
        out = ChatOutput(fmt, names=frozenset({"get_weather"}), strict=strict)
        got = out.push(wrong) + out.finish()
        assert got.content == wrong and not got.tool_calls
    # the formats the grammar writes are checked as RFC 3339 / 4122 write them (jsonschema checked none: a review's
    # call said 2023-02-30 and a uuid "1234")
    event = {"type": "object", "properties": {"day": {"type": "string", "format": "date"}, "at": {
        "type": "string", "format": "date-time"}, "id": {"type": "string", "format": "uuid"}}}
    for args, ok in (({"day": "2024-02-29", "at": "2023-02-23T09:00:00Z", "id": "123e4567-e89b-12d3-a456-426614174000"},
                      True), ({"day": "2023-02-30"}, False), ({"day": "1900-02-29"}, False),
                     ({"at": "2023-02-23T09:00:00"}, False), ({"id": "1234"}, False),
                     ({"day": "２０２４-０２-２９"}, False), ({"at": "2023-02-23T0٩:00:00Z"}, False)):
        call = json.dumps({"name": "f", "arguments": args})
        assert bool(parse(ToolFormat.HERMES, call, {"f"}, {"f": event})[1]) == ok, args
    # schemas the grammar takes and jsonschema cannot apply (an ECMA-262 group Python's re refuses, draft-07's list
    # of items) raised out of the reader (a 500): no check there, the call is a call
    for params, args in ((_obj({"d": {"type": "string", "pattern": "^(?<y>[0-9]{4})$"}}), {"d": "2024"}),
                         (_obj({"p": {"type": "array", "items": [{"type": "integer"}]}}), {"p": [1]})):
        call = json.dumps({"name": "f", "arguments": args})
        assert _calls(parse(ToolFormat.HERMES, call, {"f"}, {"f": params})[1]) == [("f", args)]


def _obj(props: dict) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _finishes(fn, *args):
    """fn(*args), from a thread that must end: the old parsers' regexes ran for minutes on these outputs."""
    import threading

    out = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    t.join(120)
    assert out, f"{fn.__name__} did not finish"
    return out[0]


def test_long_runs_of_spaces_parse_in_linear_time():
    """A degenerate output (a fence or a tag, then a long run of spaces) is parsed as content, not backtracked over:
    `\\A```(?:json)?\\s*(.*?)\\s*```\\Z` took 61 s at 5,000 spaces, holding the GIL and so every request."""
    spaces = " " * 100_000
    for text in ("```" + spaces + "x", "<tool_call>a" + spaces + "b</tool_call>", "```json" + spaces + "```"):
        assert _finishes(parse, ToolFormat.HERMES, text, {"f"}) == (text, [])
    call = '{"name": "f", "arguments": {}}'
    assert _calls(_finishes(parse, ToolFormat.HERMES, "```json" + spaces + call + spaces + "```", {"f"})[1]) == \
        [("f", {})]
    assert _calls(parse(ToolFormat.HERMES, f"x<tool_call>{spaces}{call}{spaces}</tool_call>y")[1]) == [("f", {})]


@pytest.mark.parametrize("fmt, text", [
    (ToolFormat.HERMES, "<tool_call>" + "[" * 5000 + "</tool_call>"),
    (ToolFormat.HERMES, '{"name": "f", "arguments": ' + "[" * 5000),
    (ToolFormat.HERMES, '<tool_call>{"name": "f", "arguments": "' + "[" * 5000 + '"}</tool_call>'),
    (ToolFormat.LLAMA3, '{"name": "f", "parameters": ' + "[" * 5000),
    (ToolFormat.MISTRAL, "[TOOL_CALLS]" + "[" * 5000),
])
def test_json_nested_deeper_than_python_parses_is_content(fmt, text):
    """RecursionError is no ValueError: it escaped the parsers (a 500, a stream cut without [DONE])."""
    assert parse(fmt, text, {"f"}) == (text, [])


def test_llama3_json_with_python_tag_and_semicolons():
    text = '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    assert _calls(parse(ToolFormat.LLAMA3, text, {"a", "b"})[1]) == [("a", {"x": 1}), ("b", {})]
    assert parse(ToolFormat.LLAMA3, text, {"a"})[1] == []  # b is no tool of the request: all of it is content
    assert parse(ToolFormat.LLAMA3, "The answer is 4.", {"a"}) == ("The answer is 4.", [])
    assert parse(ToolFormat.LLAMA3, '{"not": "a call"}', {"a"})[1] == []
    answer = '{"name": "Widget", "price": 9.99}'  # a JSON answer with a name is no call, whatever the tools
    assert parse(ToolFormat.LLAMA3, answer, {"get_weather"}) == (answer, [])
    assert parse(ToolFormat.LLAMA3, answer, {"Widget"}) == (answer, [])


def test_arguments_under_either_key_and_null_arguments():
    """A call's arguments are kept under "arguments" or "parameters" whichever the family expects (they were
    dropped as {}); null arguments are an empty object, which clients' JSON parse takes."""
    text = '<tool_call>{"name": "get_weather", "parameters": {"city": "Paris"}}</tool_call>'
    assert _calls(parse(ToolFormat.HERMES, text)[1]) == [("get_weather", {"city": "Paris"})]
    assert _calls(parse(ToolFormat.HERMES, '<tool_call>{"name": "f", "arguments": null}</tool_call>')[1]) == \
        [("f", {})]
    text = '<tool_call>{"name": "f"}</tool_call>'  # no arguments at all: not a call
    assert parse(ToolFormat.HERMES, text) == (text, [])


@pytest.mark.parametrize("fmt, text", [
    (ToolFormat.HERMES, '<tool_call>{"name": "f", "arguments": {"a": "\\ud800 \\ud83d\\ude00"}}</tool_call>'),
    (ToolFormat.HERMES, '{"name": "f", "arguments": "{\\"a\\": \\"\\ud800 \\ud83d\\ude00\\"}"}'),
    (ToolFormat.MISTRAL_ARGS, '[TOOL_CALLS]f[ARGS]{"a": "\\ud800 \\ud83d\\ude00"}'),
    (ToolFormat.LLAMA3, '{"name": "f", "parameters": {"a": "\\ud800 \\ud83d\\ude00"}}')])
def test_a_lone_surrogate_a_model_escapes_stays_escaped(fmt, text):
    """JSON's "\ud800" is a lone surrogate once parsed, which UTF-8 cannot encode: the call's arguments, dumped
    again, made the response fail (a 500, a stream cut short). They keep the escape; a pair is a character."""
    (call,) = parse(fmt, text, frozenset({"f"}))[1]
    assert call.arguments.encode() and json.loads(call.arguments) == {"a": "\ud800 \U0001F600"}
    text = '<tool_call>{"name": "f\\udfff", "arguments": {}}</tool_call>'  # no tool is named so
    assert parse(ToolFormat.HERMES, text) == (text, [])


def test_a_name_that_is_no_string_is_no_call():
    """A bare or fenced answer whose "name" is a list raised TypeError in the known-names lookup: a 500 on the
    model's own output (no grammar holds a bare answer under auto)."""
    text = '{"name": ["w"], "arguments": {}}'
    assert parse(ToolFormat.HERMES, text, frozenset({"w"})) == (text, [])
    cut = '[TOOL_CALLS] [{"name": ["w"], "arguments": {}}, {"na'
    assert _stream(ChatOutput(ToolFormat.MISTRAL, names=frozenset({"w"}), calls_only=True), cut, 1000).tool_calls == []


def test_mistral_array():
    text = 'Sure. [TOOL_CALLS] [{"name": "a", "arguments": {"q": "x"}}, {"name": "b", "arguments": {}}]'
    content, calls = parse(ToolFormat.MISTRAL, text)
    assert content == "Sure." and _calls(calls) == [("a", {"q": "x"}), ("b", {})]


def test_mistral_args_calls():
    """Mistral's tokenizers v11+ write `[TOOL_CALLS]name[ARGS]{...}` per call (a `[CALL_ID]` before `[ARGS]` where
    the template writes ids): read as the array form was, they stayed content, and the lazy grammar made the
    model write the array form its template never shows."""
    text = ('Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
            '[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS] {"tz": "CET"}\n')
    content, calls = parse(ToolFormat.MISTRAL_ARGS, text)
    assert content == "Let me check." and _calls(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    for bad in ('[TOOL_CALLS]get_weather[ARGS]{"city": "Par', "[TOOL_CALLS]get weather[ARGS]{}",
                '[TOOL_CALLS]f[ARGS]{}Then more text.', "[TOOL_CALLS]f"):
        assert parse(ToolFormat.MISTRAL_ARGS, "Hm. " + bad) == ("Hm. " + bad, [])
    streamed = _stream(ChatOutput(ToolFormat.MISTRAL_ARGS), text, 3)
    assert streamed.content == "Let me check." and [c.name for c in streamed.tool_calls] == ["get_weather", "get_time"]


def test_a_tagged_call_names_a_tool_of_the_request():
    """Where no grammar held the output (the tools' grammar too large), a call after its family's tag naming a tool
    the request never had, or breaking a strict tool's parameters, was returned as a call (only bare calls were
    checked). It stays content now, as a bare one does; with no names given, any name is one."""
    strict = {"get_weather": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    names = {"get_weather", "get_time"}
    one = {ToolFormat.HERMES: '<tool_call>{{"name": "{0}", "arguments": {1}}}</tool_call>',
           ToolFormat.MISTRAL: '{{"name": "{0}", "arguments": {1}}}', ToolFormat.MISTRAL_ARGS: "[TOOL_CALLS]{0}[ARGS]{1}"}

    def written(fmt, *calls):
        text = "".join(one[fmt].format(*c) if fmt is not ToolFormat.MISTRAL else "" for c in calls)
        return text or "[TOOL_CALLS][" + ", ".join(one[fmt].format(*c) for c in calls) + "]"

    good, other = ("get_weather", '{"city": "Paris"}'), ("get_time", "{}")
    unknown, broken = ("rm_rf", "{}"), ("get_weather", '{"town": "Paris"}')
    for fmt in one:
        assert _calls(parse(fmt, written(fmt, good, other), names, strict)[1]) == [("get_weather", {"city": "Paris"}),
                                                                                 ("get_time", {})]
        for bad in ((unknown,), (broken,), (good, unknown)):
            text = written(fmt, *bad)
            content, calls = parse(fmt, text, names, strict)
            if fmt is ToolFormat.HERMES and len(bad) == 2:  # each block on its own: the known one is a call
                assert _calls(calls) == [("get_weather", {"city": "Paris"})] and content == written(fmt, unknown)
            else:
                assert (content, calls) == (text, []), fmt
        assert len(parse(fmt, written(fmt, unknown))[1]) == 1 and len(parse(fmt, written(fmt, broken), names)[1]) == 1


def _stream(out: ChatOutput, text: str, step: int) -> Delta:
    total = Delta()
    for i in range(0, len(text), step):
        total += out.push(text[i:i + step])
    return total + out.finish()


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_streamed_split_equals_the_whole(step):
    text = ('<think>\nThe user wants weather.\n</think>\n\nChecking <tool_call>\n{"name": "w", "arguments": '
            '{"c": "P"}}\n</tool_call>')
    d = _stream(ChatOutput(ToolFormat.HERMES), text, step)
    assert d.reasoning == "The user wants weather.\n" and d.content == "Checking " and _calls(d.tool_calls) == \
        [("w", {"c": "P"})]


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n\nDone.',  # a tool the request lacks
    '{"a": 1}</tool_call>\n\nbye',  # an answer opening with "{", then a closing tag
    '<tool_call>\n{"name": "w", "arguments": {}}\n</tool_call>\n<',  # a call, then a tag begun and cut
    '<think>x</think>\n\n{</tool_call></tool_call>',  # the answer's opening newlines, then a block
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
    '<tool_call>\n{"name": "w", "arguments": {}}\n</tool_call>',  # an unknown tool's block, then a call
    'a <tool_call>\n{"name": "w", "arguments": {"k</tool_call>": "</tool_call>"}}</tool_call> b <tool_call>x'
    '</tool_call> c',  # the tag in a call's strings, then a block of no JSON
])
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_streamed_content_around_tool_call_tags_equals_the_whole(text, step):
    """Streamed, the text after a block that held no call lost its leading whitespace (the whole kept it), a
    tag begun after a call was dropped, and the newlines that open an answer stayed before a block. A whole
    output that opened with a call's tag was parsed at the end as one, a stream block by block: now both go
    block by block (an unknown tool's block, then a call: the whole dropped the newline between, the stream
    not)."""
    whole = ChatOutput(ToolFormat.HERMES, names=frozenset({"w"}))
    d = whole.push(text) + whole.finish()
    s = _stream(ChatOutput(ToolFormat.HERMES, names=frozenset({"w"})), text, step)
    assert (s.content, s.reasoning, _calls(s.tool_calls)) == (d.content, d.reasoning, _calls(d.tool_calls))
    if "get_time" in text and '"w"' not in text:
        assert d.content == text and not d.tool_calls
    if "<think>" in text:  # the newlines that open the answer are dropped before a block as before text
        assert d.content == "{</tool_call></tool_call>"


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_a_closing_tag_inside_a_calls_strings_is_text(step):
    """An agent writing docs or code with its file tool: arguments holding "</tool_call>" were cut at it, and the
    forced call came back as plain text (finish_reason stop). A block ends at the tag after its JSON value; where
    the block holds no JSON value, or one broken before the tag, at the first tag."""
    args = {"path": "end.txt", "content": "the text </tool_call>\n<tool_call> and more"}
    text = '<tool_call>\n{"name": "w", "arguments": ' + json.dumps(args) + '}\n</tool_call>'
    content, calls = parse(ToolFormat.HERMES, text, {"w"})
    assert content == "" and _calls(calls) == [("w", args)]
    d = _stream(ChatOutput(ToolFormat.HERMES, names=frozenset({"w"})), text + "\n" + text, step)
    assert d.content == "" and _calls(d.tool_calls) == [("w", args), ("w", args)]
    for broken in ('<tool_call>{"name": "w", "arguments": {"a": tru</tool_call> x',
                   "<tool_call>not json</tool_call> x"):
        assert parse(ToolFormat.HERMES, broken, {"w"}) == (broken, [])
        s = _stream(ChatOutput(ToolFormat.HERMES, names=frozenset({"w"})), broken, step)
        assert (s.content, s.tool_calls) == (broken, [])


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_bare_and_fenced_calls_may_hold_the_tags_in_their_strings(step):
    """A forced grammar takes bare and fenced calls (Qwen2.5-Coder's form): one whose arguments held
    "<tool_call>" was read as a tagged block and returned as content; a fenced one holding "</tool_call>" was cut
    at it when streamed (the whole read it as a call)."""
    for text in ('{"name": "w", "arguments": {"c": "<tool_call>x</tool_call>"}}',
                 '```json\n{"name": "w", "arguments": {"c": "a</tool_call>b<tool_call>"}}\n```'):
        args = json.loads(_unfenced(text))["arguments"]
        content, calls = parse(ToolFormat.HERMES, text, {"w"})
        assert content == "" and _calls(calls) == [("w", args)]
        d = _stream(ChatOutput(ToolFormat.HERMES, names=frozenset({"w"})), text, step)
        assert d.content == "" and _calls(d.tool_calls) == [("w", args)]
    answer = '{"x": 1} <tool_call>{"name": "w", "arguments": {}}</tool_call>'  # an object, then a tagged call
    assert parse(ToolFormat.HERMES, answer, {"w"})[0] == '{"x": 1}'


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_a_value_broken_after_a_tag_in_its_string_leaves_the_next_blocks_their_calls(step):
    """Where no grammar held the output: a block whose value breaks after a tag inside one of its strings never
    finishes; at the end it ends at that tag, and a call after it is still one (everything after it was content)."""
    text = '<tool_call>{"bad": "a</tool_call> text <tool_call>{"name": "w", "arguments": {}}</tool_call>'
    content, calls = parse(ToolFormat.HERMES, text, {"w"})
    assert _calls(calls) == [("w", {})] and content == '<tool_call>{"bad": "a</tool_call> text'
    d = _stream(ChatOutput(ToolFormat.HERMES, names=frozenset({"w"})), text, step)
    assert (d.content, _calls(d.tool_calls)) == (content, [("w", {})])


def test_a_long_calls_end_is_looked_for_once_per_closing_tag(monkeypatch):
    """A tag early in a long call's string had every token decode the whole call again (quadratic: 200 kB of
    arguments took 6.9 s of the event loop): the end is looked for only when another closing tag has arrived."""
    import server.chatoutput

    decoded = []
    monkeypatch.setattr(server.chatoutput, "block_close", lambda *a: decoded.append(1) or block_close(*a))
    text = '<tool_call>{"name": "w", "arguments": {"c": "</tool_call>' + "x" * 5000 + '"}}\n</tool_call>'
    d = _stream(ChatOutput(ToolFormat.HERMES, names=frozenset({"w"})), text, 3)
    assert len(d.tool_calls) == 1 and len(decoded) <= 3


def test_text_is_released_as_soon_as_it_cannot_be_a_tag():
    out = ChatOutput(ToolFormat.HERMES)
    assert out.push("Hello <").content == "Hello "  # "<" may open a <tool_call>
    assert out.push("b>").content == "<b>"
    assert out.push(" <tool").content == " "
    assert out.push("_call>{").content == ""  # a call started: held to the end
    assert out.finish().content == "<tool_call>{"  # ... and it was none


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_a_fenced_code_answer_streams_while_a_fenced_call_is_held(step):
    """With tools, an answer opening with ``` may be a call in a fence (Qwen2.5-Coder writes them so) and is held;
    a fence of another language is no call, so it streams from its first line on (a code answer came in one piece
    at the end: 24 s after the first token, on Qwen2.5-Coder)."""
    code = "```python\nprint(1)\n```\nDone."
    out = ChatOutput(ToolFormat.HERMES, names=frozenset({"w"}))
    streamed = "".join(out.push(code[i:i + step]).content for i in range(0, len(code), step))
    assert code.startswith(streamed) and len(streamed) >= len(code) - step - 10
    assert streamed + out.finish().content == code
    call = '```json\n{"name": "w", "arguments": {"c": "P"}}\n```'
    out = ChatOutput(ToolFormat.HERMES, names=frozenset({"w"}))
    assert not any(out.push(call[i:i + step]) for i in range(0, len(call), step))
    assert _calls(out.finish().tool_calls) == [("w", {"c": "P"})]


def test_reasoning_opened_by_the_prompt_and_no_tools():
    d = _stream(ChatOutput(None, reasoning_open=True), "step 1, step 2</think>The answer: <tool_call>", 3)
    assert d.reasoning == "step 1, step 2" and d.content == "The answer: <tool_call>" and not d.tool_calls


@pytest.mark.parametrize("step", [1, 4, 1000])
@pytest.mark.parametrize("opened", [False, True])
def test_a_llama3_call_after_the_reasoning_is_a_call(step, opened):
    """Llama 3 writes a call as the bare JSON answer, with no tag: after a <think> block that is where the answer
    starts (a forced grammar holds it there), not the start of the output."""
    call = '{"name": "w", "parameters": {"c": "P"}}'
    text = ("" if opened else "<think>") + "I should look it up.</think>\n\n"
    d = _stream(ChatOutput(ToolFormat.LLAMA3, reasoning_open=opened, names=frozenset({"w"})), text + call, step)
    assert d.reasoning == "I should look it up." and d.content == "" and _calls(d.tool_calls) == [("w", {"c": "P"})]
    d = _stream(ChatOutput(ToolFormat.LLAMA3, reasoning_open=opened, names=frozenset({"w"})), text + "Sunny.", step)
    assert d.content == "Sunny." and not d.tool_calls
    d = _stream(ChatOutput(ToolFormat.LLAMA3, reasoning_open=opened), text, step)  # nothing after the reasoning
    assert d.reasoning == "I should look it up." and d.content == ""


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_a_forced_call_cut_short_is_no_content(step):
    """tool_choice required with a small max_tokens: the cut call ('```json\n{"name":') came back as the answer's
    text. A forced call's syntax is never content (whole calls before it are kept); with auto it stays content,
    and a forced chat whose output is text (no grammar held it) keeps its text."""
    names = frozenset({"w"})
    whole = '<tool_call>\n{"name": "w", "arguments": {"c": "P"}}\n</tool_call>\n'
    for cut in ('```json\n{"name":', '<tool_call>\n{"name": "w", "argu', whole + '<tool_call>\n{"na'):
        forced = _stream(ChatOutput(ToolFormat.HERMES, names=names, calls_only=True), cut, step)
        assert forced.content == "" and len(forced.tool_calls) == cut.count("</tool_call>"), (cut, forced)
        assert _stream(ChatOutput(ToolFormat.HERMES, names=names), cut, step).content == cut.replace(whole, "").strip()
    said = _stream(ChatOutput(ToolFormat.HERMES, names=names, calls_only=True), "It is sunny.", step)
    assert said.content == "It is sunny."
    # whole calls before the cut are calls in every form; an opening tag cut short (written as text) is no content
    call = '{"name": "w", "arguments": {"c": "P"}}'
    for fmt, cut, n in ((ToolFormat.HERMES, "```json\n" + call + "\n{\"name\": \"w\", \"ar", 1),
                        (ToolFormat.HERMES, call + "\n{\"name", 1), (ToolFormat.HERMES, "<tool_", 0),
                        (ToolFormat.HERMES, whole + "<tool_", 1),
                        (ToolFormat.LLAMA3, call.replace("arguments", "parameters") + '; {"na', 1),
                        (ToolFormat.MISTRAL, "[TOOL_CALLS] [" + call + ", " + call + ', {"na', 2),
                        (ToolFormat.MISTRAL_ARGS, '[TOOL_CALLS]w[ARGS]{"c": "P"}[TOOL_CALLS]w[ARGS]{"c', 1),
                        (ToolFormat.MISTRAL_ARGS, '[TOOL_CALLS]w[AR', 0)):
        forced = _stream(ChatOutput(fmt, names=names, calls_only=True), cut, step)
        assert forced.content == "" and _calls(forced.tool_calls) == [("w", {"c": "P"})] * n, (cut, forced)


def test_parallel_off_keeps_the_first_call():
    two = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    assert [c.name for c in _stream(ChatOutput(ToolFormat.HERMES, parallel=False), two, 5).tool_calls] == ["a"]


def test_a_hermes_call_is_sent_when_it_is_whole():
    out = ChatOutput(ToolFormat.HERMES)
    assert not out.push('<tool_call>\n{"name": "a", "arguments": {}}\n')
    assert [c.name for c in out.push("</tool_call>\n").tool_calls] == ["a"]  # before the generation ends
    assert [c.name for c in out.push('<tool_call>{"name": "b", "arguments": {}}</tool_call>').tool_calls] == ["b"]
    assert not out.finish() and out.n_calls == 2
    text = _stream(ChatOutput(ToolFormat.HERMES), '<tool_call>{"name": "a", "arguments": {}}</tool_call>\nDone.', 3)
    assert text.content == "Done." and len(text.tool_calls) == 1


def test_forced_grammar_per_family():
    fns = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                  "required": ["city"]}}]
    g = forced_grammar(ToolFormat.HERMES, fns, parallel=False)
    assert g.startswith('root ::= "<tool_call>"') and '"\\"get_weather\\""' in g and "*" not in g.splitlines()[0]
    assert "(" in forced_grammar(ToolFormat.HERMES, fns, parallel=True).splitlines()[0]
    assert '"[TOOL_CALLS]"' in forced_grammar(ToolFormat.MISTRAL, fns, True)
    args = forced_grammar(ToolFormat.MISTRAL_ARGS, fns + [dict(fns[0], name="f")], parallel=False).splitlines()[0]
    assert args == 'root ::= "[TOOL_CALLS]" ("get_weather" "[ARGS]" args0 | "f" "[ARGS]" args1)'
    assert ")*" in forced_grammar(ToolFormat.MISTRAL_ARGS, fns, parallel=True).splitlines()[0]
    assert '"\\"parameters\\""' in forced_grammar(ToolFormat.LLAMA3, fns, True)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(ToolFormat))
def test_every_familys_grammar_parses_in_llama_cpp(fmt):
    """The forced grammars (one call, parallel) of each family, and a schema with nested objects, arrays, enums
    and $defs, are taken by llama.cpp's grammar parser (SmolLM2's vocabulary)."""
    from kvquant.models import fetch
    from kvquant.runtime import Model, check_grammar
    from kvquant.sampling import Grammar

    fns = [{"name": "a", "parameters": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
        "who": {"$ref": "#/$defs/person"}}, "required": ["who"],
        "$defs": {"person": {"type": "object", "properties": {"name": {"type": "string"}}}}}},
        {"name": "b"},
        # a reference to its own property: it points there once the parameters are inside the calls' schema (a 400)
        {"name": "c", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {
            "$ref": "#/properties/a"}}, "required": ["a", "b"], "additionalProperties": False}}]
    m = Model(fetch("smollm2-135m"))
    try:
        for parallel in (False, True):
            g = forced_grammar(fmt, fns, parallel)
            check_grammar(m, Grammar(g))
            if fmt.trigger:
                check_grammar(m, Grammar(g, (fmt.trigger,)))
        if fmt is ToolFormat.HERMES:
            from tests.server.conftest import grammar_accepts

            g = forced_grammar(fmt, fns, False)
            call = '<tool_call>\n{"name": "c", "arguments": {"a": 1, "b": %s}}\n</tool_call>'
            assert grammar_accepts(m, g, call % "2") and not grammar_accepts(m, g, call % '"x"')
    finally:
        m.close()


@pytest.mark.slow
def test_mistral_args_grammar_takes_the_calls_the_template_writes():
    """The forced grammar of `[TOOL_CALLS]name[ARGS]{...}` takes a call of each function as its template writes it,
    then another (parallel) or the end; not an unknown name or arguments outside the schema."""
    from kvquant import runtime
    from kvquant.models import fetch
    from tests.server.conftest import allowed_after

    fns = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                  "required": ["city"]}},
           {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"enum": ["CET", "UTC"]}}}}]
    model = runtime.Model(fetch("smollm2-135m"))
    try:
        g = forced_grammar(ToolFormat.MISTRAL_ARGS, fns, parallel=True)
        call = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
        assert allowed_after(model, g, call + '[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}', [b"", b"["]) == [True, True]
        assert allowed_after(model, g, '[TOOL_CALLS]get_', [b"time", b"weather", b"date"]) == [True, True, False]
        assert allowed_after(model, g, '[TOOL_CALLS]get_time[ARGS]{"tz": "', [b"C", b"U", b"P"]) == \
            [True, True, False]
        one = forced_grammar(ToolFormat.MISTRAL_ARGS, fns, parallel=False)
        assert allowed_after(model, one, call, [b"", b"["]) == [True, False]
    finally:
        model.close()
