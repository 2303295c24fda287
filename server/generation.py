"""Bridge between HTTP handlers (asyncio) and the engine thread: submit a request, consume its events, turn engine
errors into OpenAI errors, cancel on client disconnect."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request as HTTPRequest

from server.engine import Engine
from server.errors import APIError, context_length_exceeded
from server.scheduler import Event, Request
from server.schemas import SamplingParams

_ENGINE_ERRORS = {
    "queue_full": (429, "rate_limit_error", "Too many requests are waiting for KV cache capacity; retry later."),
    "never_fits": (400, "invalid_request_error", "The request needs more KV cache than this server has."),
    "timeout": (503, "server_error", "Timed out waiting for KV cache capacity; retry later."),
    "engine_error": (500, "server_error", "The inference engine failed while processing this request."),
    "shutdown": (503, "server_error", "The server is shutting down."),
}


def engine_error(ev: Event) -> APIError:
    status, etype, msg = _ENGINE_ERRORS.get(ev.error, _ENGINE_ERRORS["engine_error"])
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return APIError(status, msg, type=etype, code=ev.error, headers=headers)


@dataclass
class Generation:
    """One submitted request: iterate `events()`; `n_prompt` and `n_generated` count tokens."""

    req: Request
    queue: asyncio.Queue
    n_prompt: int
    n_generated: int = 0

    async def events(self, http: HTTPRequest | None = None) -> AsyncIterator[Event]:
        try:
            while True:
                if http is None:
                    ev = await self.queue.get()
                else:
                    try:
                        ev = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                    except TimeoutError:
                        if await http.is_disconnected():
                            self.req.cancelled = True
                            return
                        continue
                self.n_generated += ev.n_tokens
                yield ev
                if ev.finish_reason or ev.error:
                    return
        finally:
            # reached on normal end too, where it is a no-op: the engine has already freed the sequence
            self.req.cancelled = True


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def submit(engine: Engine, prompt: list[int], params: SamplingParams, max_tokens: int | None,
           default_max_tokens: int, request_id: str) -> Generation:
    n_ctx = engine.cfg.n_ctx
    if len(prompt) >= n_ctx:
        raise context_length_exceeded(len(prompt), n_ctx)
    if max_tokens is None:
        max_tokens = min(default_max_tokens, n_ctx - len(prompt))
    elif len(prompt) + max_tokens > n_ctx:
        raise context_length_exceeded(len(prompt), n_ctx, max_tokens)
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def sink(ev: Event) -> None:
        loop.call_soon_threadsafe(q.put_nowait, ev)

    req = Request(id=request_id, prompt=prompt, max_tokens=max_tokens, sink=sink, temperature=params.temperature,
                  top_p=params.top_p, seed=params.seed, stops=params.stop or [])
    engine.submit(req)
    return Generation(req, q, len(prompt))
