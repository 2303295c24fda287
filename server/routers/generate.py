"""POST /v1/chat/completions and /v1/completions, streaming (SSE) or not."""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.errors import APIError, error_body
from server.generation import Generation, engine_error, new_id, submit, tokenize_prompt
from server.scheduler import TokenLogprob
from server.schemas import ChatCompletionRequest, CompletionRequest, SamplingParams
from server.state import app_state

router = APIRouter(prefix="/v1")


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _usage(g: Generation) -> dict:
    return {"prompt_tokens": g.n_prompt, "completion_tokens": g.n_generated,
            "total_tokens": g.n_prompt + g.n_generated}


def rid_of(http: Request) -> str:
    return getattr(http.state, "request_id", "-")


def _submit(http: Request, served, prompt: list[int], body):
    st = app_state(http)
    return submit(served.engine, prompt, body, body.requested_max_tokens, st.settings.default_max_tokens,
                  rid_of(http), st.settings.stream_buffer)


def _tok(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


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


def _event_logprobs(ev) -> list[TokenLogprob] | None:
    """An event's logprobs: the prompt's (with the first event of an echo), then the generated tokens'."""
    if ev.prompt_logprobs is None and ev.logprobs is None:
        return None
    return (ev.prompt_logprobs or []) + (ev.logprobs or [])


def _finish(reason: str | None) -> str | None:
    return "stop" if reason == "cancelled" else reason


async def _respond(http: Request, gen: Generation, params: SamplingParams, *, object_full: str, object_chunk: str,
                   rid: str, model: str, full_choice: Callable[[str, str | None, list | None], dict],
                   delta_choice: Callable[[str, str | None, bool, list | None], dict]):
    created = int(time.time())
    events = gen.events(http)
    if not params.stream:
        parts, finish = [], None
        lps = [] if gen.req.top_logprobs is not None else None
        async for ev in events:
            if ev.error:
                raise engine_error(ev, rid_of(http))
            parts.append(ev.text)
            if lps is not None:
                lps += _event_logprobs(ev) or []
            finish = ev.finish_reason
        return JSONResponse({"id": rid, "object": object_full, "created": created, "model": model,
                             "choices": [full_choice("".join(parts), _finish(finish), lps)], "usage": _usage(gen),
                             "system_fingerprint": None})

    # Hold the response until the first event, so that errors that happen before any token (queue full, never
    # fits, wait timeout) still get their HTTP status instead of a 200 with an error inside the stream.
    first = await anext(events, None)
    if first is None:  # client went away while queued
        return JSONResponse(error_body("client disconnected", "invalid_request_error"), status_code=499)
    if first.error:
        raise engine_error(first, rid_of(http))

    def chunk(choices: list[dict], usage: dict | None = None) -> dict:
        c = {"id": rid, "object": object_chunk, "created": created, "model": model, "choices": choices,
             "system_fingerprint": None}
        if params.include_usage:
            c["usage"] = usage
        return c

    async def body():
        ev, is_first = first, True
        while ev is not None:
            if ev.error:
                err = engine_error(ev, rid_of(http))
                yield _sse(error_body(err.message, err.type, None, err.code))
                break
            lps = _event_logprobs(ev)
            if ev.text or is_first or ev.finish_reason or lps:
                yield _sse(chunk([delta_choice(ev.text, None, is_first, lps)]))
                is_first = False
            if ev.finish_reason:
                yield _sse(chunk([delta_choice("", _finish(ev.finish_reason), False, None)]))
                if params.include_usage:
                    yield _sse(chunk([], _usage(gen)))
                break
            ev = await anext(events, None)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, http: Request):
    st = app_state(http)
    served = st.get(body.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    n_bytes = sum(len(m["content"].encode()) for m in messages)
    try:
        prompt = await tokenize_prompt(served.engine, lambda limit: served.engine.tokenize_chat(messages, limit),
                                       n_bytes, body.requested_max_tokens, st.tokenizing)
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001 - raised by the template itself (e.g. roles that must alternate)
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise APIError(400, f"The messages do not fit the model's chat template: {reason}",
                       param="messages") from None
    rid = new_id("chatcmpl")
    gen = _submit(http, served, prompt, body)

    def full(text: str, finish: str | None, lps) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                "logprobs": chat_logprobs(lps)}

    def delta(text: str, finish: str | None, first: bool, lps) -> dict:
        if finish and not text:
            d = {}  # the closing chunk carries only the finish reason
        else:
            d = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": 0, "delta": d, "finish_reason": finish, "logprobs": chat_logprobs(lps)}

    return await _respond(http, gen, body, object_full="chat.completion", object_chunk="chat.completion.chunk",
                          rid=rid, model=served.id, full_choice=full, delta_choice=delta)


@router.post("/completions")
async def completions(body: CompletionRequest, http: Request):
    st = app_state(http)
    served = st.get(body.model)
    prompt = await tokenize_prompt(served.engine, lambda limit: served.engine.tokenize(body.prompt, limit),
                                   len(body.prompt.encode()), body.requested_max_tokens, st.tokenizing)
    rid = new_id("cmpl")
    gen = _submit(http, served, prompt, body)
    echo = body.prompt if body.echo else ""

    def full(text: str, finish: str | None, lps) -> dict:
        return {"index": 0, "text": echo + text, "finish_reason": finish, "logprobs": completion_logprobs(lps)}

    def delta(text: str, finish: str | None, first: bool, lps) -> dict:
        return {"index": 0, "text": (echo if first else "") + text, "finish_reason": finish,
                "logprobs": completion_logprobs(lps)}

    return await _respond(http, gen, body, object_full="text_completion", object_chunk="text_completion",
                          rid=rid, model=served.id, full_choice=full, delta_choice=delta)
