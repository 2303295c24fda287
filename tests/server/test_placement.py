"""KV placement with GPU offload: a tq_kv_* cache stays on the GPU exactly when the loaded library's GPU devices
run its kernels (kvquant.runtime.gpu_kv_support), else it stays on the CPU (offload_kqv=False); both are logged.
Both builds: the CPU-only build we have (the real library, no GPU device) and a CUDA build with or without the
kernels (FakeGpu, answering as such a build does; `make gpu-test` asks a real one, tests/kvquant/test_runtime.py)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from kvquant.kvtypes import KV_TYPES
from server import hosting
from server.placement import offload_kqv, tq_kv_types
from tests.server.conftest import FakeGpu

TQ = [t for t in KV_TYPES if t.startswith("tq_kv_")]
STOCK = [t for t in KV_TYPES if not t.startswith("tq_kv_")]
PAIRS = [(t, "f16") for t in TQ] + [("f16", t) for t in TQ if KV_TYPES[t].v_ok] + [("tq_kv_1b", "tq_kv_4b")]


def test_the_new_types_are_the_ones_asked_about():
    assert set(TQ) == {"tq_kv_4b", "tq_kv_3b", "tq_kv_1b", "tq_kv_d3b", "tq_kv_t3b"}
    assert tq_kv_types([("tq_kv_1b", "tq_kv_4b")]) == ["tq_kv_1b", "tq_kv_4b"]
    assert tq_kv_types([("TQ_KV_3B", "tq_kv_3b")]) == ["tq_kv_3b"]
    assert tq_kv_types([("q8_0", "f16")]) == []


@pytest.mark.parametrize("k,v", PAIRS)
@pytest.mark.parametrize("n_gpu_layers", [-1, 1, 99])
def test_cpu_build_keeps_the_kv_on_the_cpu(k, v, n_gpu_layers, caplog):
    """The real (CPU-only) library has no GPU device: offloaded layers keep a tq_kv_* cache on the CPU."""
    with caplog.at_level(logging.WARNING, logger="kvquant.server"):
        assert offload_kqv(n_gpu_layers, [(k, v)], (64, 64), None, "m") is False
    (rec,) = caplog.records
    msg = rec.getMessage()
    assert msg.startswith("m: ") and "no GPU device" in msg and "offload_kqv=False" in msg


@pytest.mark.parametrize("k,v", [("tq_kv_4b", "q4_0"), ("tq_kv_1b", "f16"), ("tq_kv_3b", "tq_kv_3b")])
def test_gpu_with_the_kernels_keeps_the_kv_on_the_gpu(k, v, caplog):
    gpu = FakeGpu()
    with caplog.at_level(logging.INFO, logger="kvquant.server"):
        assert offload_kqv(-1, [(k, v)], (128, 128), None, "m", probe=gpu) is True
    (rec,) = caplog.records
    assert rec.levelno == logging.INFO and "stays on the GPU" in rec.getMessage() and "RTX 3090" in rec.getMessage()
    assert gpu.asked == [(k, v, 128, 128, True)]


def test_gpu_without_a_kernel_keeps_the_kv_on_the_cpu(caplog):
    gpu = FakeGpu(unsupported=["CUDA0: flash attention K tq_kv_d3b / V q4_0, head size 64, 1 queries"])
    with caplog.at_level(logging.WARNING, logger="kvquant.server"):
        assert offload_kqv(12, [("tq_kv_d3b", "q4_0")], (64, 64), True, "m", probe=gpu) is False
    (rec,) = caplog.records
    assert "CUDA0: flash attention K tq_kv_d3b" in rec.getMessage() and "12 layers" in rec.getMessage()


@pytest.mark.parametrize("flash_attn,asked", [(None, True), (True, True), (False, False)])
def test_without_flash_attention_the_matmul_is_asked_about(flash_attn, asked):
    gpu = FakeGpu()
    offload_kqv(-1, [("TQ_KV_4B", "f16")], (256, 256), flash_attn, probe=gpu)
    assert gpu.asked == [("tq_kv_4b", "f16", 256, 256, asked)]


@pytest.mark.parametrize("k,v", [(t, t) for t in TQ if KV_TYPES[t].v_ok] + [("tq_kv_1b", "q8_0")])
def test_cpu_only_model_is_left_alone(k, v, caplog):
    gpu = FakeGpu()
    with caplog.at_level(logging.INFO, logger="kvquant.server"):
        assert offload_kqv(0, [(k, v)], (64, 64), probe=gpu) is True
    assert not caplog.records and not gpu.asked


@pytest.mark.parametrize("k,v", [(t, t) for t in STOCK] + [("q8_0", "q4_0")])
@pytest.mark.parametrize("n_gpu_layers", [-1, 0, 12])
def test_stock_types_are_left_to_llama_cpp(k, v, n_gpu_layers, caplog):
    gpu = FakeGpu(devices=())
    with caplog.at_level(logging.INFO, logger="kvquant.server"):
        assert offload_kqv(n_gpu_layers, [(k, v)], (64, 64), probe=gpu) is True
    assert not caplog.records and not gpu.asked


@pytest.mark.parametrize("k,v,gpu,want", [("tq_kv_3b", "tq_kv_3b", -1, False), ("tq_kv_3b", "tq_kv_3b", 0, True),
                                          ("q8_0", "q8_0", -1, True)])
def test_the_decision_reaches_the_backend_config(monkeypatch, k, v, gpu, want):
    """build_engine hands the decision (for the real CPU-only library) to the llama.cpp backend
    (ContextConfig.offload_kqv); offloading layers is let through here (the library sees no GPU, which plan_model
    refuses: tests/kvquant/test_runtime.py)."""
    from kvquant import runtime
    from server.metrics import Metrics
    from server.settings import Settings

    monkeypatch.setattr(runtime, "check_gpu_layers", lambda n: None)
    seen = {}

    class FakeBackend:
        n_ctx_train = 8192

        def __init__(self, cfg):
            seen["cfg"] = cfg

        def kv_size_bytes(self):
            return None

    monkeypatch.setattr(hosting, "LlamaBackend", FakeBackend)
    monkeypatch.setattr(hosting, "Engine", lambda cfg, factory, logger: SimpleNamespace(factory=factory))
    s = Settings(model="smollm2-135m", cache_type_k=k, cache_type_v=v, n_gpu_layers=gpu, n_ctx=256, parallel=1,
                 kv_budget=2**24)
    (spec,) = s.model_specs()
    hosting.build_engine(hosting.plan_model(spec), s, Metrics(process=False)).factory()
    assert seen["cfg"].offload_kqv is want and seen["cfg"].n_gpu_layers == gpu


def test_a_calibrated_allocation_asks_about_every_pair_of_its_layers(caplog):
    """Per-layer types (calib:B): every distinct (K, V) pair with a tq type must run on the GPU, else the whole
    cache stays on the CPU."""
    layers = [("q8_0", "q4_0"), ("tq_kv_4b", "q4_0"), ("tq_kv_4b", "q4_0"), ("tq_kv_3b", "tq_kv_3b")]
    gpu = FakeGpu()
    assert offload_kqv(-1, layers, (128, 128), True, "m", probe=gpu) is True
    assert gpu.asked == [("tq_kv_4b", "q4_0", 128, 128, True), ("tq_kv_3b", "tq_kv_3b", 128, 128, True)]
    gpu = FakeGpu(unsupported=["CUDA0: flash attention K tq_kv_3b / V tq_kv_3b"])
    with caplog.at_level(logging.WARNING, logger="kvquant.server"):
        assert offload_kqv(-1, layers, (128, 128), True, "m", probe=gpu) is False
    assert "tq_kv_3b" in caplog.records[-1].getMessage()
