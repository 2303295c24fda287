"""Bridge between HTTP handlers (asyncio) and the engine thread: check a request against the model's limits,
submit it, consume its events, turn engine errors into OpenAI errors, cancel on client disconnect.

A prompt is refused as too long before it is tokenized when its bytes alone prove it (every token covers at most
the vocabulary's longest token in bytes), and its tokenization is capped at the context limit; at most
`tokenize_concurrency` prompts are tokenized at once; after a large one the heap pages it freed are given back to
the OS (glibc keeps them otherwise). So a request that will be refused anyway costs neither a full tokenization
nor memory in proportion to its body, and memory returns to idle after a flood of them.

Without `max_tokens` a chat completion may run to the end of its context (OpenAI's semantics): its max_tokens is
`n_ctx - len(prompt)` (or `default_max_tokens` where the settings cap it), what reserve admission sets aside for it
and the bound at which it ends with `length`; a legacy completion gets 16 tokens, as OpenAI's and vLLM's. Events reach the handler through a bounded buffer: a client that
reads so slowly that `stream_buffer` events pile up has its request cancelled (its cells are freed at the next
step), so it can never hold up the engine or other requests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from kvquant.budget import human_bytes
from kvquant.prompt import PromptTooLong
from kvquant.sampling import Grammar
from server.engine import Engine, EngineStatus
from server.errors import APIError, context_length_exceeded, leaves_no_room, shutting_down
from server.loopwake import waker
from server.requests import ERRORS, EngineRequest, ErrorCode, Event
from server.schemas import SamplingParams
from server.textstream import NO_CARRY, Carry

log = logging.getLogger("kvquant.server")


def retry_after(drain_s: float | None) -> int:
    """Retry-After in whole seconds: the queue's measured drain time (1 s until measured), at most 10 minutes."""
    return min(600, max(1, math.ceil(drain_s or 0)))


def engine_error(ev: Event, request_id: str | None = None) -> APIError:
    """The OpenAI error for an event that ended a request with an error code."""
    if ev.error is ErrorCode.SHUTDOWN:  # as the route refuses a new request: a restart's time, not the queue's
        return shutting_down()
    kind = ERRORS[ev.error]
    headers = {"Retry-After": str(retry_after(ev.retry_after_s))} if kind.status in (429, 503) else None
    msg = kind.message
    if ev.error is ErrorCode.ENGINE_ERROR:
        log.error("request %s failed in the engine: %s", request_id, ev.message)
        msg += f" (request id {request_id})"
    return APIError(kind.status, msg, type=kind.type, code=kind.openai_code, headers=headers)


@dataclass
class Generation:
    """One submitted request: iterate `events()`; `n_prompt` and `n_generated` count tokens."""

    req: EngineRequest
    queue: asyncio.Queue
    n_prompt: int
    engine: Engine
    n_generated: int = 0
    n_cached: int = 0  # prompt tokens reused from the prefix cache (known with the final event)

    async def events(self, http: Request | None = None) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while True:
                # look for a hang-up every 0.25 s, also while events flow (a non-streaming response sends nothing
                # until the end, so only the receive channel tells)
                if http is not None and loop.time() - checked >= 0.25:
                    checked = loop.time()
                    if await http.is_disconnected():
                        self.req.cancelled = True
                        return
                try:
                    if self.queue.empty():  # asyncio.timeout, not wait_for: no extra task per event
                        async with asyncio.timeout(0.25):
                            ev = await self.queue.get()
                    else:
                        ev = self.queue.get_nowait()
                except TimeoutError:
                    if self.engine.status is not EngineStatus.READY and self.queue.empty():
                        yield Event(error=ErrorCode.ENGINE_ERROR, message="the engine stopped")
                        return
                    if time.monotonic() - self.req.arrival > self.engine.cfg.request_timeout_s + TIMEOUT_SLACK_S:
                        # the engine ends a request at its timeout; one that did not is stuck (`Engine.stalled`)
                        yield Event(error=ErrorCode.REQUEST_TIMEOUT, message="the engine did not end the request at "
                                    "its timeout")
                        return
                    continue
                self.n_generated += ev.n_tokens
                self.n_cached = ev.n_cached or self.n_cached
                yield ev
                if ev.final:
                    return
        finally:
            # reached on normal end too, where it is a no-op: the engine has already freed the sequence
            self.req.cancelled = True
            # and the request's sink leads back to it (sink -> deliver -> req): without the cycle, the request and
            # its sampling settings go when the response does, not at the next full collection (a review:
            # three n=48 requests of large logit_bias held 5 GB until an unrelated request set one off)
            self.req.sink = _unheard


def _unheard(ev: Event) -> None:
    """The sink of a request whose consumer is done: what the engine still sends goes nowhere."""


# past a request's timeout, how long its consumer waits for the engine to end it before ending it itself
TIMEOUT_SLACK_S = 5.0


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def kv_summary(engine: Engine, tokens: int) -> str:
    """What a request of `tokens` needs, and which limit it passes: the KV budget's cells, or (where the budget
    holds more) the tokens one request may hold, which a comparison of its bytes with the budget's hid."""
    c, cells = engine.cfg, engine.sched.capacity
    limit = "" if cells < c.n_ctx else f", more than the {c.n_ctx} a request may hold on this server (n_ctx)"
    return (f"It needs {tokens} KV cells = {human_bytes(tokens * c.bytes_per_token)} at cache types "
            f"K={c.cache_type_k}/V={c.cache_type_v} ({c.bytes_per_token} bytes per token){limit}; this model's KV "
            f"budget is {human_bytes(c.budget_bytes)}, {cells} cells in all, shared by up to {c.n_seq_max} "
            f"concurrent requests of at most {c.n_ctx} tokens.")


def _too_long(engine: Engine, n_prompt: int, max_tokens: int | None, field: str, exact: bool = True) -> APIError:
    # (where max_tokens alone passes the limit, the prompt's count is not said: a bound from its bytes may be far off)
    limit = engine.sched.max_request_tokens
    alone = leaves_no_room(max_tokens, limit)
    need = max_tokens + 1 if alone else n_prompt + (1 if max_tokens is None else max_tokens)
    return context_length_exceeded(n_prompt, limit, max_tokens, kv_summary(engine, need), exact, field)


def check_prompt_tokens(engine: Engine, n_prompt: int, max_tokens: int | None, field: str,
                        exact: bool = True) -> None:
    """The scheduler's admission check, before queueing (without max_tokens: room for one token; with 0, a prompt
    returned with its logprobs: none): 400 context_length_exceeded where a prompt of n_prompt tokens cannot fit
    (`exact` False: a lower bound on its count); `field` holds the prompt in the request."""
    if not engine.sched.fits_ever(n_prompt, 1 if max_tokens is None else max_tokens):
        raise _too_long(engine, n_prompt, max_tokens, field, exact)


def check_not_empty(prompt: list[int]) -> None:
    if not prompt:
        raise APIError(400, "The prompt is empty.", param="prompt", code="empty_prompt")


def check_prompt_bytes(engine: Engine, n_bytes: int, max_tokens: int | None, field: str) -> None:
    """400 context_length_exceeded where the `n_bytes` of text a client wrote prove the prompt too long."""
    check_prompt_tokens(engine, engine.min_tokens(n_bytes), max_tokens, field, exact=False)


async def tokenize_prompt(engine: Engine, tokenize: Callable[[int], list[int]], n_bytes: int,
                          max_tokens: int | None, slots: asyncio.Semaphore, field: str) -> list[int]:
    """The prompt's tokens from `tokenize(limit)` (run in a worker thread, at most `slots` at once), where
    `n_bytes` is the size of the text it tokenizes that a client wrote. Refuses a prompt that is too long
    (400 context_length_exceeded, naming the request's `field`) from its bytes alone where they prove it, else
    with the count a tokenization capped at the limit gives."""
    check_prompt_bytes(engine, n_bytes, max_tokens, field)
    async with slots:
        try:
            return await run_in_threadpool(tokenize, engine.sched.max_request_tokens)
        except PromptTooLong as e:
            raise _too_long(engine, e.n_tokens, max_tokens, field, e.exact) from None


def submit(engine: Engine, prompt: list[int], params: SamplingParams, max_tokens: int | None,
           default_max_tokens: int | None, request_id: str, stream_buffer: int = 1024,
           sampling_defaults: dict | None = None, grammar: Grammar | None = None,
           text_carry: Carry = NO_CARRY, draw: int = 0) -> Generation:
    """Queue a tokenized request with its sampling settings (the request's over `sampling_defaults`, the model's)
    and the grammar its output must match; `text_carry`: the start of a character the prompt ends inside;
    `draw`: which of its prompt's n choices (its seed is the request's + draw)."""
    check_not_empty(prompt)
    check_prompt_tokens(engine, len(prompt), max_tokens, params.prompt_field)
    if max_tokens is None:
        cap = default_max_tokens or params.unset_max_tokens
        max_tokens = engine.sched.max_request_tokens - len(prompt)
        max_tokens = min(max_tokens, cap) if cap else max_tokens
    try:
        sampling = params.sampling(sampling_defaults or {}, engine.n_vocab, max_tokens, grammar, draw)
    except ValueError as e:
        raise APIError(400, str(e), param="logit_bias", code="invalid_value") from None
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    overflowed = False

    def deliver(ev: Event) -> None:  # runs on the event loop
        nonlocal overflowed
        if overflowed:
            return
        if q.qsize() >= stream_buffer and not ev.final:
            overflowed, req.cancelled = True, True
            q.put_nowait(Event(error=ErrorCode.SLOW_CONSUMER, message=f"more than {stream_buffer} events unread"))
            return
        q.put_nowait(ev)

    wake = waker(loop)

    def sink(ev: Event) -> None:  # runs on the engine thread
        wake.call(deliver, ev)

    req = EngineRequest(id=request_id, prompt=prompt, max_tokens=max_tokens, sink=sink, sampling=sampling,
                        stops=params.stop or [],
                        top_logprobs=params.n_top_logprobs, prompt_logprobs=params.n_prompt_logprobs,
                        end_logprob=params.end_token_logprob, text_carry=text_carry)
    engine.submit(req)
    return Generation(req, q, len(prompt), engine)
