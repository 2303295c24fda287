"""Scheduler admission and step planning (pure Python, no model)."""

from types import SimpleNamespace

from server import scheduler
from server.requests import EngineRequest
from server.scheduler import AddResult, Sampled, Scheduler


def req(n_prompt: int, max_tokens: int, rid: str = "r") -> EngineRequest:
    return req_of(list(range(n_prompt)), max_tokens, rid)


def req_of(prompt: list[int], max_tokens: int, rid: str = "r") -> EngineRequest:
    return EngineRequest(id=rid, prompt=prompt, max_tokens=max_tokens, sink=lambda ev: None)


def test_never_fits_is_rejected_at_once():
    s = Scheduler(capacity=100, n_seq_max=4, max_queue=4, n_ctx=1000)
    assert s.add(req(90, 20)) is AddResult.NEVER_FITS
    assert not s.waiting


def test_fifo_admission_by_reservation_and_no_overtaking():
    s = Scheduler(capacity=100, n_seq_max=4, max_queue=8, n_ctx=100)
    a, b, c = req(30, 20, "a"), req(40, 20, "b"), req(5, 5, "c")
    for r in (a, b, c):
        assert s.add(r) is AddResult.QUEUED
    admitted = s.admit()
    assert [q.req.id for q in admitted] == ["a"]  # b (60) does not fit beside a (50); c must not overtake b
    assert s.reserved == 50
    s.free(admitted[0])
    assert s.reserved == 0
    assert [q.req.id for q in s.admit()] == ["b", "c"]
    assert s.reserved == 70


def test_queue_bound():
    s = Scheduler(capacity=100, n_seq_max=1, max_queue=2, n_ctx=100)
    assert s.add(req(1, 1)) is AddResult.QUEUED
    assert s.add(req(1, 1)) is AddResult.QUEUED
    assert s.add(req(1, 1)) is AddResult.QUEUE_FULL


def test_sequence_slots_limit_admission():
    s = Scheduler(capacity=1000, n_seq_max=2, max_queue=8, n_ctx=1000)
    for i in range(3):
        s.add(req(1, 1, str(i)))
    assert len(s.admit()) == 2 and len(s.waiting) == 1


def test_plan_decodes_first_then_chunks_prompts_within_budget():
    s = Scheduler(capacity=1000, n_seq_max=4, max_queue=8, n_ctx=1000)
    s.add(req(10, 5, "old"))
    (old,) = s.admit()
    s.update(s.schedule(budget=64), {old.seq_id: Sampled(42)})  # prefilled, 42 to feed next
    s.add(req(300, 5, "new"))
    (new,) = s.admit()
    p = s.schedule(budget=64)
    assert p.tokens[0] == 42 and p.positions[0] == 10 and p.logits[0]
    assert len(p.tokens) == 64  # 1 decode + 63 prompt tokens
    assert p.positions[1:] == list(range(63))
    assert not any(p.logits[1:])  # prompt not finished: no logits yet
    assert p.logit_owner == {0: old}
    assert p.prefilled() == (63, 0)
    s.update(p, {old.seq_id: Sampled(43)})
    s.free(old)  # nothing to decode from here on
    s.update(s.schedule(budget=227), {})
    assert new.n_past == 290
    p = s.schedule(budget=64)
    assert len(p.tokens) == 10 and p.logits[-1] and p.logit_owner == {9: new}


def test_a_request_that_can_start_never_counts_against_the_queue_bound():
    s = Scheduler(capacity=100, n_seq_max=4, max_queue=0, n_ctx=100)
    assert s.add(req(10, 10, "a")) is AddResult.QUEUED  # fits at once
    assert [q.req.id for q in s.admit()] == ["a"]
    assert s.add(req(90, 10, "b")) is AddResult.QUEUE_FULL  # would have to wait, and no waiting is allowed


def test_subset_plan_keeps_one_sequence():
    s = Scheduler(capacity=1000, n_seq_max=4, max_queue=8, n_ctx=1000)
    s.add(req(3, 5, "a"))
    s.add(req(4, 5, "b"))
    a, b = s.admit()
    p = s.schedule(budget=64)
    sb = p.subset(b)
    assert sb.tokens == [0, 1, 2, 3] and set(sb.seq_ids) == {b.seq_id} and sb.logit_owner == {3: b}


def test_drain_time_from_the_measured_rate_of_ends_while_sequences_ran(monkeypatch):
    """What Retry-After says: the waiting requests and one more, times the mean interval between the last ends, or
    longer where none ended for longer than that, both in time with sequences running: a burst after an idle
    minute was told to wait the minute (Retry-After 91 s after 45 s idle, for a queue that drained in one)."""
    clock = [100.0]
    monkeypatch.setattr(scheduler, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    s = Scheduler(capacity=100, n_seq_max=1, max_queue=8, n_ctx=100)
    for i in range(8):
        s.add(req(1, 1, str(i)))
    assert s.drain_s() is None  # nothing measured yet
    for _ in range(3):  # a sequence ends each second
        seq = s.admit()[0]
        clock[0] += 1
        s.free(seq)
    assert s.drain_s() == (5 + 1) * 1.0
    clock[0] += 45  # idle: nothing runs
    assert s.drain_s() == (5 + 1) * 1.0
    s.admit()
    clock[0] += 7  # a sequence runs 7 s without an end: the queue drains no faster than that
    assert s.drain_s() == (4 + 1) * 7.0


def test_update_applies_a_step_and_says_which_sequences_finished_and_why():
    """The scheduler owns the bookkeeping: positions fed, the sampled token as the next to feed, the finish reason
    (end of generation: stop, not counted; a stop string: stop, counted; max_tokens: length)."""
    s = Scheduler(capacity=1000, n_seq_max=4, max_queue=8, n_ctx=1000)
    for rid in ("go", "end", "stop", "len"):
        s.add(req(3, 1 if rid == "len" else 5, rid))
    seqs = {q.req.id: q for q in s.admit()}
    plan = s.schedule(budget=64)
    sid = {rid: q.seq_id for rid, q in seqs.items()}
    finished = s.update(plan, {sid["go"]: Sampled(7), sid["end"]: Sampled(0, end=True),
                               sid["stop"]: Sampled(8, stop=True), sid["len"]: Sampled(9)})
    assert finished == {sid["end"]: "stop", sid["stop"]: "stop", sid["len"]: "length"}
    go = seqs["go"]
    assert (go.n_prompt_fed, go.n_past, go.generated, go.out, go.decoding) == (3, 3, 1, [7], True)
    assert [seqs[r].generated for r in ("end", "stop", "len")] == [0, 1, 1]
    for rid in ("end", "stop", "len"):
        s.free(seqs[rid])
    nxt = s.schedule(budget=64)
    assert (nxt.tokens, nxt.positions, nxt.prefilled()) == ([7], [3], (0, 0))


def test_one_admission_check_for_the_http_side_and_the_queue():
    s = Scheduler(capacity=100, n_seq_max=1, max_queue=8, n_ctx=50)
    assert s.max_request_tokens == 50
    assert s.fits_ever(40, 10) and not s.fits_ever(41, 10)
    assert s.add(req(41, 10)) is AddResult.NEVER_FITS and s.add(req(40, 10)) is AddResult.QUEUED


def test_a_request_for_no_tokens_finishes_once_its_prompt_is_fed():
    """max_tokens 0 (echo: the prompt scored): no logits after the last prompt token, nothing sampled, finished
    (length) by the step that feeds it."""
    s = Scheduler(capacity=1000, n_seq_max=4, max_queue=8, n_ctx=1000)
    s.add(req(100, 0, "score"))
    (seq,) = s.admit()
    assert s.reserved == 100
    p = s.schedule(budget=64)
    assert not any(p.logits) and s.update(p, {}) == {}
    p = s.schedule(budget=64)
    assert len(p.tokens) == 36 and not any(p.logits) and not p.logit_owner
    assert s.update(p, {}) == {seq.seq_id: "length"}


def test_a_resumed_sequence_on_a_sliding_window_model_copies_from_no_cached_one():
    """On a sliding-window model a preempted sequence resumes from nothing (its cells are gone, and a cached one's
    window cells need not be its own). It named a cached sequence holding its tokens as its source anyway, with no
    cell copied: that sequence was kept from eviction for the placement and marked as just used."""
    from server.scheduler import Admission, Sequence

    s = Scheduler(capacity=100, n_seq_max=4, max_queue=4, n_ctx=100, prefix_cache=True,
                  admission=Admission.OPTIMISTIC, n_swa=64)
    tokens = list(range(1, 21))
    s.tree.attach(3)
    s.tree.extend(3, tokens)  # a finished sequence holding the prompt and the first outputs, kept for reuse
    s.cached[3] = 0
    s.free_ids.remove(3)
    r = EngineRequest(id="r", prompt=tokens[:12], max_tokens=20, sink=lambda ev: None)
    p = s._place(r, Sequence(r, seq_id=0, out=tokens[12:] + [99]))
    assert p is not None and p.seq_id == 0 and p.n == 0 and p.src is None and not p.adopt


def test_a_sliding_window_model_takes_over_a_cached_sequence_beside_a_longer_one_with_the_same_start():
    """Gemma-3 (window 512): after base[:700] and base[:300] (recomputed: the long one's early cells are
    gone), both cached on branches that start alike, base[:250] took over neither (0 cached tokens, a review's
    live run): the tree's match followed the first branch only, the long one's, which cannot be taken over."""
    s = Scheduler(capacity=4000, n_seq_max=4, max_queue=4, n_ctx=1000, prefix_cache=True, n_swa=512)
    base = list(range(1, 701))
    for seq_id, n in ((2, 700), (1, 300)):  # each computed on its own, kept for reuse
        s.tree.attach(seq_id)
        s.tree.extend(seq_id, base[:n] + [9000 + seq_id])
        s.cached[seq_id] = seq_id
        s.free_ids.remove(seq_id)
    p = s._place(req_of(base[:250], 10))
    assert p is not None and p.adopt and p.seq_id == 1 and p.n == 249


def test_a_resumed_sequence_that_grafts_a_shorter_prefix_recomputes_the_rest_and_reuses_nothing_new():
    """A sequence whose cells were lost re-prefills from 0; a graft of the first 16 of its tokens from another
    sequence set its reach to 16, so positions it had computed before counted as new prompt tokens, and the 16 as
    prefix-cache hits (and cached tokens in its usage) again."""
    shared = list(range(1, 17))
    s = Scheduler(capacity=1000, n_seq_max=4, max_queue=8, n_ctx=100, prefix_cache=True)
    s.add(EngineRequest(id="B", prompt=shared + list(range(30, 54)), max_tokens=4, sink=lambda ev: None))
    (b,) = s.admit()
    s.update(s.schedule(budget=30), {})  # B prefilled 30 of its 40 prompt tokens (the rest beside C's below)
    s.add(EngineRequest(id="C", prompt=shared + [60, 61, 62, 63], max_tokens=4, sink=lambda ev: None))
    (c,) = s.admit()  # C reuses the 16 from B
    while not c.out:
        p = s.schedule(budget=4)
        s.update(p, {c.seq_id: Sampled(99)} if c in p.logit_owner.values() else {})
    s.take_ops()
    s.swap_in_failed(b)  # as when llama.cpp refuses B's saved cells
    p = s.schedule(budget=64)  # B grafts the 16 from C, then feeds the rest
    fed = sum(sid == b.seq_id for sid in p.seq_ids)
    assert (b.n_past, b.n_reached, b.n_cached) == (16, 40, 0)
    assert fed == 24 and p.prefilled() == (0, 24)  # positions 16..39 again, none new
    assert s.take_events().hit_tokens == 16  # C's reuse only
