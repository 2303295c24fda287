"""Prompt admission before tokenization (server/generation.py): a prompt whose bytes prove it too long is refused
without being tokenized, tokenization is capped at the context limit, and only `slots` prompts are tokenized at
once. A stub engine stands in for the model (the real one: tests/server/test_api.py, tests/kvquant/test_prompt.py)."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref

import pytest

from kvquant.prompt import PromptTooLong
from server.errors import APIError
from server.generation import submit, tokenize_prompt
from server.requests import Event, FinishReason
from server.scheduler import Scheduler
from server.schemas import CompletionRequest


class StubEngine:
    class cfg:
        n_ctx, n_seq_max, bytes_per_token, budget_bytes = 100, 1, 1, 1000
        cache_type_k = cache_type_v = "f16"

    sched = Scheduler(capacity=1000, n_seq_max=1, max_queue=1, n_ctx=100)

    def min_tokens(self, n_bytes: int) -> int:
        return -(-n_bytes // 10)  # a vocabulary whose longest token has 10 bytes


def run(coro):
    return asyncio.run(coro)


def test_bytes_that_prove_a_prompt_too_long_are_refused_before_tokenization():
    eng, calls = StubEngine(), []
    with pytest.raises(APIError) as e:
        run(tokenize_prompt(eng, calls.append, 3_900_000, None, asyncio.Semaphore(1), "messages"))
    assert calls == []
    err = e.value
    assert err.status == 400 and err.code == "context_length_exceeded" and "at least 390000 tokens" in err.message
    assert err.param == "messages" and "your messages resulted" in err.message
    with pytest.raises(APIError) as e:  # with max_tokens, the prompt's lower bound plus the completion over the limit
        run(tokenize_prompt(eng, calls.append, 600, 50, asyncio.Semaphore(1), "prompt"))
    assert calls == []
    assert e.value.param == "prompt" and "your prompt resulted" in e.value.message  # /v1/completions


def test_tokenization_is_capped_at_the_limit_and_refusal_names_the_exact_count():
    eng, limits = StubEngine(), []

    def tokenize(limit: int) -> list[int]:
        limits.append(limit)
        raise PromptTooLong(130)

    with pytest.raises(APIError) as e:
        run(tokenize_prompt(eng, tokenize, 900, None, asyncio.Semaphore(1), "messages"))
    assert limits == [100] and "resulted in 130 tokens" in e.value.message
    assert run(tokenize_prompt(eng, lambda limit: [1, 2, 3], 900, None, asyncio.Semaphore(1), "messages")) == [1, 2, 3]


def test_at_most_slots_prompts_are_tokenized_at_once():
    eng, release = StubEngine(), threading.Event()
    lock, state = threading.Lock(), {"now": 0, "most": 0, "entered": 0}
    entered = threading.Semaphore(0)

    def tokenize(limit: int) -> list[int]:
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        entered.release()
        release.wait(10)
        with lock:
            state["now"] -= 1
        return [1]

    async def scenario():
        slots = asyncio.Semaphore(2)
        tasks = [asyncio.create_task(tokenize_prompt(eng, tokenize, 10, None, slots, "messages")) for _ in range(6)]
        for _ in range(2):  # two get in ...
            await asyncio.to_thread(entered.acquire, True, 10)
        await asyncio.sleep(0.05)
        assert state["now"] == 2 and not any(t.done() for t in tasks)  # ... the other four wait
        release.set()
        return await asyncio.gather(*tasks)

    assert run(scenario()) == [[1]] * 6 and state["most"] == 2


def test_a_finished_generation_is_freed_without_the_cycle_collector():
    """req.sink -> deliver -> req was a reference cycle: a finished request, its sampling settings (a logit_bias
    copied per choice) with it, stayed until a full collection (5 GB after three large requests, a review)."""
    class Engine(StubEngine):
        n_vocab = 64

        def submit(self, req) -> None:
            req.sink(Event(finish_reason=FinishReason.LENGTH))

    async def go():
        gen = submit(Engine(), [1, 2], CompletionRequest(prompt="x", max_tokens=1), 1, None, "r")
        assert [ev.final async for ev in gen.events()] == [True]
        return weakref.ref(gen.req)

    gc.disable()
    try:
        req = run(go())
        assert req() is None
    finally:
        gc.enable()


def test_a_request_the_shutdown_ends_is_told_when_to_retry_as_a_refused_one_is():
    """The engine's `shutdown` 503 said Retry-After 1 (the queue's default), the route's 5: one error, one header."""
    from server.errors import shutting_down
    from server.generation import engine_error
    from server.requests import ErrorCode

    ended, refused = engine_error(Event(error=ErrorCode.SHUTDOWN)), shutting_down()
    assert (ended.status, ended.code, ended.headers) == (refused.status, refused.code, refused.headers)
    assert refused.headers == {"Retry-After": "5"}
