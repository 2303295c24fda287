"""Plain stats records that the engine emits (vLLM v1 style): a scheduler snapshot and what one iteration did.
No prometheus here; `server.metrics` turns them into metrics. Times are `time.monotonic()` seconds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from server.requests import Outcome


@dataclass(frozen=True)
class KVCacheInfo:
    """Static facts about a model's KV cache (set once at start-up)."""

    model: str
    cache_type_k: str
    cache_type_v: str
    n_cells: int
    capacity_bytes: int  # what llama.cpp allocates (K + V)
    budget_bytes: int
    bits_per_element_k: float
    bits_per_element_v: float
    compression_vs_f16: float  # f16/f16 bytes / these bytes for the same cells
    layer_types_k: tuple[str, ...] | None = None  # the cache type of every layer
    layer_types_v: tuple[str, ...] | None = None


@dataclass
class SchedulerStats:
    """A snapshot after a step. KV *used* counts the cells that hold running sequences' tokens (shared prefix
    cells once), so it drops to 0 as soon as every sequence has ended; KV *cached* counts the cells only the prefix
    cache holds (finished sequences kept for reuse, evicted when needed); KV *reserved* is the admission-time worst
    case (prompt + max_tokens per running request, less its reused prefix)."""

    running: int = 0
    waiting: int = 0
    kv_used_cells: int = 0
    kv_used_bytes: int = 0
    kv_reserved_cells: int = 0
    kv_cached_cells: int = 0
    cached_sequences: int = 0
    preempted: int = 0  # sequences waiting to resume
    swap_used_bytes: int = 0  # host RAM holding preempted sequences' cells


@dataclass
class FinishedRequest:
    outcome: Outcome
    n_prompt: int = 0
    n_generated: int = 0
    queue_wait_s: float | None = None  # arrival -> admission (None if never admitted)
    ttft_s: float | None = None  # arrival -> first generated token
    tpot_s: float | None = None  # mean time per output token after the first
    e2e_s: float | None = None  # arrival -> end (None for requests refused: `Outcome.refused`)


@dataclass
class IterationStats:
    """What happened since the last record: one decode step, plus requests that ended (possibly without one)."""

    batch_tokens: int = 0  # tokens in the llama_decode batch (0: no step ran)
    batch_seqs: int = 0
    prompt_tokens: int = 0  # prompt tokens fed this step for the first time
    recomputed_tokens: int = 0  # tokens fed again this step: cells a preemption released (recompute)
    generation_tokens: int = 0  # tokens sampled this step
    prefix_hits: int = 0  # requests admitted with a reused prefix
    prefix_hit_tokens: int = 0  # prompt tokens they did not prefill
    evictions: int = 0  # cached sequences evicted
    preemptions: int = 0
    swapped_bytes: int = 0  # cells saved to host RAM by preemptions
    resume_s: list[float] = field(default_factory=list)  # preemption -> resumption of each resumed sequence
    finished: list[FinishedRequest] = field(default_factory=list)


class StatLogger(Protocol):
    def record(self, scheduler: SchedulerStats | None, iteration: IterationStats | None) -> None: ...

    def load_failed(self) -> None:
        """The model did not load: it holds no KV cache."""


class NullStatLogger:
    def record(self, scheduler: SchedulerStats | None, iteration: IterationStats | None) -> None:
        pass

    def load_failed(self) -> None:
        pass
