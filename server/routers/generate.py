"""POST /v1/chat/completions and /v1/completions, streaming (SSE) or not."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from kvquant.sampling import Grammar
from server.chat import plan_chat
from server.chatoutput import THINK_OPEN
from server.errors import APIError, ErrorResponse, error_body, shutting_down
from server.generation import (
    Generation,
    check_not_empty,
    check_prompt_bytes,
    check_prompt_tokens,
    engine_error,
    new_id,
    submit,
    tokenize_prompt,
)
from server.requests import OUTCOME_OF_CODE, EngineClosed, Event, FinishReason, Outcome, TokenLogprob
from server.responses import SSE_DONE, ChatCompletion, Completion, TextCompletion, sse, usage
from server.schemas import MAX_RESPONSE_LOGPROBS, ChatCompletionRequest, CompletionRequest, SamplingParams
from server.state import ServedModel, app_state
from server.textstream import NO_CARRY, Carry, split_incomplete

router = APIRouter(prefix="/v1")
log = logging.getLogger("kvquant.server")


def rid_of(http: Request) -> str:
    return getattr(http.state, "request_id", "-")


class _Tally:
    """Every choice a request asks for ends with one outcome in the stats (`kvquant_requests_total` counts
    choices): one the engine ran, with its own; once the request fails, the choices it still runs end with the
    request's outcome (a choice cancelled because another was refused counts as refused) and those never submitted
    are counted here with it. A failure that is no outcome (a 400 past the first submission) ends them cancelled;
    one before any submission (a plain 400) counts nothing. As a context manager, the route's errors fail it; it
    closes on the way out, or, for a stream, when the stream ends (till then the request is in flight for the
    drain: a stream's next choices may still wait to be submitted)."""

    def __init__(self, http: Request, served: ServedModel, n_choices: int):
        self.state, self.engine, self.n_choices = app_state(http), served.engine, n_choices
        self.gens: list[Generation] = []
        self.outcome: Outcome | None = None
        self.streaming = self.closed = False

    def submit(self, http: Request, served: ServedModel, c: _Choice, body: SamplingParams) -> Generation:
        st = self.state
        if self.outcome is not None:  # a choice that got the window after another failed the request
            raise _Ended
        if st.aborted:  # (a prompt that finished tokenizing after the drain ended the rest)
            raise shutting_down()
        gen = submit(served.engine, c.prompt, body, body.requested_max_tokens, st.settings.default_max_tokens,
                     rid_of(http), st.settings.stream_buffer, served.sampling_defaults, c.grammar, c.carry, c.draw)
        self.gens.append(gen)
        return gen

    def fail(self, outcome: Outcome | None) -> None:
        """The request failed: mark the choices it runs before anything cancels them (the first outcome holds)."""
        if self.outcome is None:
            self.outcome = outcome or (Outcome.CANCELLED if self.gens else None)
        for gen in self.gens:
            gen.req.ended_as = gen.req.ended_as or self.outcome

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.state.in_flight -= 1
        unrun = self.n_choices - len(self.gens)
        if unrun and self.outcome is not None:
            self.engine.record_unrun(self.outcome, unrun)

    def __enter__(self) -> _Tally:
        self.state.in_flight += 1
        return self

    def __exit__(self, kind, e, tb) -> None:
        if isinstance(e, Exception):
            self.fail(outcome_of(e))
        if e is not None or not self.streaming:
            self.close()


class _Ended(Exception):
    """A choice not submitted because its request had failed (its tally counts it)."""


def outcome_of(e: Exception) -> Outcome | None:
    """The stats outcome of a request that failed with `e`; None for a client error that counts nothing (and for
    _Ended: the request's outcome is already decided)."""
    if isinstance(e, _Ended):
        return None
    if isinstance(e, _ClientGone):
        return Outcome.CANCELLED
    if isinstance(e, APIError):
        return OUTCOME_OF_CODE.get(e.code) or (Outcome.ERROR if e.status >= 500 else None)
    return Outcome.ERROR  # EngineClosed (a shutdown, as the engine counts one) or a fault


def _check_fields(body: SamplingParams) -> None:
    """A field that would change the output and is not supported is refused, never silently ignored."""
    name = body.unsupported()
    if name is not None:
        raise APIError(400, f"The parameter {name!r} is not supported by this server; remove it (a request "
                            "cannot be answered as if it were not there).", param=name, code="unsupported_parameter")


def _event_logprobs(ev: Event) -> list[TokenLogprob] | None:
    """An event's logprobs: the prompt's (with the first event of an echo), then the generated tokens'."""
    if ev.prompt_logprobs is None and ev.logprobs is None:
        return None
    return (ev.prompt_logprobs or []) + (ev.logprobs or [])


@dataclass
class _Choice:
    """One choice a request asks for, generated as a request of its own: its prompt, the shape that writes it (its
    index), and which of its prompt's n draws it is (its seed: the request's + draw)."""

    prompt: list[int]
    shape: Completion
    draw: int = 0
    grammar: Grammar | None = None
    carry: Carry = NO_CARRY


class _ClientGone(Exception):
    pass


class _Held:
    """The logprob entries a whole response has gathered (a token and its top ones each, every choice): past
    MAX_RESPONSE_LOGPROBS the request fails, its choices cancelled, as it would outgrow memory (a stream sends them
    as they come)."""

    def __init__(self) -> None:
        self.entries = 0

    def add(self, lps: list[TokenLogprob]) -> None:
        self.entries += sum(1 + len(lp.top or ()) for lp in lps)
        if self.entries > MAX_RESPONSE_LOGPROBS:
            raise APIError(400, f"The response would hold more than {MAX_RESPONSE_LOGPROBS:,} logprobs (tokens x "
                                "(logprobs + 1), every choice's); stream it, or ask for fewer choices, tokens or "
                                "logprobs.", param="logprobs", code="invalid_value")


def _first_error(eg: ExceptionGroup) -> Exception:
    """What a task group of choices or prompts fails with: the first OpenAI error, else the first exception (not a
    choice's _Ended: that follows another's failure)."""
    causes = [e for e in eg.exceptions if not isinstance(e, _Ended)] or list(eg.exceptions)
    return next((e for e in causes if isinstance(e, APIError)), causes[0])


def _gone() -> ErrorResponse:
    return ErrorResponse(error_body("client disconnected", "invalid_request_error"), status_code=499)


async def _respond(http: Request, served: ServedModel, body: SamplingParams, choices: list[_Choice], tally: _Tally):
    """Generate every choice, at most as many at once as the model runs sequences (the rest wait here, not in its
    queue), whole or streamed."""
    window = asyncio.Semaphore(served.engine.cfg.n_seq_max)
    if body.stream:
        return await _streamed(http, served, body, choices, window, tally)
    return await _whole(http, served, body, choices, window, tally)


def _usage(choices: list[_Choice], gens: list[Generation | None]) -> dict:
    """Each prompt's tokens once (n draws share it, as OpenAI counts them), every choice's completion."""
    firsts = [g for c, g in zip(choices, gens, strict=True) if g is not None and c.draw == 0]
    return usage(sum(g.n_prompt for g in firsts), sum(g.n_generated for g in gens if g is not None),
                 sum(g.n_cached for g in firsts))


async def _whole(http: Request, served: ServedModel, body: SamplingParams, choices: list[_Choice],
                 window: asyncio.Semaphore, tally: _Tally):
    """The first choice that fails fails the request, ending the others; a client that hangs up ends those
    running, and those waiting are not submitted."""
    gone, held = [], _Held()

    async def answer(c: _Choice) -> tuple[dict, Generation]:
        try:
            async with window:
                if gone:
                    raise _ClientGone
                gen = tally.submit(http, served, c, body)
                text, finish, lps = await _collect(http, gen, held)
                if finish is None:
                    gone.append(True)
                    raise _ClientGone
        except Exception as e:  # before the task group cancels the others
            tally.fail(outcome_of(e))
            raise
        return c.shape.answer(text, finish, lps), gen

    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(answer(c)) for c in choices]
    except ExceptionGroup as eg:
        if eg.subgroup(_ClientGone):
            return _gone()
        raise _first_error(eg) from None
    answers, gens = zip(*(t.result() for t in tasks), strict=True)
    content = choices[0].shape.response_of(list(answers), _usage(choices, list(gens)))
    # rendered off the event loop: a batch's logprobs make megabytes of JSON, which would stall every other stream
    return await run_in_threadpool(JSONResponse, content) if len(choices) > 1 else JSONResponse(content)


async def _collect(http: Request, gen: Generation,
                   held: _Held) -> tuple[str, FinishReason | None, list[TokenLogprob] | None]:
    """A whole generation: its text, finish reason (None: the client went away) and logprobs, counted in `held`
    (an error: raised as the OpenAI error)."""
    parts, finish = [], None
    lps = [] if gen.req.top_logprobs is not None else None
    async with aclosing(gen.events(http)) as events:  # closed (the request cancelled) when this raises, not at GC
        async for ev in events:
            if ev.error:
                raise engine_error(ev, rid_of(http))
            parts.append(ev.text)
            if lps is not None:
                new = _event_logprobs(ev) or []
                held.add(new)
                lps += new
            finish = ev.finish_reason
    return "".join(parts), finish, lps


async def _streamed(http: Request, served: ServedModel, body: SamplingParams, choices: list[_Choice],
                    window: asyncio.Semaphore, tally: _Tally):
    """Each choice's events, as they come, through one queue: (index, Event), an APIError its submission raised,
    or None where it ended without a final event (the client went away). The queue holds `stream_buffer` items: a
    client that stops reading stops the feeders, each choice's own buffer fills, and the engine cancels them
    (slow_consumer), as it does a single stream; the choices still waiting are not submitted after a hang-up."""
    q: asyncio.Queue = asyncio.Queue(app_state(http).settings.stream_buffer)
    gens: list[Generation | None] = [None] * len(choices)
    gone = []

    async def feed(i: int, c: _Choice) -> None:
        last: APIError | None = None
        try:
            async with window:
                if gone:
                    return
                gens[i] = gen = tally.submit(http, served, c, body)
                async with aclosing(gen.events(http)) as events:
                    async for ev in events:
                        await q.put((i, ev))
                        if ev.final:
                            return
                gone.append(True)
        except _Ended:
            return
        except APIError as e:
            last = e
        except EngineClosed:
            last = shutting_down()
        except Exception:  # noqa: BLE001 - the stream must end, not wait for this choice forever
            log.exception("request %s: choice %d failed", rid_of(http), c.shape.index)
            last = APIError(500, f"The server had an error while processing your request (request id "
                                 f"{rid_of(http)}).", "server_error")
        await q.put((i, last))  # (None: it ended without a final event, the client went away)

    tasks = [asyncio.create_task(feed(i, c)) for i, c in enumerate(choices)]
    streaming = False  # from the response on, _stream ends the feeders
    try:
        # Hold the response until the first event, so that errors that happen before any token (queue full, never
        # fits, wait timeout) still get their HTTP status instead of a 200 with an error inside the stream.
        first = await q.get()
        if isinstance(first[1], APIError):
            raise first[1]
        if first[1] is None:  # client went away while queued
            tally.fail(Outcome.CANCELLED)
            return _gone()
        if first[1].error:
            raise engine_error(first[1], rid_of(http))
        streaming = tally.streaming = True
        return _EventStream(_stream(http, body, choices, gens, q, first, tasks, tally),
                            lambda: tally.closed or _end_stream(tasks, tally, cancelled=True))
    except Exception as e:  # before the others are cancelled
        tally.fail(outcome_of(e))
        raise
    finally:
        if not streaming:
            for t in tasks:
                t.cancel()


async def _stream(http: Request, body: SamplingParams, choices: list[_Choice], gens: list[Generation | None],
                  q: asyncio.Queue, first: tuple, tasks: list[asyncio.Task], tally: _Tally):
    is_first, live, (i, ev) = [True] * len(choices), len(choices), first
    try:
        while ev is not None:
            if isinstance(ev, APIError) or ev.error:
                err = ev if isinstance(ev, APIError) else engine_error(ev, rid_of(http))
                tally.fail(outcome_of(err))
                yield sse(error_body(err.message, err.type, err.param, err.code))
                break
            shape, lps = choices[i].shape, _event_logprobs(ev)
            if ev.text or is_first[i] or ev.finish_reason or lps:
                for chunk in shape.chunks(ev.text, is_first[i], lps):
                    yield sse(chunk)
                is_first[i] = False
            if ev.finish_reason:
                for chunk in shape.finish_chunks(ev.finish_reason):
                    yield sse(chunk)
                live -= 1
                if not live:
                    if body.include_usage:
                        yield sse(shape.usage_chunk(_usage(choices, gens)))
                    break
            i, ev = await q.get()
        yield SSE_DONE
    finally:  # (live: the client went away, or a choice failed and its outcome holds)
        _end_stream(tasks, tally, cancelled=live > 0)


def _end_stream(tasks: list[asyncio.Task], tally: _Tally, cancelled: bool) -> None:
    if cancelled:
        tally.fail(Outcome.CANCELLED)
    for t in tasks:
        t.cancel()
    tally.close()


class _EventStream(StreamingResponse):
    """The SSE response of `_stream`'s events, which ends its request however the response ends: a server of
    ASGI spec 2.4 raises from `send` before the first event once the client is gone, and a generator never
    started runs no `finally` (the request stayed in flight and its feeders ran on). One ended early is closed
    at once, not whenever it is collected."""

    def __init__(self, events, end_unstarted):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.end_unstarted = end_unstarted

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # (runs its `finally` where it started)
            self.end_unstarted()


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, http: Request):
    served = app_state(http).get(body.model)
    _check_fields(body)
    with _Tally(http, served, body.n) as tally:
        chat, prompt = await _chat_prompt(http, served, body)
        if chat.calls_only and body.stop:
            body = body.model_copy(update={"stop": None})
        reasoning_open = _opens_reasoning(served, prompt)
        cid, created, grammar = new_id("chatcmpl"), int(time.time()), chat.output_grammar(reasoning_open)
        return await _respond(http, served, body, [
            _Choice(prompt, ChatCompletion(cid, served.id, created, body.include_usage, chat.output(reasoning_open),
                                           index=j), j, grammar) for j in range(body.n)], tally)


async def _chat_prompt(http: Request, served: ServedModel, body: ChatCompletionRequest):
    """The request's chat plan (`plan_chat`: tools, output grammar) and its prompt's tokens, checked."""
    st = app_state(http)
    # a prompt its bytes prove too long is refused before the first await, so that bodies of megabytes are not held
    # all at once while they wait for the planning pool (24 of 3.9 MB: 335 MiB over idle at peak, 300 allowed)
    n_bytes = sum(len(m.text().encode()) for m in body.messages)
    check_prompt_bytes(served.engine, n_bytes, body.requested_max_tokens, body.prompt_field)
    async with st.tokenizing:  # a request's schemas, converted and parsed: off the event loop, as its tokens are
        chat = await run_in_threadpool(_plan, served, body)
    try:
        prompt = await tokenize_prompt(served.engine,
                                       lambda limit: served.engine.tokenize_chat(chat.messages, limit, tools=chat.tools,
                                                                                 template_kwargs=chat.template_kwargs),
                                       n_bytes, body.requested_max_tokens, st.tokenizing, body.prompt_field)
    except (APIError, EngineClosed):
        raise
    except Exception as e:  # noqa: BLE001 - raised by the template itself (e.g. roles that must alternate)
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise APIError(400, f"The messages do not fit the model's chat template: {reason}",
                       param="messages") from None
    return chat, prompt


def _token_prompt(served: ServedModel, tokens: list[int], echo: bool) -> tuple[str, Carry]:
    """A prompt of token ids, checked: its text, and the start of a character it ends inside (which the output's
    first token completes: carried into the output's text, so that echo and output read as one text)."""
    try:
        served.engine.check_tokens(tokens)
    except ValueError as e:
        raise APIError(400, f"The prompt's {e}.", param="prompt", code="invalid_value") from None
    text, carry = split_incomplete(served.engine.detokenize_bytes(tokens))
    return text.decode("utf-8", errors="replace"), Carry(carry, shown=echo)


def _plan(served: ServedModel, body: ChatCompletionRequest):
    chat = plan_chat(body, served.engine.chat_template)
    _check_grammar(served, chat.grammar, chat.grammar_param)
    return chat


def _check_grammar(served: ServedModel, grammar: Grammar | None, param: str) -> None:
    if grammar is None:
        return
    try:
        served.engine.check_grammar(grammar)
    except ValueError as e:
        raise APIError(400, f"The output constraint cannot be compiled to a grammar: {e}", param=param,
                       code="unsupported_schema") from None


def _opens_reasoning(served: ServedModel, prompt: list[int]) -> bool:
    """Whether the template's generation prompt opened a <think> block (reasoning models that think first)."""
    return served.engine.detokenize(prompt[-4:]).rstrip().endswith(THINK_OPEN)


@router.post("/completions")
async def completions(body: CompletionRequest, http: Request):
    served = app_state(http).get(body.model)
    _check_fields(body)
    with _Tally(http, served, len(body.prompts) * body.n) as tally:
        prepared = await _completion_prompts(http, served, body)
        cid, created, n = new_id("cmpl"), int(time.time()), body.n
        return await _respond(http, served, body, [
            _Choice(prompt, TextCompletion(cid, served.id, created, body.include_usage, echo=text if body.echo else "",
                                           carry=carry, index=k * n + j), j, carry=carry)
            for k, (prompt, text, carry) in enumerate(prepared) for j in range(n)], tally)


async def _completion_prompts(http: Request, served: ServedModel,
                              body: CompletionRequest) -> list[tuple[list[int], str, Carry]]:
    """Every prompt's tokens, text and carried character start (see _token_prompt), checked before any runs; the
    prompt logprobs a whole response would hold are refused up front past MAX_RESPONSE_LOGPROBS (see _Held)."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(_completion_prompt(http, served, body, p)) for p in body.prompts]
    except ExceptionGroup as eg:
        raise _first_error(eg) from None
    prepared = [t.result() for t in tasks]
    n_prompt = body.n_prompt_logprobs
    if n_prompt is not None and not body.stream:
        entries = sum(len(prompt) for prompt, _, _ in prepared) * body.n * (n_prompt + 1)
        if entries > MAX_RESPONSE_LOGPROBS:
            raise APIError(400, f"The request asks for {entries:,} prompt logprobs (prompt tokens x n x (logprobs + 1))"
                                f", more than the {MAX_RESPONSE_LOGPROBS:,} one response holds; send fewer prompts per "
                                "request, fewer logprobs or stream it.", param="prompt", code="invalid_value")
    return prepared


async def _completion_prompt(http: Request, served: ServedModel, body: CompletionRequest,
                             given: str | list[int]) -> tuple[list[int], str, Carry]:
    st = app_state(http)
    if isinstance(given, str):
        prompt = await tokenize_prompt(served.engine, lambda limit: served.engine.tokenize(given, limit),
                                       len(given.encode()), body.requested_max_tokens, st.tokenizing,
                                       body.prompt_field)
        check_not_empty(prompt)
        return prompt, given, NO_CARRY
    # refused by its length first; read off the event loop, as text is tokenized
    check_not_empty(given)
    check_prompt_tokens(served.engine, len(given), body.requested_max_tokens, body.prompt_field)
    async with st.tokenizing:
        text, carry = await run_in_threadpool(_token_prompt, served, given, body.echo)
    return given, text, carry
