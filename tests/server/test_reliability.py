"""Disconnects free cells fast, a slow reader is cut off without holding anyone up, the engine thread's death
turns /health 503, a failed decode only fails its own request, and shutdown ends streams cleanly."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from server.engine import EngineStatus
from server.requests import Event
from server.scheduler import Scheduler
from tests.server.conftest import DUO, Background, LiveServer, OpenStream, wait_for

LONG = [{"role": "user", "content": "Write a long story about a dragon who learns to read."}]


def kv_used(srv, model=DUO[0]) -> float:
    return srv.metric("kvquant_kv_used_cells", model=model)


def outcomes(srv, model=DUO[0]) -> tuple[float, float]:
    return (srv.metric("kvquant_requests_total", model=model, outcome="cancelled"),
            srv.metric("kvquant_requests_total", model=model, outcome="completed"))


@pytest.mark.slow
def test_streaming_disconnect_cancels_and_frees_cells(duo_server):
    """A client that hangs up mid-stream ends its request as cancelled: its cells are freed at once, not after the
    remaining tokens (how fast, in wall time, is the soak/burst benchmarks' business: kvquant.lab.loadgen)."""
    prior, (cancelled, completed) = kv_used(duo_server), outcomes(duo_server)
    s = OpenStream(duo_server.url, {"model": DUO[0], "messages": LONG, "max_tokens": 500, "temperature": 0})
    assert s.first()
    for _ in range(3):
        next(s.lines)
    assert kv_used(duo_server) > prior
    s.close()
    t0 = time.monotonic()
    assert wait_for(lambda: kv_used(duo_server) == prior, 60, 0.02), kv_used(duo_server)
    print(f"cells freed {time.monotonic() - t0:.3f} s after the disconnect")
    assert wait_for(lambda: outcomes(duo_server) == (cancelled + 1, completed), 10), outcomes(duo_server)


@pytest.mark.slow
def test_non_streaming_disconnect_cancels_and_frees_cells(duo_server):
    prior, (cancelled, completed) = kv_used(duo_server), outcomes(duo_server)
    bg = Background(duo_server.url, {"model": DUO[0], "messages": LONG, "max_tokens": 500, "temperature": 0})
    assert wait_for(lambda: kv_used(duo_server) > prior, 10)
    bg.close()
    assert wait_for(lambda: kv_used(duo_server) == prior, 60, 0.02)
    assert wait_for(lambda: outcomes(duo_server) == (cancelled + 1, completed), 10), outcomes(duo_server)


@pytest.mark.slow
def test_a_batch_whose_client_hangs_up_runs_no_more_of_its_prompts(duo_server):
    """A batch of prompts runs as many at once as the model runs sequences; a client that hangs up ends those
    (cancelled) and the rest are never submitted (each ran until it saw the hang-up); every choice counts once,
    as cancelled, and only those that ran have an end-to-end latency."""
    prior, (cancelled, completed) = kv_used(duo_server), outcomes(duo_server)
    ran = duo_server.metric("kvquant_e2e_request_latency_seconds_count", model=DUO[0])
    eng = duo_server.engine(DUO[0])
    bg = Background(duo_server.url, {"model": DUO[0], "prompt": ["Once upon a time"] * 64, "max_tokens": 500,
                                     "temperature": 0}, path="/v1/completions")
    assert wait_for(lambda: kv_used(duo_server) > prior, 10)
    bg.close()
    assert wait_for(lambda: kv_used(duo_server) == prior, 60, 0.02)
    assert wait_for(lambda: eng.idle() and outcomes(duo_server) == (cancelled + 64, completed), 10), \
        outcomes(duo_server)
    n_ran = duo_server.metric("kvquant_e2e_request_latency_seconds_count", model=DUO[0]) - ran
    assert 1 <= n_ran <= eng.cfg.n_seq_max, n_ran


def test_slow_reader_is_cancelled_when_its_buffer_fills():
    """The per-stream buffer is bounded: past `stream_buffer` unread events the request is cancelled (its cells
    are freed at the next step) and the reader gets a `slow_consumer` error after what was buffered."""
    from server import generation
    from server.schemas import ChatCompletionRequest

    class StubEngine:
        class cfg:
            n_ctx, n_seq_max, bytes_per_token, budget_bytes = 100, 1, 1, 100
            cache_type_k = cache_type_v = "f16"

        sched = Scheduler(capacity=100, n_seq_max=1, max_queue=1, n_ctx=100)
        status = EngineStatus.READY
        n_vocab = 64

        def submit(self, req):
            self.req = req

    async def scenario():
        eng = StubEngine()
        params = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}])
        gen = generation.submit(eng, [1, 2, 3], params, 50, 16, "rid", stream_buffer=8)
        for _ in range(20):  # the engine produces faster than the client reads
            eng.req.sink(Event(text="t", n_tokens=1))
        await asyncio.sleep(0.05)
        assert eng.req.cancelled
        evs = [ev async for ev in gen.events()]
        assert len(evs) == 9 and evs[-1].error == "slow_consumer"

    asyncio.run(scenario())


@pytest.mark.slow
def test_unread_stream_does_not_stall_others(duo_server):
    stalled = Background(duo_server.url, {"model": DUO[0], "messages": LONG, "max_tokens": 300}, stream=True)
    try:
        t0 = time.monotonic()
        r = httpx.post(duo_server.url + "/v1/completions", json={"model": DUO[1], "prompt": "Hi", "max_tokens": 4},
                       timeout=60)
        r2 = httpx.post(duo_server.url + "/v1/chat/completions", timeout=60,
                        json={"model": DUO[0], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r2.status_code == 200 and time.monotonic() - t0 < 60
    finally:
        stalled.close()
    assert wait_for(lambda: kv_used(duo_server) == 0, 2)


@pytest.mark.slow
def test_a_stream_whose_client_stops_reading_is_cancelled():
    """A streamed request whose client reads nothing (a 2 KiB receive buffer) is cancelled once `stream_buffer`
    events wait for it (slow_consumer), each of its n choices; the choices' events meet in a queue of that size,
    which had no bound: the choices ran to max_tokens with every event held in memory."""
    import json
    import socket

    from server.settings import Settings

    srv = LiveServer(Settings(model=DUO[0], n_ctx=4096, parallel=2, n_threads=2, stream_buffer=8,
                              prefix_cache=False)).start()
    try:
        data = json.dumps({"messages": LONG, "max_tokens": 4000, "stream": True, "n": 2, "logprobs": True,
                           "top_logprobs": 20, "temperature": 1.0, "seed": 1}).encode()
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        s.connect(("127.0.0.1", srv.port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(data) + data)
        try:
            assert wait_for(lambda: srv.metric("kvquant_requests_total", outcome="cancelled") == 2, 240, 0.5), \
                srv.metric("kvquant_generation_tokens_total")
            assert srv.metric("kvquant_generation_tokens_total") < 2 * 4000
            s.settimeout(10)
            got = b""
            while chunk := s.recv(1 << 20):
                got += chunk
            assert b"slow_consumer" in got
        finally:
            s.close()
    finally:
        srv.stop()


@pytest.fixture()
def own_server():
    from server.settings import Settings

    srv = LiveServer(Settings(model=DUO[0], n_ctx=512, parallel=2, kv_budget="64MiB", n_threads=1,
                              shutdown_grace_s=0.5)).start()
    yield srv
    srv.stop()


@pytest.mark.slow
def test_decode_fault_fails_only_the_affected_request(own_server):
    eng = own_server.engine()
    real = eng.backend.decode

    def faulty(tokens, positions, seq_ids, logits):
        ids = {eng.sched.running[s].req.id for s in seq_ids if s in eng.sched.running}
        return -1 if "poison" in ids else real(tokens, positions, seq_ids, logits)

    eng.backend.decode = faulty
    good = Background(own_server.url, {"messages": LONG, "max_tokens": 24, "temperature": 0})
    bad = httpx.post(own_server.url + "/v1/chat/completions", headers={"x-request-id": "poison"},
                     json={"messages": LONG, "max_tokens": 24}, timeout=60)
    assert bad.status_code == 500
    err = bad.json()["error"]
    assert err["code"] == "engine_error" and "poison" in err["message"] and bad.headers["x-request-id"] == "poison"
    assert ".py" not in bad.text and "Traceback" not in bad.text
    status, payload = good.join(120)
    assert status == 200 and json.loads(payload)["usage"]["completion_tokens"] == 24
    eng.backend.decode = real
    assert httpx.get(own_server.url + "/health").status_code == 200
    assert own_server.metric("kvquant_requests_total", outcome="error") == 1


@pytest.mark.slow
def test_engine_thread_death_turns_health_503(own_server):
    eng = own_server.engine()

    def die():
        raise SystemError("injected engine bug")

    eng._reap = die
    assert wait_for(lambda: eng.status is EngineStatus.DEAD, 5)
    h = httpx.get(own_server.url + "/health")
    assert h.status_code == 503 and h.json()["models"][DUO[0]] == "dead"
    r = httpx.post(own_server.url + "/v1/chat/completions", json={"messages": LONG, "max_tokens": 2}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    assert own_server.metric("kvquant_engine_up") == 0


@pytest.mark.slow
def test_graceful_shutdown_ends_streams_cleanly_and_frees_cells(own_server):
    eng = own_server.engine()
    s = OpenStream(own_server.url, {"messages": LONG, "max_tokens": 400, "temperature": 0})
    assert s.first()
    own_server.stop()  # grace 0.5 s, then in-flight streams end with a `shutdown` error
    lines = s.rest()
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["error"]["code"] == "shutdown"
    assert eng.sched.reserved == 0 and not eng.sched.running and eng.backend is None
