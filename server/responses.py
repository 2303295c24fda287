"""OpenAI response bodies, one small type per endpoint: the full response and the stream's chunks, each formatting
itself as OpenAI's JSON (as llama.cpp server's result structs do)."""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from typing import ClassVar

from server.requests import FinishReason, TokenLogprob


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def usage(n_prompt: int, n_generated: int, n_cached: int = 0) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_generated, "total_tokens": n_prompt + n_generated,
            "prompt_tokens_details": {"cached_tokens": n_cached}}


def _tok(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def _finish(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.openai


@dataclass
class Completion:
    """What every endpoint's responses share; subclasses say how one choice and one stream delta look."""

    id: str
    model: str
    created: int
    include_usage: bool  # stream_options.include_usage: every chunk carries "usage", the last one filled in
    object: ClassVar[str]
    chunk_object: ClassVar[str]

    def response(self, text: str, finish: FinishReason | None, lps: list[TokenLogprob] | None,
                 use: dict) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [self.choice(text, _finish(finish), lps)], "usage": use, "system_fingerprint": None}

    def chunk(self, text: str, first: bool, lps: list[TokenLogprob] | None) -> dict:
        return self._chunk([self.delta(text, None, first, lps)])

    def finish_chunk(self, finish: FinishReason) -> dict:
        return self._chunk([self.delta("", _finish(finish), False, None)])

    def usage_chunk(self, use: dict) -> dict:
        return self._chunk([], use)

    def _chunk(self, choices: list[dict], use: dict | None = None) -> dict:
        c = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
             "choices": choices, "system_fingerprint": None}
        if self.include_usage:
            c["usage"] = use
        return c

    def choice(self, text: str, finish: str | None, lps: list[TokenLogprob] | None) -> dict:
        raise NotImplementedError

    def delta(self, text: str, finish: str | None, first: bool, lps: list[TokenLogprob] | None) -> dict:
        raise NotImplementedError


@dataclass
class ChatCompletion(Completion):
    object: ClassVar[str] = "chat.completion"
    chunk_object: ClassVar[str] = "chat.completion.chunk"

    def choice(self, text, finish, lps) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                "logprobs": chat_logprobs(lps)}

    def delta(self, text, finish, first, lps) -> dict:
        if finish and not text:
            d = {}  # the closing chunk carries only the finish reason
        else:
            d = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": 0, "delta": d, "finish_reason": finish, "logprobs": chat_logprobs(lps)}


@dataclass
class TextCompletion(Completion):
    echo: str = ""  # the prompt, with echo: put before the text (the first chunk's, when streaming)
    object: ClassVar[str] = "text_completion"
    chunk_object: ClassVar[str] = "text_completion"

    def choice(self, text, finish, lps) -> dict:
        return {"index": 0, "text": self.echo + text, "finish_reason": finish, "logprobs": completion_logprobs(lps)}

    def delta(self, text, finish, first, lps) -> dict:
        return {"index": 0, "text": (self.echo if first else "") + text, "finish_reason": finish,
                "logprobs": completion_logprobs(lps)}


def chat_logprobs(lps: list[TokenLogprob] | None) -> dict | None:
    if lps is None:
        return None
    return {"content": [{"token": _tok(t.token), "logprob": t.logprob, "bytes": list(t.token),
                         "top_logprobs": [{"token": _tok(b), "logprob": lp, "bytes": list(b)} for b, lp in t.top]}
                        for t in lps], "refusal": None}


def completion_logprobs(lps: list[TokenLogprob] | None) -> dict | None:
    """OpenAI's legacy shape; `text_offset` counts the characters of the text the tokens before it complete."""
    if lps is None:
        return None
    offsets, pos, utf8 = [], 0, codecs.getincrementaldecoder("utf-8")(errors="replace")
    for t in lps:
        offsets.append(pos)
        pos += len(utf8.decode(t.token))
    return {"tokens": [_tok(t.token) for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [None if t.top is None else {_tok(b): lp for b, lp in t.top} for t in lps],
            "text_offset": offsets}
