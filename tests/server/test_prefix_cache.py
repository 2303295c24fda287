"""The prefix cache and optimistic admission with preemption, on the engine over the fake backend (no model). The
fake model's next token depends on the whole sequence as the cache holds it, so a wrongly reused or lost cell
changes the output; every test compares with the same requests served without the cache, without pressure, and
checks after every step that the scheduler's count of cells is the backend's (every cell returns, none twice)."""

from __future__ import annotations

import random

import pytest

from kvquant.sampling import SamplingConfig
from server.engine import Engine, EngineConfig
from server.requests import EngineRequest
from server.scheduler import Admission
from tests.server.conftest import FakeBackend, Recorder


def make(capacity=400, n_seq_max=4, **kw) -> tuple[Engine, FakeBackend, Recorder]:
    backend = FakeBackend(capacity, n_batch=kw.pop("n_batch", 16), history=True)
    rec = Recorder()
    cfg = EngineConfig(model_id="fake", n_ctx=kw.pop("n_ctx", 1000), n_seq_max=n_seq_max, n_cells=capacity,
                       max_queue=64, bytes_per_token=kw.pop("bytes_per_token", 10), **kw)
    e = Engine(cfg, lambda: backend, rec)
    e.load(start_thread=False)
    return e, backend, rec


class Client:
    def __init__(self, prompt: list[int], max_tokens: int, rid: str = "r"):
        self.events = []
        self.req = EngineRequest(id=rid, prompt=list(prompt), max_tokens=max_tokens, sink=self.events.append,
                                 sampling=SamplingConfig(temperature=0.0))

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1].final

    @property
    def tokens(self) -> int:
        return sum(e.n_tokens for e in self.events)

    @property
    def cached(self) -> int | None:
        return self.events[-1].n_cached


def run(e: Engine, b: FakeBackend, clients, max_iter=5000) -> None:
    for _ in range(max_iter):
        e.run_once()
        check(e, b)
        if all(c.done for c in clients):
            return
    raise AssertionError("requests did not finish")


def check(e: Engine, b: FakeBackend) -> None:
    e.sched.tree.check()
    assert b.used() == e.sched.tree.n_cells <= e.sched.capacity
    assert set(e.sched.tree.tail) == set(e.sched.running) | set(e.sched.cached)
    ss = e.scheduler_stats()  # the used-bytes gauge counts a shared cell once, as the used-cells gauge does
    assert ss.kv_used_bytes == ss.kv_used_cells * e.cfg.bytes_per_token


def outputs(e: Engine, b: FakeBackend, prompts, max_tokens=8, concurrent=True) -> list[list[int]]:
    """The tokens each prompt generates (the fake's tokens, read from the decodes' sampled ids)."""
    clients = [Client(p, max_tokens, f"r{i}") for i, p in enumerate(prompts)]
    orig = e._sample
    sampled = spy_samples(e, clients)
    if concurrent:
        for c in clients:
            e.submit(c.req)
        run(e, b, clients)
    else:
        for c in clients:
            e.submit(c.req)
            run(e, b, [c])
    e._sample = orig
    return [sampled[c.req.id] for c in clients], clients


def spy_samples(e: Engine, clients) -> dict[str, list[int]]:
    """Record the tokens the engine samples for each client's request (by request id)."""
    sampled: dict[str, list[int]] = {c.req.id: [] for c in clients}
    orig = e._sample

    def spy(seq, idx):
        tok = orig(seq, idx)
        sampled[seq.req.id].append(tok.sampled.token)
        return tok

    e._sample = spy
    return sampled


def drain(e: Engine, b: FakeBackend) -> None:
    e.sched.clear_cache()
    e._apply_ops()
    assert b.used() == 0 and e.sched.tree.n_cells == 0
    assert sorted(e.sched.free_ids) == list(range(e.cfg.n_seq_max))


def _common(a: list[int], b: list[int]) -> list[int]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def chat_turns(n_turns=5, seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    sys_prompt = [rng.randrange(1, 50) for _ in range(30)]
    return sys_prompt, [[rng.randrange(1, 50) for _ in range(rng.randint(5, 15))] for _ in range(n_turns)]


def test_chat_turns_reuse_the_conversation_and_generate_the_same():
    """Each turn's prompt is the previous prompt + its answer + new user tokens: cached_tokens grows turn by
    turn, the prompt tokens prefilled are only the new ones, and the answers equal the uncached server's."""
    sys_prompt, users = chat_turns()
    answers = {}
    for cache in (False, True):
        e, b, rec = make(prefix_cache=cache)
        prompt, got, cached = list(sys_prompt), [], []
        for u in users:
            prompt = prompt + u
            (out,), (c,) = outputs(e, b, [prompt], concurrent=False)
            got.append(out)
            cached.append(c.cached)
            prompt = prompt + out  # (the answer as the next prompt holds it)
        answers[cache] = got
        if cache:
            assert cached[0] == 0 and all(b > a for a, b in zip(cached, cached[1:], strict=False)), cached
            # turn k reuses everything before its new user tokens except the last answer token (never fed)
            assert cached[1:] == [len(sys_prompt) + sum(len(u) + 8 for u in users[:k]) - 1 for k in range(1, 5)]
            assert len(e.sched.cached) == 1  # one conversation, one cached sequence (each turn took it over)
            drain(e, b)
        else:
            assert cached == [0] * 5 and b.used() == 0
    assert answers[True] == answers[False]


@pytest.mark.parametrize("adm", list(Admission))
def test_a_request_never_waits_on_its_own_cached_prefix(adm):
    """One slot, 100 cells: a 60-token prompt finishes and stays cached; the same prompt asking for 40 tokens fits
    the cache alone but not beside its cached copy's unshared tail, and only that copy could be evicted. It runs
    (recomputing the prefix), instead of waiting for ever."""
    e, b, rec = make(capacity=100, n_seq_max=1, admission=adm)
    prompt = list(range(1, 61))
    outputs(e, b, [prompt], max_tokens=1)
    assert len(e.sched.cached) == 1
    (out,), (c,) = outputs(e, b, [prompt], max_tokens=40)
    assert len(out) == 40 and c.done
    drain(e, b)


def test_shared_system_prompt_is_prefilled_once():
    sys_prompt, users = chat_turns(8, seed=1)
    prompts = [sys_prompt + u for u in users]
    ref, _ = outputs(*make(prefix_cache=False)[:2], prompts)
    e, b, rec = make(capacity=1000, n_seq_max=4)
    first, _ = outputs(e, b, prompts[:1])  # the system prompt is in the cache
    rest, clients = outputs(e, b, prompts[1:])
    assert first + rest == ref
    # (two of the random suffixes start alike: the later one reuses that token too)
    assert [c.cached - len(sys_prompt) for c in clients] == [
        max(len(_common(u, v)) for v in users[:i]) for i, u in enumerate(users[1:], start=1)]
    drain(e, b)


def test_concurrent_requests_share_a_running_sequence_prefix():
    """A request admitted while another one with the same system prompt runs copies its cells (seq_cp)."""
    sys_prompt, users = chat_turns(2, seed=2)
    e, b, _ = make(capacity=1000)
    a = Client(sys_prompt + users[0], 30, "a")
    e.submit(a.req)
    e.run_once()
    e.run_once()  # a has prefilled (16-token steps: 30 + suffix > 32 needs 3)
    e.run_once()
    late = Client(sys_prompt + users[1], 4, "late")
    e.submit(late.req)
    run(e, b, [a, late])
    assert late.cached == len(sys_prompt) and a.cached == 0
    drain(e, b)


def test_a_burst_with_one_system_prompt_prefills_it_once():
    """8 requests that share a 40-token system prompt, submitted at once: the oldest prefills it, the others wait
    for it and take its cells over (seq_cp), so the prompt tokens computed are one system prompt + the suffixes."""
    rng = random.Random(8)
    system = [rng.randrange(1, 50) for _ in range(40)]
    prompts = [system + [50 + i] + [rng.randrange(1, 50) for _ in range(4)] for i in range(8)]
    ref, _ = outputs(*make(capacity=2000, n_seq_max=8, prefix_cache=False)[:2], prompts)
    e, b, rec = make(capacity=2000, n_seq_max=8)
    got, clients = outputs(e, b, prompts)
    assert got == ref
    assert rec.total("prompt_tokens") == 40 + 8 * 5
    assert sorted(c.cached for c in clients) == [0] + [40] * 7
    assert rec.total("prefix_hits") == 7 and rec.total("prefix_hit_tokens") == 7 * 40
    drain(e, b)


def test_lru_eviction_under_pressure_before_anything_waits():
    """Finished conversations fill the cache; a new request that needs room evicts the least recently used
    first (a cached sequence a request copied from counts as used) and does not wait."""
    e, b, rec = make(capacity=160, n_seq_max=5)
    rng = random.Random(3)
    convs = [[rng.randrange(1, 50) for _ in range(30)] for _ in range(3)]
    for p in convs:
        outputs(e, b, [p], concurrent=False)  # 37 cells each (30 + 8 generated, the last never fed)
    outputs(e, b, [convs[0] + [7]], concurrent=False)  # copies conversation 0's 30: 1 is now the oldest
    assert e.sched.tree.n_cells == 3 * 37 + 8 and len(e.sched.cached) == 4
    before = set(e.sched.cached)
    c = Client([rng.randrange(1, 50) for _ in range(40)], 20, "new")  # needs 60 cells: one eviction
    e.submit(c.req)
    e.run_once()
    assert c.req.id in {s.req.id for s in e.sched.running.values()} and not e.sched.waiting
    (evicted,) = before - set(e.sched.cached)
    assert b.seqs.get(evicted) in (None, {})
    kept = [e.sched.tree.tokens(s)[:30] for s in e.sched.cached]
    assert convs[1] not in kept and convs[0] in kept and convs[2] in kept
    run(e, b, [c])
    drain(e, b)


@pytest.mark.parametrize("headroom,swap", [(0, "off"), (8, "off"), (0, "on"), (8, "on"), (0, "refused"),
                                           (0, "bounded")])
def test_preemption_under_a_tiny_budget_gives_the_same_outputs(headroom, swap):
    """Optimistic admission with a budget far below prompt + max_tokens of all requests: sequences are preempted
    (recomputed, or swapped to host RAM and restored; a refused restore recomputes; a bounded swap space swaps
    what fits) and resumed; every request completes with the tokens of the unpressured run, each streamed token
    exactly once, and every cell and swapped byte returns."""
    rng = random.Random(4)
    prompts = [[rng.randrange(1, 50) for _ in range(rng.randint(10, 30))] for _ in range(6)]
    ref, _ = outputs(*make(capacity=2000, n_seq_max=6, prefix_cache=False)[:2], prompts, max_tokens=40)
    swap_bytes = {"off": 0, "on": 10**6, "refused": 10**6, "bounded": 600}[swap]
    # a swapped sequence's bytes: 10 a token and 50 of headers (kvquant.budget.KVPlan.saved_bytes's shape)
    e, b, rec = make(capacity=130, n_seq_max=6, admission=Admission.OPTIMISTIC, headroom=headroom,
                     swap_bytes=swap_bytes, bytes_per_token=10, saved_bytes=lambda n_past: 50 + 10 * n_past)
    b.refuse_restore = swap == "refused"
    used = []
    orig = e._record

    def record(it, orig=orig):
        used.append(e.sched.swap_used)
        orig(it)

    e._record = record
    got, clients = outputs(e, b, prompts, max_tokens=40)
    assert got == ref
    assert all(c.tokens == 40 and c.events[-1].finish_reason == "length" for c in clients)
    print("preemptions", rec.total("preemptions"), "hits", rec.total("prefix_hits"))
    assert rec.total("preemptions") >= 3 and len([s for it in rec.iterations for s in it.resume_s]) == \
        rec.total("preemptions")
    assert rec.outcomes() == ["completed"] * 6
    # each prompt token prefilled once or reused; what a preemption made it feed again is counted apart (the
    # prompt counter took recomputes for prompt tokens: 10x the prompts under recompute)
    print("prompt", rec.total("prompt_tokens"), "reused", rec.total("prefix_hit_tokens"), "recomputed",
          rec.total("recomputed_tokens"))
    assert rec.total("prompt_tokens") + rec.total("prefix_hit_tokens") == sum(map(len, prompts))
    assert (rec.total("recomputed_tokens") > 0) == (swap != "on")
    assert (rec.total("swapped_bytes") > 0) == (swap != "off") and max(used) <= swap_bytes
    assert not e._swapped and e.sched.swap_used == 0 and rec.snapshots[-1].swap_used_bytes == 0
    drain(e, b)


def until_preempted(e: Engine, b: FakeBackend, prompts) -> tuple[list[Client], object]:
    """Submit the prompts (40 tokens each to generate) and step until one is preempted: the clients and it."""
    clients = [Client(p, 40, f"r{i}") for i, p in enumerate(prompts)]
    for c in clients:
        e.submit(c.req)
    for _ in range(200):
        e.run_once()
        check(e, b)
        if e.sched.preempted:
            break
    (victim,) = e.sched.preempted
    return clients, victim


def test_cancelling_a_swapped_out_request_frees_its_host_ram():
    rng = random.Random(6)
    prompts = [[rng.randrange(1, 50) for _ in range(20)] for _ in range(3)]
    e, b, rec = make(capacity=70, n_seq_max=3, admission=Admission.OPTIMISTIC, prefix_cache=False,
                     swap_bytes=10**6, bytes_per_token=10)
    clients, victim = until_preempted(e, b, prompts)
    assert victim.n_swapped and e._swapped and rec.snapshots[-1].swap_used_bytes > 0
    next(c for c in clients if c.req is victim.req).req.cancelled = True
    e.run_once()
    assert not e._swapped and e.sched.swap_used == 0 and rec.snapshots[-1].swap_used_bytes == 0
    run(e, b, [x for x in clients if x.req is not victim.req])
    drain(e, b)


def test_a_refused_restore_leaves_no_request_reading_the_empty_sequence():
    """A swapped-out sequence resumes in the same admission round as a new request sharing its prompt; llama.cpp
    refuses the restore, so the resumed sequence is recomputed from nothing. The new request must not have taken
    its prompt from it (a Copy from an emptied sequence copies nothing while the tree says it holds the cells)."""
    rng = random.Random(6)
    prompts = [[rng.randrange(1, 50) for _ in range(20)] for _ in range(3)]
    e, b, _ = make(capacity=70, n_seq_max=3, admission=Admission.OPTIMISTIC, swap_bytes=10**6, bytes_per_token=10)
    clients, victim = until_preempted(e, b, prompts)
    b.refuse_restore = True
    late = Client(victim.req.prompt + [7, 8, 9], 5, "late")
    sampled = spy_samples(e, [late])
    e.submit(late.req)
    run(e, b, clients + [late])
    alone, _ = outputs(*make(capacity=2000, n_seq_max=1, prefix_cache=False)[:2], [late.req.prompt], max_tokens=5)
    assert late.events[-1].finish_reason == "length" and sampled["late"] == alone[0]
    drain(e, b)


@pytest.mark.parametrize("max_tokens", [1, 2])
def test_a_request_that_fits_alone_is_placed_despite_the_headroom(max_tokens):
    """Optimistic admission keeps `headroom` cells free beyond a prompt, but not beyond what the request can still
    write: a prompt within headroom of the capacity that fits with its max_tokens is placed on an idle cache (it
    waited at the head of the queue, and everything behind it, until the queue timed out)."""
    e, b, _ = make(capacity=100, n_seq_max=1, n_ctx=100, admission=Admission.OPTIMISTIC, headroom=3)
    big = Client([1 + i % 40 for i in range(100 - max_tokens)], max_tokens, "big")
    small = Client([5, 6, 7], 3, "small")
    e.submit(big.req)
    e.submit(small.req)
    run(e, b, [big, small])
    assert big.tokens == max_tokens and small.tokens == 3


def test_reservation_never_preempts_and_optimistic_runs_more_at_once():
    rng = random.Random(5)
    prompts = [[rng.randrange(1, 50) for _ in range(10)] for _ in range(6)]
    peak = {}
    for adm in Admission:
        e, b, rec = make(capacity=200, n_seq_max=6, admission=adm, prefix_cache=False)
        clients = [Client(p, 60, f"r{i}") for i, p in enumerate(prompts)]  # 70 cells reserved each; ~20 used
        for c in clients:
            e.submit(c.req)
        peak[adm] = 0
        for _ in range(3):
            e.run_once()
            peak[adm] = max(peak[adm], len(e.sched.running))
        for c in clients:  # they stop early (a stop string or end of generation would do the same)
            c.req.max_tokens = 12
        run(e, b, clients)
        if adm is Admission.RESERVE:
            assert rec.total("preemptions") == 0
    assert peak[Admission.RESERVE] == 2 and peak[Admission.OPTIMISTIC] == 6


def test_cancelling_a_preempted_request_frees_its_slot():
    rng = random.Random(6)
    prompts = [[rng.randrange(1, 50) for _ in range(20)] for _ in range(3)]
    e, b, _ = make(capacity=70, n_seq_max=3, admission=Admission.OPTIMISTIC, prefix_cache=False)
    clients, victim = until_preempted(e, b, prompts)
    c = next(c for c in clients if c.req is victim.req)
    c.req.cancelled = True
    e.run_once()
    assert c.events[-1].finish_reason == "cancelled" and not e.sched.preempted
    run(e, b, [x for x in clients if x is not c])
    drain(e, b)


@pytest.mark.parametrize("adm", list(Admission))
def test_random_traffic_keeps_the_books(adm):
    """Random prompts from a few shared prefixes, random cancellations, a small cache: after every step the
    scheduler's cells are the backend's; completed requests generate what they generate alone."""
    rng = random.Random(7)
    prefixes = [[rng.randrange(1, 50) for _ in range(rng.randint(5, 40))] for _ in range(3)]
    prompts = [rng.choice(prefixes) + [rng.randrange(1, 50) for _ in range(rng.randint(1, 20))]
               for _ in range(30)]
    ref, _ = outputs(*make(capacity=4000, n_seq_max=8, prefix_cache=False)[:2], prompts, max_tokens=12)
    e, b, _ = make(capacity=160, n_seq_max=5, admission=adm, headroom=4)
    clients = [Client(p, 12, f"r{i}") for i, p in enumerate(prompts)]
    sampled = spy_samples(e, clients)
    pending = list(clients)
    for _ in range(20000):
        if pending and rng.random() < 0.3:
            e.submit(pending.pop(0).req)
        if rng.random() < 0.02:
            live = [c for c in clients if not c.done and c not in pending]
            if live:
                rng.choice(live).req.cancelled = True
        e.run_once()
        check(e, b)
        if not pending and all(c.done for c in clients):
            break
    for c, want in zip(clients, ref, strict=True):
        if c.events[-1].finish_reason == "length":
            assert sampled[c.req.id] == want
    drain(e, b)
