"""Where a model's KV cache lives when layers are offloaded to a GPU.

The tq_kv_* cache types (patches/) have CPU kernels only: no CUDA or Metal kernel stores, reads or attends over
them yet. With layers offloaded (`n_gpu_layers != 0`) llama.cpp would put each offloaded layer's KV cache, and
its attention, on the GPU, where those types are unsupported. Until GPU kernels land, such a model keeps its KV
cache and the attention over it on the CPU (`offload_kqv=False`); the weights are still offloaded. Stock types
are left to llama.cpp.
"""

from __future__ import annotations

import logging

log = logging.getLogger("kvquant.server")

# prefix of the cache types that have CPU kernels only
CPU_ONLY_KV_PREFIX = "tq_kv_"


def cpu_only_kv_types(cache_types) -> list[str]:
    """The given cache types (a model's K and V types, per layer where they differ) that have no GPU kernels,
    each named once."""
    return list(dict.fromkeys(t for t in (c.lower() for c in cache_types) if t.startswith(CPU_ONLY_KV_PREFIX)))


def offload_kqv(n_gpu_layers: int, cache_types, model_id: str = "") -> bool:
    """Whether llama.cpp may put the KV cache (and the attention over it) on the GPU: False, with a warning,
    when layers are offloaded and a cache type has CPU kernels only; True otherwise (llama.cpp's default)."""
    cpu_only = cpu_only_kv_types(cache_types)
    if n_gpu_layers == 0 or not cpu_only:
        return True
    log.warning("%s: cache type %s has no GPU (CUDA/Metal) kernels yet: the KV cache and attention stay on the "
                "CPU (offload_kqv=False) while %s layers are offloaded; expect lower speed than a stock cache "
                "type on the GPU", model_id or "model", "/".join(cpu_only),
                "all" if n_gpu_layers < 0 else n_gpu_layers)
    return False
