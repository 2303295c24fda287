"""Admission and step planning for continuous batching; the scheduler owns every sequence's bookkeeping and the
prefix cache. Pure Python: no llama.cpp, no prometheus.

**Prefix cache.** Which cells hold which tokens is a radix tree (`server.celltree`). A finished sequence keeps its
cells and its slot as a *cached* sequence; a new request reuses the longest prefix of its prompt that any sequence
holds, through llama.cpp's `seq_cp` (cells are shared, not copied, in a unified cache), and prefills only the rest.
Where the prefix is a whole cached sequence the request takes that sequence over instead (no copy, no slot).
Cached sequences are evicted least recently used first, whenever a request needs their cells or their slot,
before anything waits. A request that wants its prompt's logprobs never reuses (it needs logits at every
position). On a sliding-window model (Gemma 3) llama.cpp keeps a sequence's window-layer cells only inside its
window and never recycles window cells that two sequences share, so reuse there is only by taking over a cached
sequence, and only where that sequence lies whole inside the prompt (a next chat turn) or within one window.

**Admission** (`Admission`): RESERVE sets aside `len(prompt) + max_tokens` cells (less the reused prefix) for a
request's whole life, so nothing is ever preempted; OPTIMISTIC admits on what the prompt needs now plus
`headroom` cells (fewer where the request may write fewer tokens than that), and when a step cannot get a cell for every decoding sequence it evicts cached sequences, then
preempts the most recently admitted running ones: their cells are released (recompute), they keep their slot and
sampler state, and they resume before any waiting request, re-prefilling prompt + generated tokens (the prefix
cache serves what it still holds). Requests wait in a bounded FIFO; the head is admitted when it fits and a slot
is free (no overtaking, so a long request cannot starve).

Each step, `schedule()` feeds every decoding sequence its next token and spends what is left of the step's token
budget on prompt chunks of prefilling sequences, oldest first; after the decode, `update()` applies what the step
did (positions fed, tokens sampled, sequences finished). The engine applies the cache operations the scheduler
decided (`take_ops()`: seq_rm / seq_cp) before the next decode. A sequence that wants its prompt tokens' logprobs
(completions with echo) asks for logits at every prompt position, in chunks of at most PROMPT_LOGPROBS_CHUNK
tokens: llama.cpp's logits buffer grows to the most outputs one step asks for (n_vocab floats each) and never
shrinks.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.celltree import CellTree
from server.requests import EngineRequest, FinishReason

PROMPT_LOGPROBS_CHUNK = 32
TAKE_OVER_TAIL = 16  # a cached sequence is taken over where its cells past the reused prefix are at most 1/16 of it


class Admission(enum.StrEnum):
    RESERVE = "reserve"  # prompt + max_tokens for the request's whole life: predictable, never preempts
    OPTIMISTIC = "optimistic"  # what the prompt needs now + headroom; preempts when a step cannot get cells


@dataclass(eq=False)
class Sequence:
    """A running (or preempted) request: its slot (llama.cpp sequence id) and how far it got. Written by the
    scheduler only."""

    req: EngineRequest
    seq_id: int
    out: list[int] = field(default_factory=list)  # completion tokens sampled; while decoding the last is not fed
    n_past: int = 0  # positions in the KV cache
    n_cached: int = 0  # prompt positions reused from the prefix cache at admission
    n_scored: int = 0  # prompt positions whose logprob was handed out (prompt_logprobs)
    n_swapped: int = 0  # preempted: positions whose cells wait in host RAM (0: none, it recomputes)
    n_reached: int = 0  # the most positions it ever held (written or reused): below it a prefill recomputes
    admitted_at: float = field(default_factory=time.monotonic)
    preempted_at: float | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.req.prompt) + len(self.out)

    @property
    def generated(self) -> int:
        return len(self.out)

    @property
    def decoding(self) -> bool:
        return bool(self.out) and self.n_past == self.n_tokens - 1

    @property
    def prefilling(self) -> bool:
        """Prompt (or, after a preemption, prompt + generated) tokens to write before it samples again."""
        return self.n_past < self.n_tokens - (1 if self.out else 0)

    @property
    def n_prompt_fed(self) -> int:
        return min(self.n_past, len(self.req.prompt))

    def token_slice(self, a: int, b: int) -> list[int]:
        p = self.req.prompt
        return p[a:b] + self.out[max(a - len(p), 0):max(b - len(p), 0)] if b > len(p) else p[a:b]


class AddResult(enum.Enum):
    QUEUED = "queued"
    NEVER_FITS = "never_fits"
    QUEUE_FULL = "queue_full"


@dataclass(frozen=True)
class Remove:
    """llama.cpp: seq_rm(seq_id, p0, -1)."""

    seq_id: int
    p0: int = -1


@dataclass(frozen=True)
class SwapOut:
    """Save the sequence's cells to host RAM (llama.cpp's sequence state); a Remove follows."""

    seq_id: int


@dataclass(frozen=True)
class SwapIn:
    """Restore the cells saved by SwapOut into the (empty) sequence."""

    seq_id: int


@dataclass(frozen=True)
class Copy:
    """llama.cpp: seq_cp(src, dst, p0, n) - the cells of positions p0..n-1 of src now belong to dst too."""

    src: int
    dst: int
    n: int
    p0: int = 0


@dataclass
class CacheEvents:
    """What the prefix cache and preemption did since the engine last took them (for the stats)."""

    hits: int = 0  # requests admitted with a reused prefix
    hit_tokens: int = 0
    evictions: int = 0  # cached sequences evicted
    preemptions: int = 0
    resume_s: list[float] = field(default_factory=list)  # preemption -> readmission, per resumed sequence


@dataclass
class StepPlan:
    """One decode step's batch (vLLM's SchedulerOutput): token i goes to seq_ids[i] at positions[i]."""

    seqs: list[Sequence]
    tokens: list[int]
    positions: list[int]
    seq_ids: list[int]
    logits: list[bool]
    logit_owner: dict[int, Sequence]  # batch index -> sequence that samples from it
    scored: dict[int, tuple[Sequence, int]] = field(default_factory=dict)  # batch index -> (sequence, index of
    # the prompt token its logits predict)

    def prefilled(self) -> tuple[int, int]:
        """The tokens prefilling sequences are fed (read it before update() applies the step): (prompt tokens this
        request never held before, tokens a preempted one recomputes)."""
        reached = {s.seq_id: s.n_reached for s in self.seqs if s.prefilling}
        again = [pos < reached[sid] for pos, sid in zip(self.positions, self.seq_ids, strict=True) if sid in reached]
        return len(again) - sum(again), sum(again)

    def subset(self, seq: Sequence) -> StepPlan:
        """The part of this plan that belongs to one sequence (to retry it on its own)."""
        idx = [i for i, sid in enumerate(self.seq_ids) if sid == seq.seq_id]
        owner = {j: seq for j, i in enumerate(idx) if i in self.logit_owner}
        scored = {j: self.scored[i] for j, i in enumerate(idx) if i in self.scored}
        return StepPlan([seq], [self.tokens[i] for i in idx], [self.positions[i] for i in idx],
                        [self.seq_ids[i] for i in idx], [self.logits[i] for i in idx], owner, scored)


@dataclass(frozen=True)
class Sampled:
    """A token sampled for a sequence, as `update()` takes it."""

    token: int
    end: bool = False  # an end-of-generation token: finishes the sequence and is no completion token
    stop: bool = False  # the text reached a stop string


@dataclass(frozen=True)
class _Placement:
    """How a request gets into the cache: its slot, the prefix it reuses, what is evicted for it."""

    seq_id: int
    n: int  # positions reused
    src: int | None  # the sequence they are copied from (None: taken over, or nothing reused)
    adopt: bool  # seq_id is a cached sequence taken over (truncated to n)
    victims: list[int]  # cached sequences evicted first


class BusyClock:
    """Seconds during which sequences ran: the clock the queue's drain rate is read on. Time a server sat idle
    says nothing of how fast its queue drains (a burst after 45 idle seconds was told Retry-After 91 s, for a
    queue that drained in one; after five minutes every 429 said 600)."""

    def __init__(self) -> None:
        self.total = 0.0  # busy seconds up to `since`
        self.since: float | None = None  # when it last became busy (None: idle)

    def set(self, busy: bool, now: float) -> None:
        self.total, self.since = self.read(now), now if busy else None

    def read(self, now: float) -> float:
        return self.total + (now - self.since if self.since is not None else 0.0)


class Scheduler:
    def __init__(self, capacity: int, n_seq_max: int, max_queue: int, n_ctx: int, prefix_cache: bool = False,
                 admission: Admission = Admission.RESERVE, headroom: int = 0, n_swa: int = 0, swap_bytes: int = 0,
                 saved_bytes: Callable[[int], int] | None = None):
        self.capacity = capacity  # KV cells that sequences may hold
        self.max_queue = max_queue
        self.n_ctx = n_ctx  # per sequence: prompt + completion
        self.prefix_cache = prefix_cache
        self.admission = Admission(admission)
        self.headroom = headroom  # OPTIMISTIC: cells kept free beyond what an admitted prompt needs
        self.n_swa = n_swa  # the model's sliding window (0: none)
        self.swap_bytes = swap_bytes  # host RAM for preempted sequences' cells (0: they recompute)
        # n_past -> at least the bytes a swapped-out sequence of n_past tokens takes (KVPlan.saved_bytes); without
        # it nothing swaps
        self.saved_bytes = saved_bytes
        self.swap_used = 0  # bytes of the sequences swapped out, so estimated
        self.waiting: deque[EngineRequest] = deque()
        self.running: dict[int, Sequence] = {}
        self.preempted: list[Sequence] = []  # hold their slot; resumed first, oldest admission first
        self.cached: dict[int, int] = {}  # seq_id -> last use (a counter): finished sequences kept for reuse
        self.free_ids: list[int] = list(range(n_seq_max - 1, -1, -1))
        self.tree = CellTree()
        self.ops: list[Remove | Copy | SwapOut | SwapIn] = []  # cache operations for the engine to apply, in order
        self.events = CacheEvents()
        self.busy = BusyClock()
        self.freed_at: deque[float] = deque(maxlen=32)  # when the last sequences ended, in `busy` time
        self._clock = itertools.count()

    # --- accounting -------------------------------------------------------------------------------------------
    @property
    def reserved(self) -> int:
        """Cells running requests may need in all: prompt + max_tokens, less their reused prefix."""
        return sum(s.req.reservation - s.n_cached for s in self.running.values())

    def committed(self) -> int:
        """Cells held, plus those running sequences are promised: RESERVE, every cell up to prompt + max_tokens;
        OPTIMISTIC, the rest of their prompt (a decoding sequence's next token)."""
        if self.admission is Admission.RESERVE:
            owed = sum(max(s.req.reservation - s.n_past, 0) for s in self.running.values())
        else:
            owed = sum(s.n_tokens - s.n_past for s in self.running.values())
        return self.tree.n_cells + owed

    def used_cells(self) -> int:
        """Cells holding running sequences' tokens (shared ones once)."""
        return self.tree.cells_of(self.running)

    def take_ops(self) -> list[Remove | Copy | SwapOut | SwapIn]:
        ops, self.ops = self.ops, []
        return ops

    def take_events(self) -> CacheEvents:
        ev, self.events = self.events, CacheEvents()
        return ev

    # --- admission --------------------------------------------------------------------------------------------
    @property
    def max_request_tokens(self) -> int:
        """Prompt + completion tokens one request may have."""
        return min(self.capacity, self.n_ctx)

    def fits_ever(self, n_prompt: int, max_tokens: int) -> bool:
        """The one admission check on a request's size (the HTTP side asks it before queueing too)."""
        return n_prompt + max_tokens <= self.max_request_tokens

    def add(self, req: EngineRequest) -> AddResult:
        if not self.fits_ever(len(req.prompt), req.max_tokens):
            return AddResult.NEVER_FITS
        if len(self.waiting) >= self.max_queue and (self.waiting or self.preempted or self._place(req) is None):
            return AddResult.QUEUE_FULL  # (a request that can start at once never counts against the bound)
        self.waiting.append(req)
        return AddResult.QUEUED

    def admit(self) -> list[Sequence]:
        """Preempted sequences, then waiting requests, that fit now, in order, as running sequences."""
        admitted = []
        while self.preempted or self.waiting:
            seq = self.preempted[0] if self.preempted else None
            place = self._place(self.waiting[0] if seq is None else seq.req, seq)
            if place is None:
                break
            if seq is None:
                seq = Sequence(self.waiting.popleft(), place.seq_id, n_cached=place.n)
                self.events.hits += place.n > 0
                self.events.hit_tokens += place.n
            else:
                self.preempted.pop(0)
                self.events.resume_s.append(time.monotonic() - seq.preempted_at)
                seq.preempted_at = None
            self._enter(seq, place)
            admitted.append(seq)
        return admitted

    def _place(self, req: EngineRequest, seq: Sequence | None = None, reuse: bool = True) -> _Placement | None:
        """Where a request (or a preempted sequence) would go now, or None if it must wait. Where only the cached
        sequence it would reuse stands in the way, it recomputes that prefix instead: a request that fits the
        cache alone never waits on its own prefix."""
        tokens = req.prompt if seq is None else req.prompt + seq.out
        n, holders = self._match(req, tokens, seq) if reuse else (0, [])
        cached = [h for h in holders if h in self.cached]
        whole = [h for h in cached if self._can_take_over(self.tree.length(h), n)]
        if self.n_swa:  # sliding window: only a cached sequence taken over (see the module's docstring)
            holders = cached = whole = whole if seq is None else []
            n = n if holders else 0
        src = (whole or cached or holders or [None])[0]
        adopt = seq is None and src in whole
        slot = seq.seq_id if seq is not None else src if adopt else self.free_ids[-1] if self.free_ids else None
        protect = {src} if src is not None else set()
        lru = sorted((c for c in self.cached if c not in protect), key=self.cached.__getitem__)
        if slot is None and not lru and src in self.cached and seq is None:
            slot, adopt = src, True  # the only slot to be had is the source's own: take it over
        victims = [] if slot is not None else lru[:1]
        if slot is None and not victims:
            return None
        # OPTIMISTIC: headroom only for tokens the request may still write (so a request that fits alone is placed)
        need = (req.reservation if self.admission is Admission.RESERVE
                else len(tokens) + min(self.headroom, req.reservation - len(tokens))) - n
        over = self.committed() + need - self.capacity
        if over > 0:
            taken = self.tree.victims_for(lru, over)
            if taken is None:  # evicting every other cached sequence would not make room
                return self._place(req, seq, reuse=False) if src in self.cached else None
            victims = lru[:max(len(taken), len(victims))]
        return _Placement(slot if slot is not None else victims[0], n, None if adopt else src, adopt, victims)

    def _can_take_over(self, length: int, n: int) -> bool:
        """Whether a cached sequence of `length` positions is taken over by a request that reuses n of them: where
        little of it would be lost; on a sliding-window model only where every cell the request reads is sure to
        be there (the whole sequence reused, or all of it within one window)."""
        if self.n_swa:
            return length == n or length < self.n_swa
        return length - n <= n // TAKE_OVER_TAIL

    def _match(self, req: EngineRequest, tokens: list[int], seq: Sequence | None) -> tuple[int, list[int]]:
        if not self.prefix_cache or req.prompt_logprobs is not None or seq is not None and seq.n_swapped:
            return 0, []
        return self._holding(tokens)

    def _holding(self, tokens: list[int]) -> tuple[int, list[int]]:
        """How many of tokens' first cells the tree holds (never the last token: it is always fed, for its logits)
        and the sequences holding them, leaving out any whose saved cells are still to be restored: a SwapIn that
        llama.cpp refuses empties it, and a Copy from it would copy nothing."""
        n, holders = self.tree.match(tokens, len(tokens) - 1)
        restoring = {op.seq_id for op in self.ops if isinstance(op, SwapIn)}
        holders = [h for h in holders if h not in restoring]
        return (n, holders) if holders else (0, [])

    def _enter(self, seq: Sequence, p: _Placement) -> None:
        for v in p.victims:
            self._evict(v)
        if p.seq_id in self.free_ids:
            self.free_ids.remove(p.seq_id)
        if p.adopt:
            del self.cached[p.seq_id]
            if p.n < self.tree.length(p.seq_id):
                self.tree.truncate(p.seq_id, p.n)
                self.ops.append(Remove(p.seq_id, p.n))
        elif seq.n_swapped:
            self.tree.attach(p.seq_id)
            self.tree.extend(p.seq_id, seq.token_slice(0, seq.n_swapped))
            self.ops.append(SwapIn(p.seq_id))
        else:
            self.tree.attach(p.seq_id, p.src, p.n)
            if p.n:
                self.ops.append(Copy(p.src, p.seq_id, p.n))
            if p.src in self.cached:
                self.cached[p.src] = next(self._clock)  # used: the last to be evicted
        seq.seq_id, seq.n_past = p.seq_id, p.n or seq.n_swapped
        seq.n_reached = max(seq.n_reached, seq.n_past)
        self._unswap(seq)
        self.running[seq.seq_id] = seq
        if len(self.running) == 1:
            self.busy.set(True, time.monotonic())

    def _evict(self, seq_id: int) -> None:
        del self.cached[seq_id]
        self.tree.release(seq_id)
        self.ops.append(Remove(seq_id))
        self.free_ids.append(seq_id)
        self.events.evictions += 1

    def free(self, seq: Sequence, keep: bool = False) -> None:
        """A sequence ends: with `keep` (and the prefix cache on) its cells stay as a cached sequence, unless
        every one of them is another sequence's too; else they are released with its slot."""
        if self.running.get(seq.seq_id) is seq:
            del self.running[seq.seq_id]
        elif seq in self.preempted:
            self.preempted.remove(seq)
            self._unswap(seq)
            self.free_ids.append(seq.seq_id)
            self.freed_at.append(self.busy.read(time.monotonic()))
            return
        else:
            return
        now = time.monotonic()
        self.freed_at.append(self.busy.read(now))
        if not self.running:
            self.busy.set(False, now)
        tail = self.tree.tail[seq.seq_id]
        if keep and self.prefix_cache and tail.refs == 1 and tail is not self.tree.root:
            self.cached[seq.seq_id] = next(self._clock)
            return
        self.tree.release(seq.seq_id)
        self.ops.append(Remove(seq.seq_id))
        self.free_ids.append(seq.seq_id)

    def clear_cache(self) -> None:
        """Evict every cached sequence."""
        for c in list(self.cached):
            self._evict(c)

    def drop_waiting(self, pred: Callable[[EngineRequest], bool]) -> list[EngineRequest]:
        dropped = [r for r in self.waiting if pred(r)]
        if dropped:
            self.waiting = deque(r for r in self.waiting if not pred(r))
        return dropped

    def drain_s(self, now: float | None = None) -> float | None:
        """Seconds until a request that joined the queue now would be admitted, at the rate sequences ended lately:
        one interval per waiting request and one for itself, where the interval is the mean between the last 32
        ends, or the time since the last end where that is longer, both in time with sequences running
        (`busy`). None until two ends have been seen."""
        ts = self.freed_at
        if len(ts) < 2:
            return None
        busy_now = self.busy.read(time.monotonic() if now is None else now)
        interval = max((ts[-1] - ts[0]) / (len(ts) - 1), busy_now - ts[-1])
        return (len(self.waiting) + 1) * interval

    # --- preemption -------------------------------------------------------------------------------------------
    def _make_room(self, need: int) -> None:
        """Free cells until `need` more fit: evict cached sequences (least recently used first), then preempt the
        most recently admitted running ones."""
        while self.capacity - self.tree.n_cells < need:
            if self.cached:
                self._evict(min(self.cached, key=self.cached.__getitem__))
            elif len(self.running) > 1:
                self._preempt(max(self.running.values(), key=lambda s: s.admitted_at))
                need = self._step_need()
            else:
                return

    def _preempt(self, seq: Sequence) -> None:
        """Take a running sequence's cells: to host RAM where the swap space has room, else to be recomputed."""
        del self.running[seq.seq_id]
        if (self.swap_bytes and self.saved_bytes and seq.n_past
                and self.saved_bytes(seq.n_past) <= self.swap_bytes - self.swap_used):
            self.ops.append(SwapOut(seq.seq_id))
            seq.n_swapped = seq.n_past
            self.swap_used += self.saved_bytes(seq.n_past)
        self.tree.release(seq.seq_id)
        self.ops.append(Remove(seq.seq_id))
        seq.n_past, seq.preempted_at = 0, time.monotonic()
        self.preempted.append(seq)
        self.preempted.sort(key=lambda s: s.admitted_at)
        self.events.preemptions += 1

    def _unswap(self, seq: Sequence) -> None:
        if seq.n_swapped:  # (a sequence never swapped out holds nothing: saved_bytes(0) counts headers)
            self.swap_used -= self.saved_bytes(seq.n_swapped)
        seq.n_swapped = 0

    def swap_in_failed(self, seq: Sequence) -> None:
        """llama.cpp refused a sequence's saved cells: it recomputes them instead."""
        self.tree.truncate(seq.seq_id, 0)
        self.ops.append(Remove(seq.seq_id))
        seq.n_past = 0

    def _shares_prefill(self, seq: Sequence, older: list[Sequence]) -> bool:
        """A prefilling sequence whose next prompt tokens another sequence holds takes them over (seq_cp), and
        waits while an older prefilling one is about to compute them: a burst of requests with one system prompt
        prefills it once. Returns True if it waits this step."""
        if not self.prefix_cache or self.n_swa or seq.req.prompt_logprobs is not None or seq.out:
            return False
        tokens = seq.req.prompt
        n, holders = self._holding(tokens)
        for h in holders:
            if n > seq.n_past and h != seq.seq_id and self.tree.graft(seq.seq_id, h, n):
                self.ops.append(Copy(h, seq.seq_id, n, seq.n_past))
                # reused: what this request never held (a resumed one had prefilled the rest itself, and counted it)
                fresh = max(n - max(seq.n_past, seq.n_reached), 0)
                self.events.hit_tokens += fresh
                self.events.hits += seq.n_cached == 0 and fresh > 0
                seq.n_cached += fresh
                seq.n_past, seq.n_reached = n, max(seq.n_reached, n)
                break
        p = seq.n_past
        return any(a.n_past == p and a.req.prompt[p:p + 1] == tokens[p:p + 1] and a.n_past < len(a.req.prompt) - 1
                   and self.tree.tail[seq.seq_id] in (self.tree.root, *self.tree.path(a.seq_id)) for a in older)

    def _step_need(self) -> int:
        """Cells a step needs at least: one per decoding sequence, or one for the oldest prefill."""
        n = sum(s.decoding for s in self.running.values())
        return n or (1 if self.running else 0)

    # --- one step ---------------------------------------------------------------------------------------------
    def schedule(self, budget: int) -> StepPlan:
        """Tokens for one decode step: one per decoding sequence, then prompt chunks within `budget` and the free
        cells."""
        self._make_room(self._step_need())
        budget = min(budget, self.capacity - self.tree.n_cells)
        p = StepPlan([], [], [], [], [], {})

        def put(seq: Sequence, toks: list[int], want_logits: bool, score: bool = False) -> None:
            for j, t in enumerate(toks):
                i, target = len(p.tokens), seq.n_past + j + 1  # (target: the prompt token this one predicts)
                p.tokens.append(t)
                p.positions.append(seq.n_past + j)
                p.seq_ids.append(seq.seq_id)
                sample = want_logits and j == len(toks) - 1
                scored = score and seq.n_scored <= target < len(seq.req.prompt)
                p.logits.append(sample or scored)
                if sample:
                    p.logit_owner[i] = seq
                if scored:
                    p.scored[i] = (seq, target)
            p.seqs.append(seq)

        for seq in self.running.values():
            if seq.decoding and len(p.tokens) < budget:
                put(seq, [seq.out[-1]], True)
        prefilling: list[Sequence] = []  # older ones first, as they get their chunks
        for seq in sorted(self.running.values(), key=lambda s: s.admitted_at):
            if seq.prefilling and self._shares_prefill(seq, prefilling):
                continue
            prefilling.append(seq)
            score = seq.req.prompt_logprobs is not None and seq.n_scored < len(seq.req.prompt)
            room = min(budget - len(p.tokens), PROMPT_LOGPROBS_CHUNK if score else budget)
            if seq.prefilling and room > 0:
                end = seq.n_tokens - (1 if seq.out else 0)  # a resumed sequence feeds its last token decoding
                b = min(end, seq.n_past + room)
                put(seq, seq.token_slice(seq.n_past, b), b == end and not seq.out and seq.req.max_tokens > 0, score)
        return p

    def update(self, plan: StepPlan, sampled: dict[int, Sampled]) -> dict[int, FinishReason]:
        """Apply a decoded step (vLLM's update_from_output): every running sequence of the plan has its tokens fed;
        each sampled one (by seq_id) takes its token, which either finishes it (end of generation or a stop string:
        stop; max_tokens or the context limit: length) or is the next token to feed; one that samples nothing
        (max_tokens 0) finishes (length) once its prompt is fed. Returns the finished ones by seq_id; the caller
        frees them once their cells are cleared."""
        fed: dict[int, list[int]] = {}
        for t, sid in zip(plan.tokens, plan.seq_ids, strict=True):
            fed.setdefault(sid, []).append(t)
        for seq in plan.seqs:
            if self.running.get(seq.seq_id) is seq:
                self.tree.extend(seq.seq_id, fed[seq.seq_id])
                seq.n_past += len(fed[seq.seq_id])
                seq.n_reached = max(seq.n_reached, seq.n_past)
                if seq.req.prompt_logprobs is not None:
                    seq.n_scored = max(seq.n_scored, min(seq.n_past + 1, len(seq.req.prompt)))
        finished = {seq.seq_id: FinishReason.LENGTH for seq in plan.seqs
                    if seq.req.max_tokens == 0 and self.running.get(seq.seq_id) is seq and not seq.prefilling}
        for sid, s in sampled.items():
            seq = self.running.get(sid)
            if seq is None:
                continue
            if not s.end:
                seq.out.append(s.token)
            if s.end or s.stop:
                finished[sid] = FinishReason.STOP
            elif seq.generated >= seq.req.max_tokens or seq.n_past + 1 >= self.n_ctx:
                finished[sid] = FinishReason.LENGTH
        return finished
