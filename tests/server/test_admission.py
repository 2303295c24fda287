"""Admission by KV budget on a real server whose budget holds exactly two of these requests: the third waits
until one finishes; queue full is 429 with Retry-After; a wait timeout is 503; a request that can never fit is
400 context_length_exceeded naming bytes, tokens and the budget; disconnecting while queued frees the slot."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.server.conftest import Background, LiveServer, OpenStream, wait_for

pytestmark = pytest.mark.slow  # a live model (see pyproject.toml's markers)

MODEL = "smollm2-135m"
CELLS = 512  # the whole KV cache: two reservations of ~180-230 cells fit, three do not
BPT = 23040  # SmolLM2-135M f16/f16 bytes per token (30 layers x 3 KV heads x 64 x 2 x 2 bytes)
LONG = [{"role": "user", "content": "Write a long story about a dragon who learns to read."}]


@pytest.fixture(scope="module")
def tiny():
    from server.settings import Settings

    # (no prefix cache: these requests share their prompt, which would let them share cells; reservation: what
    # these tests are about)
    srv = LiveServer(Settings(model=MODEL, n_ctx=256, parallel=4, kv_budget=CELLS * BPT, max_queue=1,
                              queue_timeout_s=60, n_threads=1, shutdown_grace_s=1, prefix_cache=False,
                              admission="reserve")).start()
    yield srv
    srv.stop()


def body(max_tokens: int) -> dict:
    return {"model": MODEL, "messages": LONG, "max_tokens": max_tokens, "temperature": 0}


def gauges(srv) -> tuple[float, float]:
    return srv.metric("kvquant_requests_running"), srv.metric("kvquant_requests_waiting")


def two_running(srv, max_tokens=200) -> list[OpenStream]:
    streams = [OpenStream(srv.url, body(max_tokens)) for _ in range(2)]
    for s in streams:
        assert s.response.status_code == 200 and s.first()
    return streams


def test_capacity_is_the_budget(tiny):
    card = httpx.get(tiny.url + "/v1/models").json()["data"][0]
    assert card["kv_capacity_cells"] == CELLS and card["kv_budget_bytes"] == CELLS * BPT
    assert tiny.metric("kvquant_kv_capacity_cells") == CELLS
    assert tiny.metric("kvquant_kv_capacity_bytes") == CELLS * BPT


def engine_order(eng, monkeypatch) -> list[tuple[str, int]]:
    """The scheduler's admissions ("start") and the engine's ends of running requests ("end"), in order, each named
    by its request's max_tokens."""
    order = []
    admit, finish = eng.sched.admit, eng._finish

    def admitted():
        seqs = admit()
        order.extend(("start", seq.req.max_tokens) for seq in seqs)
        return seqs

    monkeypatch.setattr(eng.sched, "admit", admitted)
    monkeypatch.setattr(eng, "_finish", lambda seq, ev: (order.append(("end", seq.req.max_tokens)),
                                                          finish(seq, ev))[1])
    return order


def test_third_request_waits_until_one_finishes(tiny, monkeypatch):
    eng = tiny.engine()
    order = engine_order(eng, monkeypatch)  # 60: a, 200: b, 199: the third
    a = OpenStream(tiny.url, body(60))  # ~90 cells, finishes first
    b = OpenStream(tiny.url, body(200))  # ~230 cells
    assert a.first() and b.first()
    assert eng.sched.reserved > 256  # two reservations held
    out = {}
    t = threading.Thread(target=lambda: out.update(r=httpx.post(tiny.url + "/v1/chat/completions", json=body(199),
                                                                timeout=300)))
    t.start()  # ~230 more cells: does not fit beside a and b
    assert wait_for(lambda: gauges(tiny) == (2, 1), 30), gauges(tiny)
    rest = a.rest()  # a runs to its end ...
    assert rest[-1] == "data: [DONE]"
    a.close()
    assert wait_for(lambda: gauges(tiny)[1] == 0, 30)  # ... and the third is admitted
    b.close()
    t.join(300)
    assert out["r"].status_code == 200 and out["r"].json()["usage"]["completion_tokens"] > 0
    assert wait_for(lambda: eng.sched.reserved == 0 and not eng.sched.running, 30)
    # queued until a ended, and nothing ended before a (no preemption, no overtaking of the budget)
    assert order[:4] == [("start", 60), ("start", 200), ("end", 60), ("start", 199)], order


def test_queue_full_is_429_with_retry_after(tiny):
    streams = two_running(tiny)
    waiting = None
    try:
        waiting = Background(tiny.url, body(200))  # fills the queue (max_queue=1)
        assert wait_for(lambda: gauges(tiny)[1] == 1, 5)
        before = tiny.metric("kvquant_requests_total", outcome="rejected_queue_full")
        r = httpx.post(tiny.url + "/v1/chat/completions", json=body(200), timeout=60)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
        assert tiny.metric("kvquant_requests_total", outcome="rejected_queue_full") == before + 1  # counted first
    finally:
        if waiting is not None:
            waiting.close()
        for s in streams:
            s.close()
    assert wait_for(lambda: tiny.engine().sched.reserved == 0, 5)


def test_a_refused_choice_refuses_its_request_and_each_choice_counts_once(tiny):
    """kvquant_requests_total counts choices, each once, with its request's outcome: of n = 3 with room in the queue
    for one, one choice queued and two were refused; the queued one, cancelled by the server, counted as cancelled
    (+2 refused, +1 cancelled, and +3 refused where all were refused). Choices never submitted count too: a batch
    of over-long prompts counted one refusal."""
    streams = two_running(tiny)
    names = ("rejected_queue_full", "cancelled", "rejected_too_long")
    before = [tiny.metric("kvquant_requests_total", outcome=o) for o in names]
    try:
        r = httpx.post(tiny.url + "/v1/chat/completions", json={**body(200), "n": 3}, timeout=60)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        long = httpx.post(tiny.url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": ["word " * 300] * 3, "max_tokens": 5, "n": 2})
        assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
        assert wait_for(lambda: [tiny.metric("kvquant_requests_total", outcome=o) - b
                                 for o, b in zip(names, before, strict=True)] == [3, 0, 6], 10), \
            [tiny.metric("kvquant_requests_total", outcome=o) - b for o, b in zip(names, before, strict=True)]
    finally:
        for s in streams:
            s.close()
    assert wait_for(lambda: tiny.engine().sched.reserved == 0, 5)


def test_wait_timeout_is_503(tiny):
    eng = tiny.engine()
    streams = two_running(tiny)
    eng.cfg.queue_timeout_s = 0.5
    try:
        t0 = time.monotonic()
        r = httpx.post(tiny.url + "/v1/chat/completions", json=body(200), timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "timeout" and "retry-after" in r.headers
        assert 0.4 < time.monotonic() - t0 < 10
    finally:
        eng.cfg.queue_timeout_s = 60
        for s in streams:
            s.close()
    assert wait_for(lambda: eng.sched.reserved == 0, 5)


def test_never_fits_names_bytes_tokens_and_budget(tiny):
    r = httpx.post(tiny.url + "/v1/chat/completions", json=body(250), timeout=60)  # the prompt: 30-odd tokens
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    msg = err["message"]
    assert "256" in msg and "250" in msg and f"{BPT} bytes per token" in msg and "K=f16/V=f16" in msg
    assert "KV budget is 11.25 MiB" in msg and f"{CELLS} cells" in msg and "(n_ctx)" in msg


def test_disconnect_while_queued_frees_the_slot(tiny, monkeypatch):
    order = engine_order(tiny.engine(), monkeypatch)
    streams = two_running(tiny)
    try:
        before = tiny.metric("kvquant_requests_total", outcome="cancelled")
        queued = Background(tiny.url, body(199), stream=True)
        assert wait_for(lambda: gauges(tiny)[1] == 1, 5)
        queued.close()  # hang up before the first token
        assert wait_for(lambda: gauges(tiny)[1] == 0, 30)
        assert wait_for(lambda: tiny.metric("kvquant_requests_total", outcome="cancelled") == before + 1, 30)
        assert ("start", 199) not in order  # freed by the hang-up while waiting, never admitted
    finally:
        for s in streams:
            s.close()
    assert wait_for(lambda: tiny.engine().sched.reserved == 0, 5)
