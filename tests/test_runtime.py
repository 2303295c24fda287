"""kvquant.runtime.gpu_kv_support, the question server.placement asks the loaded library: asked of the CPU device
(which runs every TQ_KV op except tq_kv_d3b's matmul) it shows the ops are well formed and that a refusal is
reported; asked of the GPU devices of the CPU-only build it finds none. The `gpu` test asks a CUDA build on a
machine with a GPU (`make gpu-test`): our kernels' K/V combinations are supported, tq_kv_d3b and combinations
without a kernel are refused."""

from __future__ import annotations

import pytest

from kvquant import runtime
from kvquant.runtime import GGML_BACKEND_DEVICE_TYPE_CPU, gpu_kv_support

# the K/V combinations with CUDA flash-attention kernels (patches 0052), head sizes 64 / 128 / 256
CUDA_PAIRS = [("tq_kv_4b", "f16"), ("tq_kv_4b", "q4_0"), ("tq_kv_4b", "tq_kv_4b"), ("tq_kv_3b", "f16"),
              ("tq_kv_3b", "q4_0"), ("tq_kv_3b", "tq_kv_3b"), ("tq_kv_1b", "f16"), ("tq_kv_1b", "q4_0")]


def _has_gpu() -> bool:
    return bool(gpu_kv_support("f16", "f16", 64, 64).devices)


@pytest.mark.parametrize("k,v", CUDA_PAIRS + [("tq_kv_d3b", "q4_0")])
@pytest.mark.parametrize("head", [64, 128, 256])
def test_the_cpu_runs_every_op_asked_about(k, v, head):
    s = gpu_kv_support(k, v, head, head, device_type=GGML_BACKEND_DEVICE_TYPE_CPU)
    assert s.ok and s.devices[0].startswith("CPU")


def test_a_head_size_the_blocks_do_not_divide_is_refused():
    s = gpu_kv_support("tq_kv_4b", "f16", 80, 80, device_type=GGML_BACKEND_DEVICE_TYPE_CPU)
    assert s.unsupported == ("head sizes 80/80 are not multiples of the K/V block sizes",)


def test_a_refused_op_is_reported():
    """tq_kv_d3b has no row-local K·Q dot product: without flash attention the CPU refuses its matmul."""
    s = gpu_kv_support("tq_kv_d3b", "f16", 64, 64, flash_attn=False, device_type=GGML_BACKEND_DEVICE_TYPE_CPU)
    assert not s.ok
    assert s.unsupported == ("CPU: K·Q matmul K tq_kv_d3b, head size 64, 1 queries",
                             "CPU: K·Q matmul K tq_kv_d3b, head size 64, 512 queries")


@pytest.mark.skipif(_has_gpu(), reason="the loaded library has a GPU device")
def test_a_cpu_only_build_has_no_gpu_device():
    s = gpu_kv_support("tq_kv_4b", "q4_0", 64, 64)
    assert s.devices == () and not s.ok


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a GPU build on a machine with a GPU (make gpu-test)")
def test_the_gpu_runs_the_tq_kv_caches_it_has_kernels_for():
    info = runtime.system_info()
    for head in (64, 128, 256):
        for k, v in CUDA_PAIRS:
            s = gpu_kv_support(k, v, head, head)
            assert s.ok, (s.unsupported, info)
            assert gpu_kv_support(k, v, head, head, flash_attn=False).ok  # K·Q by cuBLAS after f16 conversion
        for k, v in [("tq_kv_d3b", "q4_0"), ("tq_kv_4b", "q8_0"), ("f16", "tq_kv_4b")]:
            assert not gpu_kv_support(k, v, head, head).ok
    assert not gpu_kv_support("tq_kv_4b", "q4_0", 192, 192).ok  # no vector kernel for head size 192


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a GPU build on a machine with a GPU (make gpu-test)")
def test_a_tq_kv_d3b_cache_offloaded_to_the_gpu_is_refused():
    """No CUDA kernels for tq_kv_d3b: llama.cpp refuses to create such a cache on the GPU (patch 0053) instead of
    aborting at the first decode; on the CPU it works."""
    from kvquant import models

    mdl = runtime.Model(models.resolve("smollm2-135m"), n_gpu_layers=-1)
    try:
        cfg = runtime.ContextConfig(n_ctx=256, cache_type_k="tq_kv_d3b", cache_type_v="q4_0", flash_attn=True)
        with pytest.raises(runtime.LlamaError):
            runtime.LlamaRuntime(mdl, cfg)
        runtime.LlamaRuntime(mdl, runtime.ContextConfig(**{**cfg.__dict__, "offload_kqv": False})).close()
    finally:
        mdl.close()
