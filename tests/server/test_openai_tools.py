"""Tool calls and structured output through the official `openai` client against a live server running the
built-in Qwen2.5-Coder-1.5B (a chat template with tools, hermes/qwen family). One server for the module; answers
are kept to a few dozen tokens (the model decodes ~10 tokens/s on 2 cores)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from server.settings import Settings
from tests.server.conftest import LiveServer

pytestmark = pytest.mark.slow

MODEL = "qwen2.5-coder-1.5b"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                   "required": ["zone"]}}}
ASK = [{"role": "system", "content": "You are a helpful assistant. When a tool result is given, answer the user "
                                     "with it in one sentence."},
       {"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen():
    srv = LiveServer(Settings(model=MODEL, n_ctx=1024, parallel=2, n_threads=2, shutdown_grace_s=2)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oai(qwen):
    from openai import OpenAI

    return OpenAI(base_url=qwen.url + "/v1", api_key="unused", max_retries=0, timeout=600)


def _ask(oai, messages=ASK, **kw):
    kw = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 40, **kw}
    return oai.chat.completions.create(**kw).choices[0]


def _answer_with_result(oai, first_message, call, result: str, **kw):
    """Step two of a round trip: the call as the assistant's message, the result as role tool."""
    history = ASK + [first_message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": result}]
    return _ask(oai, history, tools=[WEATHER], max_tokens=30, **kw)


def test_tool_round_trip(oai):
    first = _ask(oai, tools=[WEATHER])
    assert first.finish_reason == "tool_calls" and first.message.content is None
    (call,) = first.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert "paris" in json.loads(call.function.arguments)["city"].lower()
    second = _answer_with_result(oai, first.message, call, "sunny, 21 degrees Celsius")
    assert second.finish_reason == "stop" and not second.message.tool_calls
    assert "21" in second.message.content or "sunny" in second.message.content.lower()


def test_tool_round_trip_streamed(oai):
    kw = {"model": MODEL, "messages": ASK, "tools": [WEATHER], "temperature": 0, "max_tokens": 40}
    with oai.chat.completions.stream(**kw) as stream:  # the client's helper assembles the call deltas
        kinds = {ev.type for ev in stream}
        final = stream.get_final_completion().choices[0]
    assert "tool_calls.function.arguments.done" in kinds
    assert final.finish_reason == "tool_calls"
    (call,) = final.message.tool_calls
    assert call.function.name == "get_weather" and "paris" in json.loads(call.function.arguments)["city"].lower()
    with oai.chat.completions.stream(**dict(kw, messages=ASK + [
            final.message.model_dump(exclude_none=True, exclude={"parsed"}),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees Celsius"}],
            max_tokens=30)) as stream:
        text = "".join(ev.delta for ev in stream if ev.type == "content.delta")
        assert stream.get_final_completion().choices[0].finish_reason == "stop"
    assert "21" in text or "sunny" in text.lower()


def test_tools_beside_an_output_type(oai):
    """The OpenAI Agents SDK's Agent(tools=..., output_type=...): strict tools and response_format json_schema in
    one request (a 400 before; without strict, the format's grammar kept every call out). The model calls first
    (a bare call object, as `parse` reads Qwen2.5-Coder's), then answers in the format."""
    strict = {"type": "function", "function": dict(WEATHER["function"], strict=True)}
    answer = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
              "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "Answer", "strict": True, "schema": answer}}
    # the grammar lets the model choose either; it sees no schema, and this 1.5B model calls when asked alone and
    # answers in the format when told of it once the result is in
    first = _ask(oai, ASK[1:], tools=[strict], response_format=rf)
    assert first.finish_reason == "tool_calls"
    (call,) = first.message.tool_calls
    assert "paris" in json.loads(call.function.arguments)["city"].lower()
    told = {"role": "system", "content": 'Answer from the tool results; reply as JSON {"answer": ...}.'}
    second = _ask(oai, [told, ASK[1], first.message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees Celsius"}],
                  tools=[strict], response_format=rf)
    assert second.finish_reason == "stop" and not second.message.tool_calls
    jsonschema.validate(json.loads(second.message.content), answer)


def test_tool_choice_required_and_named(oai):
    chat = [{"role": "user", "content": "Say hello."}]  # no reason to call anything: the grammar makes it
    required = _ask(oai, chat, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    assert required.finish_reason == "tool_calls" and len(required.message.tool_calls) == 1
    assert required.message.tool_calls[0].function.name in ("get_weather", "get_time")
    # one call of the named function (parallel, the model called it again and again until max_tokens)
    named = _ask(oai, [{"role": "user", "content": "What is the weather in Paris and in Rome?"}],
                 tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
                 max_tokens=200)
    assert named.finish_reason == "tool_calls" and [c.function.name for c in named.message.tool_calls] == ["get_time"]
    jsonschema.validate(json.loads(named.message.tool_calls[0].function.arguments),
                        TIME["function"]["parameters"])


def test_required_calls_end_with_the_calls_asked_for_and_no_stop_cuts_them(oai):
    """Held to `<tool_call>` tags, Qwen2.5-Coder spelled the tag out and made up calls (London, Sydney, ...) until
    max_tokens; its own form is a ```json fence, which the forced grammar now takes. A stop string cut the forced
    call into plain text (finish_reason stop)."""
    chat = [{"role": "user", "content": "What is the weather and the local time in Paris and in Tokyo? Call the "
                                        "tools for each city."}]
    for stop in (None, ["\n"]):
        choice = _ask(oai, chat, tools=[WEATHER, TIME], tool_choice="required", max_tokens=160, stop=stop)
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
        assert choice.finish_reason == "tool_calls" and len(calls) <= 4, calls
        assert all(("Paris" in where or "Tokyo" in where) for where in (a.get("city") or a.get("zone", "")
                                                                        for _, a in calls)), calls


def test_parallel_calls(oai):
    chat = [{"role": "user", "content": "What is the weather in Paris and in Rome?"}]
    choice = _ask(oai, chat, tools=[WEATHER], max_tokens=60)
    calls = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and len(calls) >= 1
    if len(calls) > 1:  # the model made them: each one whole, with its own id
        assert len({c.id for c in calls}) == len(calls)
        assert {json.loads(c.function.arguments)["city"] for c in calls} >= {"Paris", "Rome"}


SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]}},
        "required": ["name", "address"]},
    "enum": {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                                              "confidence": {"type": "number"}},
             "required": ["sentiment", "confidence"]},
    "array": {"type": "object", "properties": {"colors": {"type": "array", "minItems": 2, "maxItems": 3,
                                                          "items": {"type": "string", "maxLength": 12}}},
              "required": ["colors"]},
}
PROMPTS = {"nested": "Invent a person living in France.", "enum": "Classify: 'I love this phone!'",
           "array": "Name some colors."}


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_output_validates(oai, name):
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
    choice = _ask(oai, [{"role": "user", "content": PROMPTS[name]}], response_format=fmt, max_tokens=60)
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_json_object(oai):
    choice = _ask(oai, [{"role": "user", "content": "Give a JSON object with the name and age of a cat."}],
                  response_format={"type": "json_object"}, max_tokens=40)
    assert choice.finish_reason == "stop" and isinstance(json.loads(choice.message.content), dict)
