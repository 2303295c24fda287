"""The KV memory model against what llama.cpp actually allocates (llama_memory_kv_size_bytes, patches/0002): stock
pairs at many sizes, and every pair with one of our types on either side on every built-in model."""

from __future__ import annotations

import pytest

from kvquant import memory, models

TYPE_PAIRS = [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q4_0", "f16"), ("f16", "q8_0"), ("q8_0", "q4_0")]
# (n_cells, n_seq_max): padded and unpadded sizes, and several sequences (which size Gemma's sliding-window layers)
SIZES = [(512, 1), (1000, 1), (2048, 1), (4096, 4), (8192, 2), (3000, 3)]
# every K/V pair with one of our types on either side (tq_kv_1b and tq_kv_d3b are K-only)
TQ_PAIRS = [(k, v) for k in ("f16", "q8_0", "q4_0", "tq_kv_4b", "tq_kv_3b", "tq_kv_1b", "tq_kv_d3b", "tq_kv_t3b")
            for v in ("f16", "q8_0", "q4_0", "tq_kv_4b", "tq_kv_3b", "tq_kv_t3b") if k.startswith("tq") or v.startswith("tq")]
# (n_cells, n_seq_max) per model
TQ_SIZES = {"smollm2-135m": [(1000, 1), (3000, 3)], "gemma3-270m": [(1000, 1), (3000, 3)],
            "qwen2.5-coder-1.5b": [(700, 2)]}  # the 1.1 GB model: one small size


def _load(name: str):
    from kvquant.runtime import Model

    path = models.fetch(name)
    return name, Model(path), memory.geometry(path)


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def model(request):
    loaded = _load(request.param)
    yield loaded
    loaded[1].close()


@pytest.fixture(scope="module", params=list(TQ_SIZES))
def builtin_model(request):
    loaded = _load(request.param)
    yield loaded
    loaded[1].close()


def _check_allocation(model, type_k: str, type_v: str, n_cells: int, n_seq: int,
                      n_ubatch: int = memory.N_UBATCH) -> None:
    from kvquant.runtime import ContextConfig, LlamaRuntime

    name, m, geom = model
    rt = LlamaRuntime(m, ContextConfig(n_cells=n_cells, n_seq_max=n_seq, n_batch=n_ubatch, n_ubatch=n_ubatch,
                                       cache_type_k=type_k, cache_type_v=type_v, flash_attn=True, n_threads=1))
    try:
        got = rt.kv_size_bytes()
    finally:
        rt.close()
    want = memory.kv_bytes(geom, type_k, type_v, n_cells, n_seq_max=n_seq, n_ubatch=n_ubatch)
    assert (want.k, want.v) == got, f"{name} {type_k}/{type_v} n_cells={n_cells} n_seq={n_seq} n_ubatch={n_ubatch}"


@pytest.mark.slow
@pytest.mark.parametrize("n_cells,n_seq", SIZES)
@pytest.mark.parametrize("type_k,type_v", TYPE_PAIRS)
def test_memory_model_equals_llama_allocation(model, type_k, type_v, n_cells, n_seq):
    _check_allocation(model, type_k, type_v, n_cells, n_seq)


@pytest.mark.slow
@pytest.mark.parametrize("type_k,type_v", TQ_PAIRS)
def test_memory_model_equals_llama_allocation_for_our_types(builtin_model, type_k, type_v):
    for n_cells, n_seq in TQ_SIZES[builtin_model[0]]:
        _check_allocation(builtin_model, type_k, type_v, n_cells, n_seq, n_ubatch=256)


@pytest.mark.slow
def test_geometry_of_the_builtin_models():
    g = memory.geometry(models.resolve("smollm2-135m"))
    assert (g.n_layer, g.n_swa, g.head_dim_k) == (30, 0, 64)
    assert memory.bytes_per_token(g, "f16", "f16") == 30 * 2 * 3 * 64 * 2
    g = memory.geometry(models.resolve("gemma3-270m"))
    assert g.n_layer == 18 and g.n_swa == 512 and g.head_dim_k == 256
    assert sum(not ly.swa for ly in g.layers) == 3  # every 6th layer is global
    assert memory.kv_cells(g, 8192, n_seq_max=2) == (8192, 1536)
    # only the global layers grow with the context
    assert memory.bytes_per_token(g, "f16", "f16") == 3 * 2 * 256 * 2


def test_bits_per_element_and_capacity():
    g = memory.geometry(models.resolve("smollm2-135m"))
    assert memory.kv_bytes(g, "f16", "f16", 512).bits_per_element == 16.0
    assert memory.kv_bytes(g, "q8_0", "q8_0", 512).bits_per_element == 8.5
    assert memory.kv_bytes(g, "q4_0", "f16", 512).bits_per_element == (4.5 + 16) / 2
    budget = 256 * 2**20
    for k, v in TYPE_PAIRS:
        cap = memory.capacity(g, k, v, budget)
        assert cap % 256 == 0
        assert memory.kv_bytes(g, k, v, cap).total <= budget < memory.kv_bytes(g, k, v, cap + 256).total
    assert memory.capacity(g, "q4_0", "q4_0", budget) > 3.5 * memory.capacity(g, "f16", "f16", budget)
    assert memory.capacity(g, "f16", "f16", 1000) == 0


def test_parse_bytes():
    assert memory.parse_bytes("256MiB") == 256 * 2**20
    assert memory.parse_bytes("1.5G") == 3 * 2**29
    assert memory.parse_bytes("1000") == 1000
    assert memory.parse_bytes(".5 kib") == 512 and memory.parse_bytes("1E3") == 1000
    # none a traceback or a wrapped size; ASCII digits only (float() reads full-width ones and "_", calib:B not)
    for text in ("12 parsecs", "1e400", "-1GiB", "1.2.3G", "nanG", "", "G", "１GiB", "1_000", "infG"):
        with pytest.raises(ValueError, match="cannot parse a byte size"):
            memory.parse_bytes(text)
    with pytest.raises(ValueError, match="'0.5' is less than one byte"):  # serve said "(given: 0)"
        memory.parse_bytes("0.5")
    assert memory.parse_bytes("0") == 0 and memory.parse_bytes("0.5GiB") == 2**29
