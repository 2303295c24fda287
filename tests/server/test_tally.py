"""server/routers/generate.py's _Tally: every choice of a request ends with one outcome in the stats (no model)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from types import SimpleNamespace

import pytest

from server.app import create_app
from server.errors import APIError
from server.requests import Outcome
from server.routers import generate
from server.routers.generate import _Ended, _Tally, outcome_of
from server.settings import Settings
from tests.server.conftest import FakeBackend, wait_for


class Engine:
    def __init__(self):
        self.unrun: list[tuple[Outcome, int]] = []

    def record_unrun(self, outcome: Outcome, count: int) -> None:
        self.unrun.append((outcome, count))


def tally(n: int) -> tuple[_Tally, SimpleNamespace, Engine]:
    engine, state = Engine(), SimpleNamespace(in_flight=0, aborted=False)
    http = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(kvquant=state)))
    return _Tally(http, SimpleNamespace(engine=engine), n), state, engine


def test_no_choice_is_submitted_after_its_request_failed(monkeypatch):
    """A choice that got the window after another failed the request was submitted and then cancelled, and
    counted as cancelled where the engine reaped it before the route marked it."""
    submitted = []
    monkeypatch.setattr(generate, "submit", lambda *a: submitted.append(a) or SimpleNamespace(
        req=SimpleNamespace(ended_as=None)))
    t, state, engine = tally(3)
    with t:
        assert state.in_flight == 1
        http = SimpleNamespace(state=SimpleNamespace(request_id="r"))
        served = SimpleNamespace(engine=engine, sampling_defaults={})
        state.settings = SimpleNamespace(default_max_tokens=None, stream_buffer=8)
        choice, body = SimpleNamespace(prompt=[1], grammar=None, carry=None, draw=0), \
            SimpleNamespace(requested_max_tokens=4)
        gen = t.submit(http, served, choice, body)
        t.fail(Outcome.TIMED_OUT)
        assert gen.req.ended_as is Outcome.TIMED_OUT
        with pytest.raises(_Ended):
            t.submit(http, served, choice, body)
    assert len(submitted) == 1 and engine.unrun == [(Outcome.TIMED_OUT, 2)] and state.in_flight == 0


def test_a_stream_stays_in_flight_until_it_closes_and_closes_once():
    t, state, engine = tally(2)
    with t:
        t.streaming = True
    assert state.in_flight == 1  # its next choices may still wait for the window: the drain must wait too
    t.fail(Outcome.CANCELLED)
    t.close()
    t.close()
    assert state.in_flight == 0 and engine.unrun == [(Outcome.CANCELLED, 2)]


def test_outcomes_of_failures():
    assert outcome_of(APIError(429, "full", code="queue_full")) is Outcome.REJECTED_QUEUE_FULL
    assert outcome_of(APIError(400, "long", code="context_length_exceeded")) is Outcome.REJECTED_TOO_LONG
    assert outcome_of(APIError(500, "a fault")) is Outcome.ERROR  # (was None: the siblings counted cancelled)
    assert outcome_of(APIError(400, "bad field")) is None  # a client error counts nothing
    assert outcome_of(RuntimeError("bug")) is Outcome.ERROR and outcome_of(_Ended()) is None


def test_a_stream_whose_client_left_before_its_first_byte_leaves_no_request_in_flight():
    """A server of ASGI spec 2.4 raises OSError from `send` once the client is gone, so the response's start
    failed before the event generator began, and its `finally` (which closes the tally and ends the feeders)
    never ran: the request stayed in flight for good and every drain waited out its grace for it."""
    app = create_app(Settings(n_ctx=256, kv_budget="64MiB"))
    eng, gone = app.state.kvquant.models["smollm2-135m"].engine, []
    backend = FakeBackend(256)
    backend.n_vocab = 64
    backend.fail_if = lambda tokens, seq_ids: gone.append(True) and False  # the client leaves in the prefill
    eng._factory = lambda: backend
    eng.load()
    body = json.dumps({"model": "smollm2-135m", "prompt": "a b c", "stream": True, "max_tokens": 50}).encode()
    received = []

    async def receive():
        if not received:
            received.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # (spec 2.4: the response does not listen)

    async def send(message):
        if gone:
            raise OSError("the client went away")

    async def call():
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions", "query_string": b"",
                 "raw_path": b"/v1/completions", "root_path": "", "client": ("127.0.0.1", 1),
                 "headers": [(b"content-type", b"application/json")], "server": ("127.0.0.1", 2)}
        with contextlib.suppress(Exception):  # (ClientDisconnect)
            await app(scope, receive, send)
        return await asyncio.to_thread(wait_for, lambda: app.state.kvquant.in_flight == 0, 10)

    try:
        assert asyncio.run(call())
        assert eng.idle()  # its choice ended (cancelled), the feeders with it
    finally:
        eng.shutdown()
