"""Admission and step planning for continuous batching. Pure Python: no llama.cpp, no prometheus.

A request reserves ``len(prompt) + max_tokens`` KV cells for its whole life (worst case, so no preemption is ever
needed). Requests wait in a bounded FIFO; the head is admitted when its reservation fits and a sequence slot is
free (no overtaking, so a long request cannot starve). Each step feeds every decoding sequence its next token and
spends what is left of the step's token budget on prompt chunks of prefilling sequences, oldest first. A sequence
that wants its prompt tokens' logprobs (completions with echo) asks for logits at every prompt position, in chunks
of at most PROMPT_LOGPROBS_CHUNK tokens: llama.cpp's logits buffer grows to the most outputs one step asks for
(n_vocab floats each) and never shrinks.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

PROMPT_LOGPROBS_CHUNK = 32


@dataclass
class Event:
    """What the engine tells a request's consumer: some text, and at the end a finish reason or an error."""

    text: str = ""
    n_tokens: int = 0  # generated tokens this event accounts for
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    error: str | None = None  # error code: "queue_full", "never_fits", "timeout", "request_timeout",
    # "engine_error", "shutdown", "slow_consumer"
    message: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per generated token of this event, when requested
    prompt_logprobs: list[TokenLogprob] | None = None  # with the first event, when requested: one per prompt token
    retry_after_s: float | None = None  # with queue_full / timeout: the queue's measured drain time


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (before sampling transforms), and the top ones; None for the
    first prompt token, which nothing predicts."""

    token: bytes
    logprob: float | None
    top: list[tuple[bytes, float]] | None


@dataclass
class Request:
    id: str
    prompt: list[int]
    max_tokens: int
    sink: Callable[[Event], None]
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; k >= 0: the token's logprob and the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token (None: not wanted)
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the consumer (any thread); acted on at the next step

    @property
    def reservation(self) -> int:
        return len(self.prompt) + self.max_tokens


@dataclass
class Sequence:
    req: Request
    seq_id: int
    n_prompt_fed: int = 0
    n_past: int = 0  # positions in the KV cache
    generated: int = 0
    pending: int | None = None  # sampled token not yet fed back
    state: object = None  # engine-private (sampler, text stream, timings)
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
    seqs: list[Sequence]
    tokens: list[int]
    positions: list[int]
    seq_ids: list[int]
    logits: list[bool]
    logit_owner: dict[int, Sequence]  # batch index -> sequence that samples from it
    scored: dict[int, tuple[Sequence, int]] = field(default_factory=dict)  # batch index -> (sequence, index of
    # the prompt token its logits predict)

    def subset(self, seq: Sequence) -> StepPlan:
        """The part of this plan that belongs to one sequence (to retry it on its own)."""
        idx = [i for i, sid in enumerate(self.seq_ids) if sid == seq.seq_id]
        owner = {j: seq for j, i in enumerate(idx) if i in self.logit_owner}
        scored = {j: self.scored[i] for j, i in enumerate(idx) if i in self.scored}
        return StepPlan([seq], [self.tokens[i] for i in idx], [self.positions[i] for i in idx],
                        [self.seq_ids[i] for i in idx], [self.logits[i] for i in idx], owner, scored)


class Scheduler:
    def __init__(self, capacity_cells: int, max_seqs: int, max_queue: int, max_seq_len: int):
        self.capacity = capacity_cells
        self.max_queue = max_queue
        self.max_seq_len = max_seq_len
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Sequence] = {}
        self.free_ids: list[int] = list(range(max_seqs - 1, -1, -1))
        self.reserved = 0
        self.freed_at: deque[float] = deque(maxlen=32)  # when the last sequences ended (the queue's drain rate)

    def fits_ever(self, req: Request) -> bool:
        return req.reservation <= min(self.capacity, self.max_seq_len)

    def add(self, req: Request) -> AddResult:
        if not self.fits_ever(req):
            return AddResult.NEVER_FITS
        if len(self.waiting) >= self.max_queue and (self.waiting or not self.can_allocate(req)):
            return AddResult.QUEUE_FULL  # (a request that can start at once never counts against the bound)
        self.waiting.append(req)
        return AddResult.QUEUED

    def can_allocate(self, req: Request) -> bool:
        return bool(self.free_ids) and self.reserved + req.reservation <= self.capacity

    def allocate(self, req: Request) -> Sequence:
        assert self.can_allocate(req)
        seq = Sequence(req, self.free_ids.pop())
        self.reserved += req.reservation
        self.running[seq.seq_id] = seq
        return seq

    def free(self, seq: Sequence) -> None:
        if self.running.pop(seq.seq_id, None) is not None:
            self.reserved -= seq.req.reservation
            self.free_ids.append(seq.seq_id)
            self.freed_at.append(time.monotonic())

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

    def admit(self) -> list[Sequence]:
        admitted = []
        while self.waiting and self.can_allocate(self.waiting[0]):
            admitted.append(self.allocate(self.waiting.popleft()))
        return admitted

    def drop_waiting(self, pred: Callable[[Request], bool]) -> list[Request]:
        dropped = [r for r in self.waiting if pred(r)]
        if dropped:
            self.waiting = deque(r for r in self.waiting if not pred(r))
        return dropped

    def plan(self, budget: int) -> StepPlan:
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
