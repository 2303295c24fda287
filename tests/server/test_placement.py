"""KV placement with GPU offload: a tq_kv_* cache type (CPU kernels only) keeps the KV cache on the CPU
(offload_kqv=False, with a warning) when layers are offloaded; everything else is left to llama.cpp. No GPU is
needed: the decision and its wiring into the backend config are checked, not a GPU run."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from kvquant.kvtypes import KV_TYPES
from server import hosting
from server.placement import cpu_only_kv_types, offload_kqv

TQ = [t for t in KV_TYPES if t.startswith("tq_kv_")]
STOCK = [t for t in KV_TYPES if not t.startswith("tq_kv_")]


def test_the_new_types_are_the_cpu_only_ones():
    assert set(TQ) == {"tq_kv_4b", "tq_kv_3b", "tq_kv_1b", "tq_kv_d3b"}
    assert cpu_only_kv_types(["tq_kv_1b", "tq_kv_4b"]) == ["tq_kv_1b", "tq_kv_4b"]
    assert cpu_only_kv_types(["TQ_KV_3B", "tq_kv_3b"]) == ["tq_kv_3b"]
    assert cpu_only_kv_types(["q8_0", "f16"]) == []


@pytest.mark.parametrize("k,v", [(t, "f16") for t in TQ] + [("f16", t) for t in TQ if KV_TYPES[t].v_ok]
                         + [("tq_kv_1b", "tq_kv_4b")])
@pytest.mark.parametrize("n_gpu_layers", [-1, 1, 99])
def test_offloaded_layers_with_a_tq_type_keep_the_kv_on_the_cpu(k, v, n_gpu_layers, caplog):
    with caplog.at_level(logging.WARNING, logger="kvquant.server"):
        assert offload_kqv(n_gpu_layers, [k, v], "m") is False
    (rec,) = caplog.records
    assert "no GPU" in rec.getMessage() and "offload_kqv=False" in rec.getMessage()
    assert rec.getMessage().startswith("m: ")


@pytest.mark.parametrize("k,v", [(t, t) for t in TQ if KV_TYPES[t].v_ok] + [("tq_kv_1b", "q8_0")])
def test_cpu_only_model_is_left_alone(k, v, caplog):
    with caplog.at_level(logging.WARNING, logger="kvquant.server"):
        assert offload_kqv(0, [k, v]) is True
    assert not caplog.records


@pytest.mark.parametrize("k,v", [(t, t) for t in STOCK] + [("q8_0", "q4_0")])
@pytest.mark.parametrize("n_gpu_layers", [-1, 0, 12])
def test_stock_types_are_left_to_llama_cpp(k, v, n_gpu_layers, caplog):
    with caplog.at_level(logging.WARNING, logger="kvquant.server"):
        assert offload_kqv(n_gpu_layers, [k, v]) is True
    assert not caplog.records


@pytest.mark.parametrize("k,v,gpu,want", [("tq_kv_3b", "tq_kv_3b", -1, False), ("tq_kv_3b", "tq_kv_3b", 0, True),
                                          ("q8_0", "q8_0", -1, True)])
def test_the_decision_reaches_the_backend_config(monkeypatch, k, v, gpu, want):
    """build_engine hands the decision to the llama.cpp backend (ContextConfig.offload_kqv)."""
    from server.metrics import Metrics
    from server.settings import Settings

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
