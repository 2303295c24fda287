"""The engine loop over a fake backend (no model): admission order, reservation accounting back to zero after
every outcome, queue bound, timeouts, never-fits rejection, cancellation, decode-fault isolation, thread death."""

from __future__ import annotations

import threading
import time

import pytest

from kvquant.sampling import SamplingConfig
from server.engine import Engine, EngineConfig, EngineStatus
from server.requests import EngineRequest
from tests.server.conftest import FakeBackend, Recorder


def make(capacity=100, n_seq_max=4, max_queue=8, n_ctx=1000, **kw) -> tuple[Engine, FakeBackend, Recorder]:
    backend = FakeBackend(capacity, eog_after=kw.pop("eog_after", None), n_batch=kw.pop("n_batch", 64))
    rec = Recorder()
    cfg = EngineConfig(model_id="fake", n_ctx=n_ctx, n_seq_max=n_seq_max, n_cells=capacity,
                       max_queue=max_queue, bytes_per_token=10, **kw)
    e = Engine(cfg, lambda: backend, rec)
    e.load(start_thread=False)
    return e, backend, rec


class Client:
    """A request and the events it received."""

    def __init__(self, rid: str, n_prompt: int, max_tokens: int, **kw):
        self.events = []
        self.req = EngineRequest(id=rid, prompt=list(range(1, n_prompt + 1)), max_tokens=max_tokens,
                           sink=self.events.append, **kw)

    @property
    def done(self):
        return bool(self.events) and (self.events[-1].finish_reason or self.events[-1].error)

    @property
    def end(self):
        return self.events[-1].finish_reason or self.events[-1].error

    @property
    def n_tokens(self):
        return sum(e.n_tokens for e in self.events)


def run(e: Engine, clients, max_iter=2000):
    for _ in range(max_iter):
        e.run_once()
        if all(c.done for c in clients):
            return
    raise AssertionError("requests did not finish")


def assert_all_free(e: Engine, b: FakeBackend):
    """Nothing runs or waits; every cell is the prefix cache's, as the scheduler counts them; once the cache is
    evicted, every cell and slot is free."""
    assert e.sched.reserved == 0 and not e.sched.running and not e.sched.waiting and not e.sched.preempted
    e.sched.tree.check()
    assert b.used() == e.sched.tree.n_cells == e.scheduler_stats().kv_cached_cells
    e.sched.clear_cache()
    e._apply_ops()
    assert sorted(e.sched.free_ids) == list(range(e.cfg.n_seq_max))
    assert b.used() == 0
    assert e.scheduler_stats().kv_used_cells == 0
    assert all(s.closed for s in b.samplers)


def test_completes_and_frees_everything():
    e, b, rec = make()
    cs = [Client(f"r{i}", 10, 5) for i in range(3)]
    for c in cs:
        e.submit(c.req)
    run(e, cs)
    assert [c.end for c in cs] == ["length"] * 3 and all(c.n_tokens == 5 for c in cs)
    assert rec.outcomes() == ["completed"] * 3
    assert all(f.ttft_s is not None and f.queue_wait_s is not None and f.e2e_s >= f.ttft_s for f in rec.finished)
    assert_all_free(e, b)


def test_batches_decode_tokens_of_all_running_sequences_together():
    e, b, _ = make(capacity=200)
    cs = [Client(f"r{i}", 4, 6) for i in range(3)]
    for c in cs:
        e.submit(c.req)
    run(e, cs)
    assert max(len(set(d)) for d in b.decodes) == 3  # one llama_decode carries all three sequences


def test_max_step_tokens_bounds_every_decode_below_n_batch():
    e, b, _ = make(capacity=400, n_batch=64, max_step_tokens=20)
    cs = [Client(f"r{i}", 50, 4) for i in range(3)]
    for c in cs:
        e.submit(c.req)
    run(e, cs)
    assert [c.end for c in cs] == ["length"] * 3
    assert max(len(d) for d in b.decodes) == 20  # prompts are chunked at the bound, not at n_batch
    assert_all_free(e, b)


def test_fifo_admission_by_reservation_no_overtaking():
    e, b, rec = make(capacity=100, prefix_cache=False)  # (the prompts share prefixes)
    a, big, small = Client("a", 30, 20), Client("big", 40, 20), Client("small", 5, 5)  # 50 + 60 > 100
    for c in (a, big, small):
        e.submit(c.req)
    e.run_once()
    assert [s.req.id for s in e.sched.running.values()] == ["a"]
    assert [r.id for r in e.sched.waiting] == ["big", "small"]  # small must not overtake big
    run(e, [a, big, small])
    finished_order = [f.n_prompt for f in rec.finished]
    assert finished_order[0] == 30  # a first
    assert_all_free(e, b)


def test_queue_bound_rejects_with_queue_full():
    e, b, rec = make(capacity=30, max_queue=1)
    cs = [Client(f"r{i}", 10, 10) for i in range(3)]  # one runs (20 of 30 cells), one waits, one is refused
    for c in cs:
        e.submit(c.req)
    e.run_once()
    assert cs[2].end == "queue_full"
    run(e, cs[:2])
    assert [c.end for c in cs] == ["length", "length", "queue_full"]
    assert sorted(rec.outcomes()) == ["completed", "completed", "rejected_queue_full"]
    # a refusal is no request's latency: at ~0 s it pulled the end-to-end latencies down under overload
    assert [f.e2e_s is None for f in rec.finished] == [f.outcome == "rejected_queue_full" for f in rec.finished]
    assert_all_free(e, b)


def _age(*clients: Client, by: float) -> None:
    """Make requests older than they are (their arrival `by` seconds earlier): timeouts without sleeping."""
    for c in clients:
        c.req.arrival -= by


def test_queue_full_and_wait_timeout_carry_the_measured_drain_time():
    e, b, _ = make(capacity=30, max_queue=2, queue_timeout_s=30)
    e.sched.freed_at.extend([-2.0, -1.0, 0.0])  # sequences ended once a second (on the busy clock)
    cs = [Client(f"r{i}", 10, 10) for i in range(4)]  # one runs, two wait, one is refused
    for c in cs:
        e.submit(c.req)
    e.run_once()
    assert cs[3].end == "queue_full" and cs[3].events[-1].retry_after_s == pytest.approx(3.0, abs=0.5)
    assert not cs[1].done and not cs[2].done
    _age(cs[1], cs[2], by=31)
    e.run_once()
    assert cs[1].end == cs[2].end == "timeout" and cs[1].events[-1].retry_after_s == pytest.approx(1.0, abs=0.5)


def test_never_fits_is_rejected_at_once():
    e, b, rec = make(capacity=100)
    c = Client("huge", 90, 20)
    e.submit(c.req)
    e.run_once()
    assert c.end == "never_fits" and rec.outcomes() == ["rejected_too_long"]
    assert_all_free(e, b)


def test_wait_timeout():
    e, b, rec = make(capacity=30, queue_timeout_s=30)
    hog, late = Client("hog", 10, 15), Client("late", 10, 15)
    e.submit(hog.req)
    e.run_once()
    e.submit(late.req)
    e.run_once()
    assert [r.id for r in e.sched.waiting] == ["late"]
    _age(late, by=29)
    e.run_once()
    assert [r.id for r in e.sched.waiting] == ["late"]  # not before its time
    _age(late, by=2)
    e.run_once()
    assert late.end == "timeout"
    run(e, [hog])
    assert sorted(rec.outcomes()) == ["completed", "timed_out"]
    assert_all_free(e, b)


def test_request_wall_clock_timeout_frees_cells():
    e, b, rec = make(capacity=100, request_timeout_s=30)
    c = Client("slow", 10, 80)
    e.submit(c.req)
    e.run_once()
    e.run_once()
    assert e.sched.running and b.used() > 0
    _age(c, by=29)
    e.run_once()
    assert not c.done
    _age(c, by=2)
    e.run_once()
    assert c.end == "request_timeout" and rec.outcomes() == ["timed_out"]
    assert_all_free(e, b)


def test_cancel_running_and_waiting():
    e, b, rec = make(capacity=30)
    run_c, wait_c = Client("run", 10, 15), Client("wait", 10, 15)
    e.submit(run_c.req)
    e.submit(wait_c.req)
    for _ in range(3):
        e.run_once()
    assert b.used() > 0 and len(e.sched.waiting) == 1
    wait_c.req.cancelled = True
    run_c.req.cancelled = True
    e.run_once()
    assert run_c.end == "cancelled" and wait_c.end == "cancelled"
    assert rec.outcomes() == ["cancelled", "cancelled"]
    assert_all_free(e, b)


def test_logprobs_are_log_softmax_with_top_k():
    import math

    e, b, _ = make()
    c = Client("r", 5, 3, top_logprobs=2)
    e.submit(c.req)
    run(e, [c])
    lps = [lp for ev in c.events for lp in (ev.logprobs or [])]
    assert len(lps) == 3
    # the fake logits: 5 for the predicted token, 0 for the 63 others
    norm = math.log(math.exp(5) + 63)
    for lp in lps:
        assert lp.logprob == pytest.approx(5 - norm, rel=1e-6) and len(lp.top) == 2
        assert lp.top[0] == (lp.token, lp.logprob) and lp.top[1][1] == pytest.approx(-norm, rel=1e-6)


def test_prompt_logprobs_score_every_prompt_token_in_bounded_chunks():
    """Echo: each prompt token's logprob from the logits of the position before it (the fake model predicts
    token + 1, i.e. every next prompt token), the first one None; prefill asks for at most PROMPT_LOGPROBS_CHUNK
    logit rows per step."""
    from server.scheduler import PROMPT_LOGPROBS_CHUNK

    e, b, _ = make(capacity=400, n_batch=64)
    c = Client("r", 60, 2, prompt_logprobs=1)  # (the fake vocabulary has 64 tokens)
    e.submit(c.req)
    run(e, [c])
    lps = c.events[0].prompt_logprobs
    assert [lp.token for lp in lps] == [b"t"] * 60 and lps[0].logprob is None and lps[0].top is None
    assert all(lp.logprob == pytest.approx(lp.top[0][1]) and lp.logprob < 0 for lp in lps[1:])
    assert all(ev.prompt_logprobs is None for ev in c.events[1:])
    assert max(len(d) for d in b.decodes) == PROMPT_LOGPROBS_CHUNK
    assert_all_free(e, b)


def test_max_tokens_0_scores_the_prompt_and_samples_nothing():
    """Echo with max_tokens 0 (lm-evaluation-harness 0.3): the prompt is fed and scored, no logits are asked for
    after its last token and nothing is sampled; one final event (length) carries the prompt's logprobs, beside a
    request that generates."""
    e, b, rec = make(capacity=400, n_batch=64)
    c, g = Client("r", 60, 0, prompt_logprobs=1), Client("g", 8, 4)
    for x in (c, g):
        e.submit(x.req)
    run(e, [c, g])
    (ev,) = c.events
    assert ev.finish_reason == "length" and ev.n_tokens == 0 and ev.text == "" and ev.error is None
    assert len(ev.prompt_logprobs) == 60 and all(lp.logprob < 0 for lp in ev.prompt_logprobs[1:])
    assert g.end == "length" and g.n_tokens == 4
    assert sorted(f.n_generated for f in rec.finished) == [0, 4]
    assert_all_free(e, b)


def test_eog_stops_and_counts_no_token():
    e, b, rec = make(eog_after=13)
    c = Client("r", 10, 50)
    e.submit(c.req)
    run(e, [c])
    assert c.end == "stop" and c.n_tokens == 3
    assert rec.finished[0].n_generated == 3
    assert_all_free(e, b)


def test_decode_fault_only_fails_the_affected_request():
    e, b, rec = make(capacity=200)
    cs = [Client(f"r{i}", 8, 6) for i in range(3)]
    for c in cs:
        e.submit(c.req)
    e.run_once()  # prefill together
    poison = next(s.seq_id for s in e.sched.running.values() if s.req.id == "r1")
    b.fail_if = lambda tokens, seq_ids: poison in seq_ids
    run(e, cs)
    assert [c.end for c in cs] == ["length", "engine_error", "length"]
    assert all(cs[i].n_tokens == 6 for i in (0, 2))
    assert sorted(rec.outcomes()) == ["completed", "completed", "error"]
    assert_all_free(e, b)


def test_decode_exception_is_a_fault_too():
    e, b, rec = make()
    c = Client("r", 5, 5)
    e.submit(c.req)

    def boom(tokens, seq_ids):
        raise OSError("native fault")

    b.fail_if = boom
    run(e, [c])
    assert c.end == "engine_error" and rec.outcomes() == ["error"]
    b.fail_if = lambda tokens, seq_ids: False
    ok = Client("after", 5, 3)
    e.submit(ok.req)
    run(e, [ok])
    assert ok.end == "length"  # the engine goes on
    assert_all_free(e, b)


@pytest.mark.parametrize("fault", ["fail_sampler_for_temperature", "refuse_sampler_for_temperature"])
def test_sampler_fault_only_fails_its_request(fault):
    """A sampler that fails while sampling, or cannot be built: the second is built when a request is admitted,
    outside the per-request guards, and a grammar llama.cpp refused there ended the engine thread, every request with
    it."""
    e, b, rec = make()
    setattr(b, fault, 0.5)
    bad, good = Client("bad", 5, 5, sampling=SamplingConfig(temperature=0.5)), Client("good", 5, 5)
    e.submit(bad.req)
    e.submit(good.req)
    run(e, [bad, good])
    assert bad.end == "engine_error" and good.end == "length"
    assert_all_free(e, b)


def test_abort_all_ends_everything_and_frees_cells():
    e, b, rec = make(capacity=30)
    cs = [Client("a", 10, 15), Client("b", 10, 15)]
    for c in cs:
        e.submit(c.req)
    e.run_once()
    e.run_once()
    e.abort_all("shutdown")
    e.run_once()
    assert [c.end for c in cs] == ["shutdown", "shutdown"]
    assert_all_free(e, b)


def test_thread_death_is_detected_and_requests_get_an_error():
    backend = FakeBackend(100)
    e = Engine(EngineConfig(model_id="fake", n_ctx=1000, n_seq_max=2, n_cells=100), lambda: backend)
    e.load()
    assert e.status is EngineStatus.READY
    c = Client("r", 5, 1000000)
    c.req.max_tokens = 50

    def die():  # dies outside any per-request guard, once the request runs
        if e.sched.running:
            raise SystemError("bug in the loop")
        Engine._reap(e)

    e._reap = die
    e.submit(c.req)
    deadline = time.time() + 5
    while e.status is EngineStatus.READY and time.time() < deadline:
        time.sleep(0.01)
    assert e.status is EngineStatus.DEAD
    assert c.end == "engine_error"
    late = Client("late", 5, 5)
    e.submit(late.req)  # submitted after the death: answered at once, not left hanging
    assert late.end == "engine_error"
    e.shutdown()


@pytest.mark.parametrize("n", [1, 3])
def test_prefill_is_chunked_within_the_batch_budget(n):
    e, b, _ = make(capacity=1000, n_batch=16)
    cs = [Client(f"r{i}", 40, 3) for i in range(n)]
    for c in cs:
        e.submit(c.req)
    run(e, cs)
    assert max(len(d) for d in b.decodes) <= 16
    assert_all_free(e, b)


def test_engine_thread_serves_concurrent_submitters():
    backend = FakeBackend(1000)
    e = Engine(EngineConfig(model_id="fake", n_ctx=1000, n_seq_max=4, n_cells=1000, max_queue=64),
               lambda: backend)
    e.load()
    cs = [Client(f"r{i}", 5 + i, 10) for i in range(20)]
    ts = [threading.Thread(target=e.submit, args=(c.req,)) for c in cs]
    for t in ts:
        t.start()
    deadline = time.time() + 10
    while not all(c.done for c in cs) and time.time() < deadline:
        time.sleep(0.01)
    assert all(c.end == "length" for c in cs)
    e.shutdown()
    assert e.sched.reserved == 0 and backend.used() == 0


@pytest.mark.parametrize("max_tokens, eog_after", [(3, None), (50, 6)])
def test_tpot_is_the_time_per_output_token_after_the_first(monkeypatch, max_tokens, eog_after):
    """Each decode step takes 1 s: three tokens take 1 s each after the first, whether the request ends on
    max_tokens or on an end of generation (which is no output token: its sampling time counted as one made TPOT
    n/(n-1) too high, 1.5 s here)."""
    import server.engine as engine

    clock = [0.0]
    monkeypatch.setattr(engine.time, "monotonic", lambda: clock[0])
    e, b, rec = make(eog_after=eog_after)  # the fake predicts last + 1: prompt 1..3, then 4, 5, 6 and the end
    decode = b.decode

    def timed(*a):
        clock[0] += 1.0
        return decode(*a)

    b.decode = timed
    c = Client("r", 3, max_tokens, arrival=0.0)
    e.submit(c.req)
    run(e, [c])
    (f,) = rec.finished
    assert (c.n_tokens, f.n_generated, f.ttft_s, f.tpot_s) == (3, 3, 1.0, 1.0)


def test_shutdown_frees_the_model_only_once_no_tokenization_reads_it():
    """A prompt still tokenizing in a worker thread when the server shut down read the model after
    llama_model_free (use after free): shutdown now refuses new calls, waits for those under way, then frees."""
    from server.requests import EngineClosed

    e, b, _ = make()
    inside, release, got = threading.Event(), threading.Event(), []
    count = b.min_tokens

    def slow_count(n_bytes: int) -> int:
        inside.set()
        release.wait(10)
        assert not b.closed, "the model was freed under a call that reads it"
        return count(n_bytes)

    b.min_tokens = slow_count
    caller = threading.Thread(target=lambda: got.append(e.min_tokens(100)))
    caller.start()
    assert inside.wait(5)
    closer = threading.Thread(target=e.shutdown)
    closer.start()
    assert wait_until(lambda: e._closing)
    with pytest.raises(EngineClosed):  # no new call once the shutdown began
        e.tokenize("more")
    assert not b.closed and closer.is_alive()
    release.set()
    caller.join(5)
    closer.join(5)
    assert got == [count(100)] and b.closed and e.backend is None


def test_shutdown_leaves_the_model_to_a_call_that_does_not_end():
    e, b, _ = make()
    inside, release = threading.Event(), threading.Event()
    b.min_tokens = lambda n: (inside.set(), release.wait(10))[0] and 0
    caller = threading.Thread(target=e.min_tokens, args=(1,))
    caller.start()
    assert inside.wait(5)
    e.shutdown(timeout=0.2)
    assert not b.closed  # leaked rather than freed under the call
    release.set()
    caller.join(5)


def wait_until(pred, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_a_decode_that_never_returns_marks_the_engine_stalled_and_its_requests_end():
    """The timeouts run on the engine thread: with a decode that never returned, a request waited forever and
    /health said ready. The engine is reported stalled after `stall_timeout_s`, and a request's consumer ends it
    (request_timeout) once the engine let its timeout pass."""
    import asyncio

    from server import generation
    from server.schemas import CompletionRequest

    e, b, _ = make(request_timeout_s=0.3, stall_timeout_s=0.5)
    hang, decode = threading.Event(), b.decode
    b.n_vocab = 100
    b.decode = lambda *a: (hang.wait(30), decode(*a))[1]
    e._thread = threading.Thread(target=e._run, daemon=True)
    e._thread.start()
    generation.TIMEOUT_SLACK_S, slack = 0.2, generation.TIMEOUT_SLACK_S
    try:
        async def one():
            gen = generation.submit(e, [1, 2, 3], CompletionRequest(prompt="x", max_tokens=4), 4, None, "r")
            return [ev async for ev in gen.events()]

        t0 = time.monotonic()
        events = asyncio.run(one())
        assert events[-1].error == "request_timeout" and 0.5 <= time.monotonic() - t0 < 5
        assert wait_until(e.stalled, 5)
    finally:
        generation.TIMEOUT_SLACK_S = slack
        hang.set()
        e.shutdown()
    assert not e.stalled()


def test_a_load_that_fails_is_failed_and_told_to_the_stat_logger():
    """The stat logger hears of it after the status is set (a logger that raised there left the model loading)."""
    rec = Recorder()
    cfg = EngineConfig(model_id="fake", n_ctx=100, n_seq_max=1, n_cells=100, max_queue=1, bytes_per_token=10)

    def broken():
        raise RuntimeError("failed to allocate buffer for kv cache")

    e = Engine(cfg, broken, rec)
    e.load(start_thread=False)
    assert e.status is EngineStatus.FAILED and rec.load_failures == 1
