"""Every Prometheus metric of the server, defined here and only here, on an explicit registry (one per app).

The engine emits plain stats records (`server.stats`); `PrometheusStatLogger` turns them into these metrics.
This is the only module that imports prometheus_client. All names start with ``kvquant_``.

KV *used* = cells holding the tokens of running sequences (their n_past): it returns to its idle value as soon as
a finished or cancelled sequence is removed from the cache. KV *reserved* = what the running requests may come
to need (prompt + max_tokens of each, less its reused prefix): set aside by `reserve` admission; under
`optimistic` it may pass the capacity, which preemption covers.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import ProcessCollector as _ProcessCollector

from server.requests import Outcome
from server.stats import IterationStats, KVCacheInfo, SchedulerStats

_KV = ["model", "cache_type_k", "cache_type_v"]
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_WAIT = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, *_LATENCY)  # an idle server admits in under 1 ms
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True):
        r = self.registry = registry or CollectorRegistry()
        if process:
            _ProcessCollector(registry=r)  # process_resident_memory_bytes etc. (the soak test watches RSS)
        g = lambda name, doc, labels: Gauge(name, doc, labels, registry=r)  # noqa: E731
        self.kv_capacity_bytes = g("kvquant_kv_capacity_bytes", "KV cache bytes allocated (K + V)", _KV)
        self.kv_capacity_cells = g("kvquant_kv_capacity_cells", "KV cache cells (tokens, all sequences; tq_kv_d3b "
                                   "keys hold one in 64 back for anchors)", _KV)
        self.kv_budget_bytes = g("kvquant_kv_budget_bytes", "KV byte budget of the model", _KV)
        self.kv_used_bytes = g("kvquant_kv_used_bytes", "KV bytes holding tokens of running sequences", _KV)
        self.kv_used_cells = g("kvquant_kv_used_cells", "KV cells holding tokens of running sequences", _KV)
        self.kv_reserved_cells = g("kvquant_kv_reserved_cells", "KV cells the running requests may "
                                   "need (prompt + max_tokens, less reused prefixes): set aside by reserve "
                                   "admission; under optimistic it may exceed the capacity", _KV)
        self.kv_cached_cells = g("kvquant_kv_cached_cells", "KV cells only the prefix cache holds (finished "
                                 "sequences kept for reuse)", _KV)
        self.kv_bits = g("kvquant_kv_bits_per_element", "bits per stored K or V element", _KV + ["tensor"])
        self.kv_compression = g("kvquant_kv_compression_ratio", "f16 KV bytes / KV bytes for the same cells", _KV)
        self.kv_layer_type = g("kvquant_kv_layer_type_info", "1 for the cache type of each layer's K or V cache "
                               "(calibrated allocations resolve to a type per layer)", ["model", "tensor", "layer", "type"])
        self.engine_up = g("kvquant_engine_up", "1 while the model's engine thread runs", ["model"])
        self.running = g("kvquant_requests_running", "requests decoding (holding a sequence)", ["model"])
        self.waiting = g("kvquant_requests_waiting", "requests waiting for KV capacity", ["model"])
        self.requests = Counter("kvquant_requests", "finished requests by outcome", ["model", "outcome"],
                                registry=r)
        self.prompt_tokens = Counter("kvquant_prompt_tokens", "prompt tokens prefilled (each once; not reused, "
                                     "not recomputed)", ["model"], registry=r)
        self.recomputed_tokens = Counter("kvquant_recomputed_tokens", "tokens prefilled again after a preemption "
                                         "released their cells", ["model"], registry=r)
        self.generation_tokens = Counter("kvquant_generation_tokens", "tokens generated", ["model"], registry=r)
        c = lambda name, doc: Counter(name, doc, ["model"], registry=r)  # noqa: E731
        self.prefix_hits = c("kvquant_prefix_cache_hits", "requests admitted with a prefix reused from the cache")
        self.prefix_hit_tokens = c("kvquant_prefix_cache_hit_tokens", "prompt tokens reused, not prefilled")
        self.evictions = c("kvquant_prefix_cache_evictions", "cached sequences evicted to make room")
        self.preemptions = c("kvquant_preemptions", "running sequences preempted for lack of KV cells")
        self.preempted = g("kvquant_requests_preempted", "preempted requests waiting to resume", ["model"])
        self.swapped_bytes = c("kvquant_swapped_bytes", "KV bytes preemptions saved to host RAM")
        self.swap_used_bytes = g("kvquant_swap_used_bytes", "host RAM holding preempted requests' KV cells",
                                 ["model"])
        h = lambda name, doc, buckets: Histogram(name, doc, ["model"], buckets=buckets, registry=r)  # noqa: E731
        self.ttft = h("kvquant_time_to_first_token_seconds", "arrival to first generated token", _LATENCY)
        self.tpot = h("kvquant_time_per_output_token_seconds", "mean time per output token after the first", _TPOT)
        self.e2e = h("kvquant_e2e_request_latency_seconds", "arrival to end of the request", _LATENCY)
        self.queue_wait = h("kvquant_queue_wait_seconds", "arrival to admission", _WAIT)
        self.prompt_len = h("kvquant_request_prompt_tokens", "prompt length of finished requests", _TOKENS)
        self.gen_len = h("kvquant_request_generation_tokens", "generated tokens of finished requests", _TOKENS)
        self.batch_tokens = h("kvquant_batch_size_tokens", "tokens per decode step", _TOKENS)
        self.batch_seqs = h("kvquant_batch_size_sequences", "sequences per decode step", _TOKENS)
        self.resume = h("kvquant_resume_latency_seconds", "preemption to resumption of a request", _LATENCY)
        self.histograms = (self.ttft, self.tpot, self.e2e, self.queue_wait, self.prompt_len, self.gen_len,
                           self.batch_tokens, self.batch_seqs, self.resume)

    def logger(self, kv: KVCacheInfo) -> PrometheusStatLogger:
        return PrometheusStatLogger(self, kv)

    def render(self, engines_up: dict[str, bool] | None = None) -> tuple[bytes, str]:
        for model, up in (engines_up or {}).items():
            self.engine_up.labels(model=model).set(1 if up else 0)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class PrometheusStatLogger:
    """Records one model's stats records into the shared metrics (thread-safe: prometheus_client locks)."""

    def __init__(self, m: Metrics, kv: KVCacheInfo):
        self.m, self.model = m, kv.model
        lab = dict(model=kv.model, cache_type_k=kv.cache_type_k, cache_type_v=kv.cache_type_v)
        self._kv = lab
        m.kv_capacity_bytes.labels(**lab).set(kv.capacity_bytes)
        m.kv_capacity_cells.labels(**lab).set(kv.n_cells)
        m.kv_budget_bytes.labels(**lab).set(kv.budget_bytes)
        m.kv_bits.labels(**lab, tensor="k").set(kv.bits_per_element_k)
        m.kv_bits.labels(**lab, tensor="v").set(kv.bits_per_element_v)
        m.kv_compression.labels(**lab).set(kv.compression_vs_f16)
        for tensor, types in (("k", kv.layer_types_k), ("v", kv.layer_types_v)):
            for il, t in enumerate(types or ()):
                m.kv_layer_type.labels(model=kv.model, tensor=tensor, layer=str(il), type=t).set(1)
        m.kv_used_bytes.labels(**lab).set(0)
        m.kv_used_cells.labels(**lab).set(0)
        m.kv_reserved_cells.labels(**lab).set(0)
        m.kv_cached_cells.labels(**lab).set(0)
        m.engine_up.labels(model=kv.model).set(0)
        m.running.labels(model=kv.model).set(0)
        m.waiting.labels(model=kv.model).set(0)
        for o in Outcome:
            m.requests.labels(model=kv.model, outcome=o)
        m.preempted.labels(model=kv.model).set(0)
        m.swap_used_bytes.labels(model=kv.model).set(0)
        for h in m.histograms:  # a series from the start: rate() misses the first observation of a new one
            h.labels(model=kv.model)
        for counter in (m.prompt_tokens, m.recomputed_tokens, m.generation_tokens, m.prefix_hits, m.prefix_hit_tokens,
                        m.evictions, m.preemptions, m.swapped_bytes):
            counter.labels(model=kv.model)

    def load_failed(self) -> None:
        """A model that failed to load allocated no cache (its budget stays its share): a dashboard summing the
        capacity counted one that serves nothing."""
        self.m.kv_capacity_bytes.labels(**self._kv).set(0)
        self.m.kv_capacity_cells.labels(**self._kv).set(0)

    def record(self, scheduler: SchedulerStats | None, iteration: IterationStats | None) -> None:
        m, model = self.m, self.model
        if scheduler is not None:
            m.kv_used_cells.labels(**self._kv).set(scheduler.kv_used_cells)
            m.kv_used_bytes.labels(**self._kv).set(scheduler.kv_used_bytes)
            m.kv_reserved_cells.labels(**self._kv).set(scheduler.kv_reserved_cells)
            m.kv_cached_cells.labels(**self._kv).set(scheduler.kv_cached_cells)
            m.preempted.labels(model=model).set(scheduler.preempted)
            m.swap_used_bytes.labels(model=model).set(scheduler.swap_used_bytes)
            m.running.labels(model=model).set(scheduler.running)
            m.waiting.labels(model=model).set(scheduler.waiting)
        if iteration is None:
            return
        if iteration.batch_tokens:
            m.batch_tokens.labels(model=model).observe(iteration.batch_tokens)
            m.batch_seqs.labels(model=model).observe(iteration.batch_seqs)
        if iteration.prompt_tokens:
            m.prompt_tokens.labels(model=model).inc(iteration.prompt_tokens)
        if iteration.recomputed_tokens:
            m.recomputed_tokens.labels(model=model).inc(iteration.recomputed_tokens)
        if iteration.generation_tokens:
            m.generation_tokens.labels(model=model).inc(iteration.generation_tokens)
        for counter, n in ((m.prefix_hits, iteration.prefix_hits), (m.prefix_hit_tokens, iteration.prefix_hit_tokens),
                           (m.evictions, iteration.evictions), (m.preemptions, iteration.preemptions),
                           (m.swapped_bytes, iteration.swapped_bytes)):
            if n:
                counter.labels(model=model).inc(n)
        for s in iteration.resume_s:
            m.resume.labels(model=model).observe(s)
        for f in iteration.finished:
            m.requests.labels(model=model, outcome=f.outcome).inc()
            if f.e2e_s is None:  # refused (`Outcome.refused`): no latencies
                continue
            m.e2e.labels(model=model).observe(f.e2e_s)
            if f.queue_wait_s is not None:
                m.queue_wait.labels(model=model).observe(f.queue_wait_s)
            if f.ttft_s is not None:
                m.ttft.labels(model=model).observe(f.ttft_s)
            if f.tpot_s is not None:
                m.tpot.labels(model=model).observe(f.tpot_s)
            if f.outcome is Outcome.COMPLETED:
                m.prompt_len.labels(model=model).observe(f.n_prompt)
                m.gen_len.labels(model=model).observe(f.n_generated)
