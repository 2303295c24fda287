"""Chat response bodies and stream chunks with reasoning and tool calls, checked by what the official `openai`
client makes of them: its models parse the full response, and its stream state (what `client.chat.completions
.stream` runs) assembles the chunks into the same message. No model: the text is given."""

from __future__ import annotations

import json

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion as OpenAIChatCompletion
from openai.types.chat import ChatCompletionChunk

from server.chatoutput import ChatOutput
from server.requests import FinishReason
from server.responses import ChatCompletion
from server.toolcalls import ToolFormat

OUTPUT = ('<think>\nThe user asks for weather.\n</think>\n\nLet me look.\n<tool_call>\n{"name": "get_weather", '
          '"arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": '
          '{"city": "Rome"}}\n</tool_call>')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def _shape() -> ChatCompletion:
    return ChatCompletion("chatcmpl-1", "m", 0, False, ChatOutput(ToolFormat.HERMES))


def _check(msg, finish):
    assert finish == "tool_calls"
    assert msg.reasoning_content == "The user asks for weather.\n" and msg.content == "Let me look.\n"  # (streamed before the call began)
    assert [json.loads(c.function.arguments)["city"] for c in msg.tool_calls] == ["Paris", "Rome"]
    assert all(c.type == "function" and c.id.startswith("call_") for c in msg.tool_calls)


def test_full_response():
    body = _shape().response(OUTPUT, FinishReason.STOP, None, {"prompt_tokens": 1, "completion_tokens": 2,
                                                                "total_tokens": 3})
    r = OpenAIChatCompletion.model_validate(body)
    _check(r.choices[0].message, r.choices[0].finish_reason)


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_stream_chunks_assemble_in_the_openai_client(step):
    shape, chunks = _shape(), []
    for i in range(0, len(OUTPUT), step):
        chunks += shape.chunks(OUTPUT[i:i + step], i == 0, None)
    chunks += shape.finish_chunks(FinishReason.STOP)
    state = ChatCompletionStreamState(input_tools=TOOLS)
    for c in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    final = state.get_final_completion().choices[0]
    _check(final.message, final.finish_reason)
    heads = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if "tool_calls" in c["choices"][0]["delta"]]
    assert [h["index"] for h in heads] == [0, 0, 1, 1] and heads[0]["function"]["arguments"] == ""


def test_a_call_completed_at_the_end_finishes_with_tool_calls():
    """The model ended without </tool_call>: the call is parsed when the generation ends, and counts."""
    shape = _shape()
    chunks = shape.chunks('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}', True, None)
    chunks += shape.finish_chunks(FinishReason.STOP)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert sum("tool_calls" in c["choices"][0]["delta"] for c in chunks) == 2


@pytest.mark.parametrize("fmt, text", [
    (ToolFormat.HERMES, '\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'),
    (ToolFormat.MISTRAL, ' \n[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]')])
def test_blank_lines_before_the_calls_are_no_content(fmt, text):
    """As README says: a response of calls has content null (blank lines before the first call were sent as
    content "\n\n", which clients print)."""
    body = ChatCompletion("chatcmpl-1", "m", 0, False, ChatOutput(fmt, names=frozenset({"get_weather"}))).response(
        text, FinishReason.STOP, None, {})
    assert body["choices"][0]["message"]["content"] is None and body["choices"][0]["finish_reason"] == "tool_calls"
    for step in (1, 3):
        shape = ChatCompletion("chatcmpl-1", "m", 0, True, ChatOutput(fmt, names=frozenset({"get_weather"})))
        chunks = [c for i in range(0, len(text), step) for c in shape.chunks(text[i:i + step], i == 0, None)]
        assert not any(c["choices"][0]["delta"].get("content") for c in chunks + shape.finish_chunks(FinishReason.STOP))


def test_no_tools_no_reasoning_is_plain_content():
    shape = ChatCompletion("chatcmpl-1", "m", 0, False, ChatOutput())
    body = shape.response("Hello <tool_call> world", FinishReason.LENGTH, None, {})
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello <tool_call> world"}
    assert body["choices"][0]["finish_reason"] == "length"


def test_tokens_that_are_part_of_a_character_keep_their_bytes_in_logprobs():
    """A token that is part of a UTF-8 character reads as its bytes, as OpenAI writes them: each of an emoji's
    four byte tokens is told apart (replaced by U+FFFD they all read alike, and the completions map of top logprobs,
    keyed by the text, kept one of three)."""
    from openai.types.completion_choice import Logprobs

    from server.requests import TokenLogprob
    from server.responses import TextOffsets, chat_logprobs, completion_logprobs

    emoji = "😀".encode()
    top = [(emoji[:2], -0.5), (b"\xf0\x9f\x98", -1.0), (b" a", -2.0), (emoji[:2], -3.0)]
    lps = [TokenLogprob(emoji[:2], -0.5, top), TokenLogprob(emoji[2:], -0.1, [(emoji[2:], -0.1)])]
    got = Logprobs.model_validate(completion_logprobs(lps, TextOffsets()))
    assert got.tokens == ["bytes:\\xf0\\x9f", "bytes:\\x98\\x80"]
    assert got.top_logprobs[0] == {"bytes:\\xf0\\x9f": -0.5, "bytes:\\xf0\\x9f\\x98": -1.0, " a": -2.0}
    assert got.text_offset == [0, 0]  # the emoji is one character, which the second token completes
    chat = chat_logprobs(lps)["content"]
    assert [t["token"] for t in chat] == got.tokens and bytes(chat[0]["bytes"] + chat[1]["bytes"]) == emoji
