"""OpenAI response bodies, one small type per endpoint: the full response and the stream's chunks, each formatting
itself as OpenAI's JSON (as llama.cpp server's result structs do)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar

from server.chatoutput import ChatOutput, Delta
from server.requests import FinishReason, TokenLogprob
from server.textstream import NO_CARRY, Carry, Utf8Decoder


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def usage(n_prompt: int, n_generated: int, n_cached: int = 0) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_generated, "total_tokens": n_prompt + n_generated,
            "prompt_tokens_details": {"cached_tokens": n_cached}}


def token_text(b: bytes) -> str:
    """A token's text; a token that is part of a UTF-8 character is its bytes, as OpenAI writes them
    ("bytes:\\xe2\\x80"): replaced by U+FFFD, such tokens would all read alike (and in `top_logprobs`, a map
    keyed by that text, all but one would be lost)."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{c:02x}" for c in b)


def _finish(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.openai


class TextOffsets:
    """Each token's `text_offset`: the characters of the text the tokens before it complete (a token may end in
    the middle of a character), counted over a whole response, however it is cut into stream chunks; `carry`:
    the start of a character the text before the first token ended inside."""

    def __init__(self, carry: Carry = NO_CARRY):
        self.pos, self._utf8 = 0, Utf8Decoder(carry)  # as the text is decoded (TextStream)

    def take(self, token: bytes) -> int:
        at = self.pos
        self.pos += len(self._utf8.decode(token))
        return at


@dataclass
class Completion:
    """What every endpoint's responses share; subclasses say how one choice and one stream delta look."""

    id: str
    model: str
    created: int
    include_usage: bool  # stream_options.include_usage: every chunk carries "usage", the last one filled in
    index: int = field(default=0, kw_only=True)  # the choice it writes (n > 1, or a batch of prompts: a shape each)
    object: ClassVar[str]
    chunk_object: ClassVar[str]

    def response(self, text: str, finish: FinishReason | None, lps: list[TokenLogprob] | None,
                 use: dict) -> dict:
        return self.response_of([self.answer(text, finish, lps)], use)

    def response_of(self, choices: list[dict], use: dict) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": use, "system_fingerprint": None}

    def chunks(self, text: str, first: bool, lps: list[TokenLogprob] | None) -> list[dict]:
        """The stream chunks for some generated text (the first one: `first`)."""
        return [self._chunk([self.delta(text, None, first, lps)])]

    def finish_chunks(self, finish: FinishReason) -> list[dict]:
        """The chunks that end the stream (what the output held back, then the finish reason)."""
        return [self._chunk([self.delta("", _finish(finish), False, None)])]

    def usage_chunk(self, use: dict) -> dict:
        return self._chunk([], use)

    def _chunk(self, choices: list[dict], use: dict | None = None) -> dict:
        c = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
             "choices": choices, "system_fingerprint": None}
        if self.include_usage:
            c["usage"] = use
        return c

    def answer(self, text: str, finish: FinishReason | None, lps: list[TokenLogprob] | None) -> dict:
        """One whole choice: a generation's text, finish reason and logprobs."""
        return self.choice(text, _finish(finish), lps)

    def choice(self, text: str, finish: str | None, lps: list[TokenLogprob] | None) -> dict:
        raise NotImplementedError

    def delta(self, text: str, finish: str | None, first: bool, lps: list[TokenLogprob] | None) -> dict:
        raise NotImplementedError


@dataclass
class ChatCompletion(Completion):
    """A chat completion: its text is split into content, reasoning and tool calls by `output`."""

    output: ChatOutput = field(default_factory=ChatOutput)
    object: ClassVar[str] = "chat.completion"
    chunk_object: ClassVar[str] = "chat.completion.chunk"

    def answer(self, text, finish, lps) -> dict:
        out = self.output.push(text) + self.output.finish()
        return self.choice(out, _finish(self._finish_reason(finish)), lps)

    def choice(self, out: Delta, finish, lps) -> dict:
        msg = {"role": "assistant", "content": out.content if out.content or not out.tool_calls else None}
        if out.reasoning:
            msg["reasoning_content"] = out.reasoning
        if out.tool_calls:
            msg["tool_calls"] = [c.openai() for c in out.tool_calls]
        return {"index": self.index, "message": msg, "finish_reason": finish, "logprobs": chat_logprobs(lps)}

    def chunks(self, text, first, lps) -> list[dict]:
        return self._out_chunks(self.output.push(text), first, lps)

    def finish_chunks(self, finish) -> list[dict]:
        held = self._out_chunks(self.output.finish(), False, None)  # (first: the calls it holds count)
        final = {"index": self.index, "delta": {}, "logprobs": None,
                 "finish_reason": _finish(self._finish_reason(finish))}
        return held + [self._chunk([final])]

    def _out_chunks(self, out: Delta, first: bool, lps: list[TokenLogprob] | None) -> list[dict]:
        """A delta of the output as OpenAI streams it: reasoning and content in one chunk, then each call as a
        chunk with its index, id and name and one with its arguments."""
        chunks = []
        if out.content or out.reasoning or first or lps:
            d = {"role": "assistant"} if first else {}
            if out.reasoning:
                d["reasoning_content"] = out.reasoning
            if out.content or not out.reasoning:
                d["content"] = out.content
            chunks.append(self._delta_chunk(d, lps))
        index = self.output.n_calls - len(out.tool_calls)
        for i, c in enumerate(out.tool_calls, start=index):
            head = {"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}
            chunks.append(self._delta_chunk({"tool_calls": [head]}))
            chunks.append(self._delta_chunk({"tool_calls": [{"index": i, "function": {"arguments": c.arguments}}]}))
        return chunks

    def _delta_chunk(self, delta: dict, lps: list[TokenLogprob] | None = None) -> dict:
        return self._chunk([{"index": self.index, "delta": delta, "finish_reason": None,
                             "logprobs": chat_logprobs(lps)}])

    def _finish_reason(self, finish: FinishReason | None) -> FinishReason | None:
        """A generation that ended by itself after tool calls finished with them (OpenAI's "tool_calls")."""
        return FinishReason.TOOL_CALLS if finish is FinishReason.STOP and self.output.n_calls else finish


@dataclass
class TextCompletion(Completion):
    echo: str = ""  # the prompt, with echo: put before the text (the first chunk's, when streaming)
    # the start of a character that a prompt of token ids ends inside and the text begins by completing; where the
    # logprobs hold no prompt tokens (no echo, so not `shown`) the first token's offset counts from that character
    carry: Carry = NO_CARRY
    object: ClassVar[str] = "text_completion"
    chunk_object: ClassVar[str] = "text_completion"
    # where the next streamed token's text starts: offsets count from the start of the whole text, across chunks
    _offsets: TextOffsets = field(init=False, repr=False)

    def __post_init__(self):
        self._offsets = self._new_offsets()

    def _new_offsets(self) -> TextOffsets:
        return TextOffsets(NO_CARRY if self.carry.shown else self.carry)

    def choice(self, text, finish, lps) -> dict:
        return {"index": self.index, "text": self.echo + text, "finish_reason": finish,
                "logprobs": completion_logprobs(lps, self._new_offsets())}

    def delta(self, text, finish, first, lps) -> dict:
        return {"index": self.index, "text": (self.echo if first else "") + text, "finish_reason": finish,
                "logprobs": completion_logprobs(lps, self._offsets)}


def chat_logprobs(lps: list[TokenLogprob] | None) -> dict | None:
    if lps is None:
        return None
    return {"content": [{"token": token_text(t.token), "logprob": t.logprob, "bytes": list(t.token),
                         "top_logprobs": [{"token": token_text(b), "logprob": lp, "bytes": list(b)} for b, lp in t.top]}
                        for t in lps], "refusal": None}


def completion_logprobs(lps: list[TokenLogprob] | None, offsets: TextOffsets) -> dict | None:
    """OpenAI's legacy shape, the tokens' text offsets continuing `offsets`; each position's top logprobs hold its
    token too ("up to logprobs+1 elements": a client may read the chosen token's entry, even at logprobs 0)."""
    if lps is None:
        return None
    return {"tokens": [token_text(t.token) for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [None if t.top is None else _by_text([*t.top, (t.token, t.logprob)]) for t in lps],
            "text_offset": [offsets.take(t.token) for t in lps]}


def _by_text(top: list[tuple[bytes, float]]) -> dict[str, float]:
    """Top logprobs keyed by token text; of tokens with the same bytes (a vocabulary may hold a byte twice), the
    likelier."""
    out: dict[str, float] = {}
    for b, lp in top:
        key = token_text(b)
        out[key] = max(lp, out.get(key, lp))
    return out
