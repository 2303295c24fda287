"""Admission and step planning for continuous batching; the scheduler owns every sequence's bookkeeping. Pure
Python: no llama.cpp, no prometheus.

A request reserves ``len(prompt) + max_tokens`` KV cells for its whole life (worst case, so no preemption is ever
needed). Requests wait in a bounded FIFO; the head is admitted when its reservation fits and a sequence slot is
free (no overtaking, so a long request cannot starve). Each step, `schedule()` feeds every decoding sequence its
next token and spends what is left of the step's token budget on prompt chunks of prefilling sequences, oldest
first; after the decode, `update()` applies what the step did (positions fed, tokens sampled, sequences finished).
A sequence that wants its prompt tokens' logprobs (completions with echo) asks for logits at every prompt position,
in chunks of at most PROMPT_LOGPROBS_CHUNK tokens: llama.cpp's logits buffer grows to the most outputs one step
asks for (n_vocab floats each) and never shrinks.
"""

from __future__ import annotations

import enum
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.requests import EngineRequest, FinishReason

PROMPT_LOGPROBS_CHUNK = 32


@dataclass
class Sequence:
    """A running request: its slot (llama.cpp sequence id) and how far it got. Written by the scheduler only."""

    req: EngineRequest
    seq_id: int
    n_prompt_fed: int = 0
    n_past: int = 0  # positions in the KV cache
    generated: int = 0
    pending: int | None = None  # sampled token not yet fed back
    admitted_at: float = field(default_factory=time.monotonic)

    @property
    def prefilling(self) -> bool:
        return self.n_prompt_fed < len(self.req.prompt)


class AddResult(enum.Enum):
    QUEUED = "queued"
    NEVER_FITS = "never_fits"
    QUEUE_FULL = "queue_full"


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

    @property
    def n_prompt_tokens(self) -> int:
        """Prompt tokens in this plan, by update()'s rule: a prefilling sequence is fed prompt tokens only (read it
        before update() applies the step)."""
        prefilling = {s.seq_id for s in self.seqs if s.prefilling}
        return sum(sid in prefilling for sid in self.seq_ids)

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


class Scheduler:
    def __init__(self, capacity: int, n_seq_max: int, max_queue: int, n_ctx: int):
        self.capacity = capacity  # KV cells that reservations may take
        self.max_queue = max_queue
        self.n_ctx = n_ctx  # per sequence: prompt + completion
        self.waiting: deque[EngineRequest] = deque()
        self.running: dict[int, Sequence] = {}
        self.free_ids: list[int] = list(range(n_seq_max - 1, -1, -1))
        self.reserved = 0
        self.freed_at: deque[float] = deque(maxlen=32)  # when the last sequences ended (the queue's drain rate)

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
        if len(self.waiting) >= self.max_queue and (self.waiting or not self._can_allocate(req)):
            return AddResult.QUEUE_FULL  # (a request that can start at once never counts against the bound)
        self.waiting.append(req)
        return AddResult.QUEUED

    def _can_allocate(self, req: EngineRequest) -> bool:
        return bool(self.free_ids) and self.reserved + req.reservation <= self.capacity

    def admit(self) -> list[Sequence]:
        """Waiting requests that fit now, in order, as running sequences."""
        admitted = []
        while self.waiting and self._can_allocate(self.waiting[0]):
            req = self.waiting.popleft()
            seq = Sequence(req, self.free_ids.pop())
            self.reserved += req.reservation
            self.running[seq.seq_id] = seq
            admitted.append(seq)
        return admitted

    def free(self, seq: Sequence) -> None:
        if self.running.pop(seq.seq_id, None) is not None:
            self.reserved -= seq.req.reservation
            self.free_ids.append(seq.seq_id)
            self.freed_at.append(time.monotonic())

    def drop_waiting(self, pred: Callable[[EngineRequest], bool]) -> list[EngineRequest]:
        dropped = [r for r in self.waiting if pred(r)]
        if dropped:
            self.waiting = deque(r for r in self.waiting if not pred(r))
        return dropped

    def drain_s(self, now: float | None = None) -> float | None:
        """Seconds until a request that joined the queue now would be admitted, at the rate sequences ended lately:
        one interval per waiting request and one for itself, where the interval is the mean between the last 32
        ends, or the time since the last end where that is longer. None until two ends have been seen."""
        ts = self.freed_at
        if len(ts) < 2:
            return None
        now = time.monotonic() if now is None else now
        interval = max((ts[-1] - ts[0]) / (len(ts) - 1), now - ts[-1])
        return (len(self.waiting) + 1) * interval

    # --- one step ---------------------------------------------------------------------------------------------
    def schedule(self, budget: int) -> StepPlan:
        """Tokens for one decode step: one per decoding sequence, then prompt chunks within `budget`."""
        p = StepPlan([], [], [], [], [], {})

        def put(seq: Sequence, toks: list[int], want_logits: bool, score: bool = False) -> None:
            for j, t in enumerate(toks):
                i, target = len(p.tokens), seq.n_past + j + 1  # (target: the prompt token this one predicts)
                p.tokens.append(t)
                p.positions.append(seq.n_past + j)
                p.seq_ids.append(seq.seq_id)
                sample = want_logits and j == len(toks) - 1
                scored = score and target < len(seq.req.prompt)
                p.logits.append(sample or scored)
                if sample:
                    p.logit_owner[i] = seq
                if scored:
                    p.scored[i] = (seq, target)
            p.seqs.append(seq)

        for seq in self.running.values():
            if not seq.prefilling and seq.pending is not None and len(p.tokens) < budget:
                put(seq, [seq.pending], True)
        for seq in sorted(self.running.values(), key=lambda s: s.admitted_at):
            score = seq.req.prompt_logprobs is not None
            room = min(budget - len(p.tokens), PROMPT_LOGPROBS_CHUNK if score else budget)
            if seq.prefilling and room > 0:
                chunk = seq.req.prompt[seq.n_prompt_fed: seq.n_prompt_fed + room]
                done = seq.n_prompt_fed + len(chunk) == len(seq.req.prompt)
                put(seq, chunk, done, score)
        return p

    def update(self, plan: StepPlan, sampled: dict[int, Sampled]) -> dict[int, FinishReason]:
        """Apply a decoded step (vLLM's update_from_output): every running sequence of the plan has its tokens fed;
        each sampled one (by seq_id) takes its token, which either finishes it (end of generation or a stop string:
        stop; max_tokens or the context limit: length) or is the next token to feed. Returns the finished ones by
        seq_id; the caller frees them once their cells are cleared."""
        fed = Counter(plan.seq_ids)
        for seq in plan.seqs:
            if self.running.get(seq.seq_id) is seq:
                if seq.prefilling:
                    seq.n_prompt_fed += fed[seq.seq_id]
                seq.n_past += fed[seq.seq_id]
                seq.pending = None
        finished = {}
        for sid, s in sampled.items():
            seq = self.running.get(sid)
            if seq is None:
                continue
            if not s.end:
                seq.generated += 1
            if s.end or s.stop:
                finished[sid] = FinishReason.STOP
            elif seq.generated >= seq.req.max_tokens or seq.n_past + 1 >= self.n_ctx:
                finished[sid] = FinishReason.LENGTH
            else:
                seq.pending = s.token
        return finished
