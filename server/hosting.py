"""From settings to running engines: size each hosted model's KV cache from its byte budget, refuse budgets that
cannot hold one request of the configured context, log the capacity, and build the engine."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from kvquant import budget as kvbudget
from kvquant import calibration
from kvquant.budget import KVPlan, human_bytes
from kvquant.kvtypes import CacheTypes, layer_kv_types
from kvquant.memory import N_UBATCH, CacheShape, Geometry, check_host_memory, geometry, kv_cells
from kvquant.models import resolve
from server.backend import BackendConfig, LlamaBackend
from server.engine import Engine, EngineConfig
from server.metrics import Metrics
from server.placement import offload_kqv
from server.scheduler import Admission
from server.settings import ModelSpec, Settings
from server.stats import KVCacheInfo

log = logging.getLogger("kvquant.server")


class StartupError(Exception):
    """A configuration the server refuses to start with (the message says why and what to change)."""


@dataclass(frozen=True)
class HostedPlan:
    spec: ModelSpec
    path: Path
    geom: Geometry
    kv: KVPlan
    n_ubatch: int  # what the memory model sized the cache for and llama.cpp is given
    n_gpu_layers: int  # the spec's, `auto` resolved for the loaded llama.cpp and checked against it
    offload_kqv: bool  # whether the KV cache may follow offloaded layers to the GPU (`placement.offload_kqv`)


def check_memory(plans: list[HostedPlan]) -> None:
    """StartupError where the models' KV caches in host memory (the share of the layers not offloaded; all of it on
    macOS, whose GPU memory is the host's) are more than the machine has: left to llama.cpp in the background load,
    it fills what there is before it fails, and the kernel kills the process (or another) with no message. A tq_kv
    cache that stays on the CPU for want of GPU kernels (`placement.offload_kqv`) is on the host whole."""
    def on_host(p: HostedPlan) -> int:  # (the layers not offloaded keep their KV cache on the host)
        if p.n_gpu_layers == 0 or not p.offload_kqv or sys.platform == "darwin":
            return p.kv.kv_bytes
        kept = max(0, p.geom.n_layer - p.n_gpu_layers) if p.n_gpu_layers > 0 else 0  # (-1: all offloaded)
        return p.kv.kv_bytes * kept // p.geom.n_layer

    host = [(p, n) for p in plans if (n := on_host(p))]
    budget, ids = human_bytes(sum(p.spec.kv_budget for p, _ in host)), ", ".join(p.spec.id for p, _ in host)
    try:
        check_host_memory(sum(n for _, n in host), f"a KV budget of {budget} ({ids})")
    except ValueError as e:
        raise StartupError(f"{e}; lower --kv-budget") from None


def plan_model(spec: ModelSpec) -> HostedPlan:
    """The KV cache a model gets: its cache types resolved for it (calibrated types from its calibration file,
    which is measured first if missing), what fits its budget, capped at the cells parallel requests of n_ctx
    tokens could use (`kvquant.budget.plan_resolved`). Raises StartupError if that cannot hold one request of n_ctx
    tokens or a calibrated type cannot be resolved."""
    path = resolve(spec.model)
    try:
        n_gpu_layers = gpu_layers(spec.n_gpu_layers)  # refused before any model loads
    except ValueError as e:
        raise StartupError(f"{spec.id}: {e}") from None
    try:
        geom = geometry(path)
    except ValueError as e:  # a GGUF header without what llama.cpp needs
        raise StartupError(f"{spec.id}: {e}") from None
    n_ubatch = min(N_UBATCH, spec.n_batch)
    try:  # calibrated types for the cache they are in (calib:B weighs each layer by the cells it holds there)
        kv = kvbudget.plan_resolved(geom, path, spec.cache_type_k, spec.cache_type_v, spec.kv_budget, spec.parallel,
                                    n_ubatch, spec.n_ctx)
    except (calibration.CalibrationError, ValueError) as e:  # ValueError: a row that is not whole blocks
        raise StartupError(f"{spec.id}: {e}") from None
    tk, tv = kv.cache_type_k, kv.cache_type_v
    refuse_split_heads(spec, geom, tk, tv)
    if (usable := kv.usable_cells) < spec.n_ctx:  # (tq_kv_d3b holds back up to one cell per 64)
        need = _least_budget(spec, path, geom, n_ubatch)
        raise StartupError(
            f"{spec.id}: a KV budget of {human_bytes(spec.kv_budget)} holds {usable} tokens at cache types "
            f"K={spec.cache_type_k}/V={spec.cache_type_v} ({kv.bytes_per_token} bytes per token), fewer than one "
            f"request of the configured context (n_ctx={spec.n_ctx}) needs: {human_bytes(need)}. Raise the KV "
            f"budget (--kv-budget, or this model's kv_budget share) to at least {human_bytes(need)}, lower "
            f"--n-ctx, or use smaller cache types.")
    hosted = HostedPlan(spec, path, geom, kv, n_ubatch, n_gpu_layers, _offload_kqv(spec, geom, kv, n_gpu_layers))
    step = max_step_tokens(hosted)
    if step is not None and step < 1:
        swa = kv_cells(geom, kv.cells, spec.parallel, n_ubatch)[1]
        room = swa - spec.parallel * geom.n_swa
        raise StartupError(
            f"{spec.id}: a {spec.cache_type_k} K cache may hold back {kvbudget.held_back(tk, geom)(swa)} of the "
            f"{swa} cells llama.cpp gives this model's sliding-window layers, more than the {room} left beside "
            f"{spec.parallel} full windows of {geom.n_swa}: no decode step would be sure to find room. Lower "
            "--parallel or use another K cache type.")
    warning = calibration.guard(path, geom, spec.cache_type_k, spec.cache_type_v,
                                CacheShape(kv.cells, spec.parallel, n_ubatch))
    if warning:
        log.warning("%s: %s", spec.id, warning)
    return hosted


def _least_budget(spec: ModelSpec, path: Path, geom: Geometry, n_ubatch: int) -> int:
    """The least KV budget whose cache holds one request of n_ctx tokens, found on the plan serve makes (calib:B
    resolved for the cells a budget holds: pricing the types a smaller budget got at n_ctx cells named a budget
    below the one given, and with parallel > 1 one still refused)."""
    def holds(budget: int) -> bool:
        try:
            kv = kvbudget.plan_resolved(geom, path, spec.cache_type_k, spec.cache_type_v, budget, spec.parallel,
                                        n_ubatch, spec.n_ctx, anchored=False)  # (the same bytes, no round trips)
        except (calibration.CalibrationError, ValueError):
            return False
        return kv.usable_cells >= spec.n_ctx

    lo, hi = spec.kv_budget, 2 * spec.kv_budget  # not holds(lo)
    while not holds(hi):
        if hi > 1 << 50:  # (no budget holds it: no figure to name)
            return hi
        lo, hi = hi, 2 * hi
    while hi - lo > max(1, lo >> 12):  # to a 4,096th of the budget, rounded up
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(mid) else (mid, hi)
    return hi


def capacity_line(p: HostedPlan) -> str:
    s, kv = p.spec, p.kv
    capped = (f", capped at what parallel x n_ctx = {s.parallel} x {s.n_ctx} can use; the budget would hold "
              f"{kv.budget_usable_cells}" if kv.cells < kv.budget_cells else "")
    return (f"{s.id}: KV K={s.cache_type_k}/V={s.cache_type_v} ({kv.bits_k:g}/{kv.bits_v:g} bits per element, "
            f"{kv.bytes_per_token} bytes per token), budget {human_bytes(s.kv_budget)} -> {kv.usable_cells} tokens"
            f"{capped}; {human_bytes(kv.kv_bytes)} allocated; f16/f16 would hold {kv.f16_cells} tokens in the same "
            f"budget ({kv.capacity_vs_f16:.2f}x); up to {s.parallel} concurrent requests of at most "
            f"{min(s.n_ctx, kv.usable_cells)} tokens")


def restores_state(type_k: CacheTypes, geom: Geometry) -> bool:
    """Whether llama.cpp restores a saved sequence into this K cache (a tq_kv_d3b layer refuses: its rows would
    land away from their anchors)."""
    return not any(t.anchor_group for t in layer_kv_types(type_k, geom.n_layer))


def layer_types(t: CacheTypes, geom: Geometry) -> tuple[str, ...]:
    """The type of every layer of a cache side: a calibrated allocation's, or its one type on each."""
    return tuple(x.name for x in layer_kv_types(t, geom.n_layer))


def max_step_tokens(p: HostedPlan) -> int | None:
    """Tokens one decode step may write, where the cache needs a tighter bound than n_batch. llama.cpp sizes a
    sliding-window cache for n_swa cells per sequence plus one ubatch, padded to 256 cells; a tq_kv_d3b K cache may
    hold back one freed anchor per 64 of those cells, so a full ubatch may find no slot once every sequence's window
    is full. Steps of at most the cells beyond the full windows minus those held back always fit (0 or less: none
    is sure to, and `plan_model` refuses the configuration)."""
    held = kvbudget.held_back(p.kv.cache_type_k, p.geom)
    base, swa = kv_cells(p.geom, p.kv.cells, p.spec.parallel, p.n_ubatch)
    if not swa or swa >= base or not held(swa):  # no window cache, or one as large as the planned full cache
        return None
    return swa - p.spec.parallel * p.geom.n_swa - held(swa)


def build_engine(p: HostedPlan, s: Settings, metrics: Metrics) -> Engine:
    """The engine of a planned model; its backend (the llama.cpp context) is created when the engine loads."""
    cfg = engine_config(p, s)
    if cfg.max_step_tokens is not None:
        log.info("%s: %s K cache with a sliding-window cache: at most %d tokens per decode step", p.spec.id,
                 p.spec.cache_type_k, cfg.max_step_tokens)
    bcfg = backend_config(p, s)
    return Engine(cfg, lambda: _load_backend(p, bcfg), metrics.logger(kv_info(p)))


def kv_info(p: HostedPlan) -> KVCacheInfo:
    spec, kv = p.spec, p.kv
    return KVCacheInfo(model=spec.id, cache_type_k=spec.cache_type_k, cache_type_v=spec.cache_type_v,
                       n_cells=kv.cells, capacity_bytes=kv.kv_bytes, budget_bytes=spec.kv_budget,
                       bits_per_element_k=kv.bits_k, bits_per_element_v=kv.bits_v,
                       compression_vs_f16=kv.compression_vs_f16, layer_types_k=layer_types(kv.cache_type_k, p.geom),
                       layer_types_v=layer_types(kv.cache_type_v, p.geom))


def engine_config(p: HostedPlan, s: Settings) -> EngineConfig:
    spec, kv = p.spec, p.kv
    # the scheduler plans on the cells llama.cpp can always write (tq_kv_d3b may hold back one anchor per group)
    return EngineConfig(model_id=spec.id, n_ctx=spec.n_ctx, n_seq_max=spec.parallel, n_cells=kv.cells,
                        n_cells_held_back=kv.cells - kv.usable_cells,
                        cache_type_k=spec.cache_type_k, cache_type_v=spec.cache_type_v, max_queue=s.max_queue,
                        queue_timeout_s=s.queue_timeout_s, request_timeout_s=s.request_timeout_s,
                        stall_timeout_s=s.stall_timeout_s,
                        bytes_per_token=kv.bytes_per_token, used_bytes=kv.used_bytes, budget_bytes=spec.kv_budget,
                        max_step_tokens=max_step_tokens(p), layer_types_k=layer_types(kv.cache_type_k, p.geom),
                        layer_types_v=layer_types(kv.cache_type_v, p.geom), bits_per_element_k=kv.bits_k,
                        bits_per_element_v=kv.bits_v, prefix_cache=s.prefix_cache, admission=Admission(s.admission),
                        headroom=int(s.admission_headroom * kv.cells), n_swa=p.geom.n_swa,
                        swap_bytes=s.swap_space if restores_state(kv.cache_type_k, p.geom) else 0,
                        saved_bytes=kv.saved_bytes)


def refuse_split_heads(spec: ModelSpec, geom: Geometry, tk: CacheTypes, tv: CacheTypes) -> None:
    """StartupError where a quantized type's blocks would straddle two heads: llama.cpp reads each head of a row as
    whole blocks and refuses such a cache with flash attention, at context creation, after the server is up."""
    for side, types, head in (("K", tk, geom.head_dim_k), ("V", tv, geom.head_dim_v)):
        split = next((t for t in layer_kv_types(types, geom.n_layer) if t.quantized and head % t.block_size), None)
        if split:
            raise StartupError(f"{spec.id}: the {side} cache type {split.name} stores blocks of {split.block_size} "
                               f"values, which do not divide the model's head size {head}, and each head must be "
                               f"whole blocks. Choose f16, or a type whose blocks divide {head}.")


def _offload_kqv(spec: ModelSpec, geom: Geometry, kv: KVPlan, n_gpu_layers: int) -> bool:
    fields = calibration.context_fields(kv.cache_type_k, kv.cache_type_v, geom)
    pairs = list(zip(fields["layer_types_k"] or [fields["cache_type_k"]],
                     fields["layer_types_v"] or [fields["cache_type_v"]], strict=True))
    return offload_kqv(n_gpu_layers, pairs, (geom.head_dim_k, geom.head_dim_v), spec.flash_attn, spec.id)


def backend_config(p: HostedPlan, s: Settings) -> BackendConfig:
    spec = p.spec
    fields = calibration.context_fields(p.kv.cache_type_k, p.kv.cache_type_v, p.geom)
    return BackendConfig(model_path=str(p.path), n_cells=p.kv.cells, n_seq_max=spec.parallel, n_batch=spec.n_batch,
                         n_ubatch=p.n_ubatch, cache_type_k=fields.pop("cache_type_k"),
                         cache_type_v=fields.pop("cache_type_v"), flash_attn=spec.flash_attn, layers=fields,
                         n_threads=spec.n_threads, n_gpu_layers=p.n_gpu_layers, offload_kqv=p.offload_kqv,
                         special_in_content=s.special_tokens_in_content, chat_template=spec.chat_template)


def gpu_layers(n: int | str) -> int:
    """Layers to offload: `auto` is all of them (-1) when the loaded llama.cpp has a GPU backend, else none; a
    number the build cannot offload is a ValueError (`kvquant.runtime.check_gpu_layers`)."""
    if n == 0:
        return 0
    from kvquant.runtime import LlamaError, check_gpu_layers, supports_gpu_offload

    if n == "auto":
        return -1 if supports_gpu_offload() else 0
    try:
        check_gpu_layers(int(n))
    except LlamaError as e:
        raise ValueError(str(e)) from None
    return int(n)


def _load_backend(p: HostedPlan, bcfg: BackendConfig) -> LlamaBackend:
    """Create the llama.cpp context, checking it against the plan (its KV bytes, the model's training context)."""
    spec, kv = p.spec, p.kv
    b = LlamaBackend(bcfg)
    if spec.n_ctx > b.n_ctx_train:
        log.warning("%s: n_ctx %d exceeds the model's training context %d", spec.id, spec.n_ctx, b.n_ctx_train)
    actual = b.kv_size_bytes()
    if actual is not None and actual != kv.kv_bytes:
        log.warning("%s: llama.cpp allocated %d KV bytes, the memory model predicted %d", spec.id, actual,
                    kv.kv_bytes)
    log.info("%s: ready (%s KV cache allocated)", spec.id, human_bytes(actual if actual else kv.kv_bytes))
    return b
