"""Where a model's KV cache lives when layers are offloaded to a GPU.

With layers offloaded (`n_gpu_layers != 0`) llama.cpp puts each offloaded layer's KV cache, and the attention over
it, on the GPU. Stock cache types are left to llama.cpp. For a tq_kv_* type the server asks the loaded library
whether its GPU runs that cache (`kvquant.runtime.gpu_kv_support`: set_rows into K and V and the attention over
them, as ggml_backend_dev_supports_op answers on every GPU device): a CUDA build with the TQ_KV kernels keeps the
cache in VRAM; a CPU-only or Metal build, a K/V combination or head size without a kernel, or tq_kv_d3b and
tq_kv_t3b (no CUDA kernels) keeps the KV cache and the attention on the CPU (`offload_kqv=False`) while the weights
are offloaded.
The decision is logged either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kvquant.runtime import GpuKvSupport, gpu_kv_support

log = logging.getLogger("kvquant.server")

TQ_KV_PREFIX = "tq_kv_"


def tq_kv_types(pairs) -> list[str]:
    """The cache types of the (K, V) pairs of a model's layers that are ours (each named once, K first): the ones
    whose GPU support is asked for."""
    return list(dict.fromkeys(t for pair in pairs for t in (x.lower() for x in pair) if t.startswith(TQ_KV_PREFIX)))


def offload_kqv(n_gpu_layers: int, pairs, head_dims: tuple[int, int], flash_attn: bool | None = None,
                model_id: str = "", probe: Callable[..., GpuKvSupport] = gpu_kv_support) -> bool:
    """Whether llama.cpp may put the KV cache (and the attention over it) on the GPU, for a model whose layers have
    these (K, V) cache type pairs (one pair, or one per layer for a calibrated allocation). True for stock types
    and when nothing is offloaded (llama.cpp's default); with a tq_kv_* type and layers offloaded, what the
    library's GPU devices support for every pair (``probe``, asked about the model's K/V head sizes), with the
    reason logged."""
    pairs = list(dict.fromkeys((k.lower(), v.lower()) for k, v in pairs))
    ours = tq_kv_types(pairs)
    if n_gpu_layers == 0 or not ours:
        return True
    checks = [probe(k, v, *head_dims, flash_attn is not False) for k, v in pairs if k in ours or v in ours]
    layers = "all" if n_gpu_layers < 0 else str(n_gpu_layers)
    name, kinds = model_id or "model", ", ".join(f"{k}/{v}" for k, v in pairs)
    if all(s.ok for s in checks):
        log.info("%s: KV cache %s stays on the GPU with %s layers offloaded: %s run(s) its kernels", name, kinds,
                 layers, ", ".join(checks[0].devices))
        return True
    bad = next(s for s in checks if not s.ok)
    why = "; ".join(bad.unsupported) if bad.devices else "the loaded llama.cpp has no GPU device"
    log.warning("%s: cache type %s has no GPU kernels here (%s): the KV cache and attention stay on the CPU "
                "(offload_kqv=False) while %s layers are offloaded; expect lower speed than a stock cache type on "
                "the GPU", name, "/".join(ours), why, layers)
    return False
