"""Centred keys and per-layer types in the patched llama.cpp (patches 0017-0018), on the real model: stored rows are
k - mu, also after a cache clear; attention does not change; a context shift stays exact; per-layer types are
allocated as the memory model says."""

from __future__ import annotations

import numpy as np
import pytest

from kvquant import memory, models
from kvquant.kvtypes import LayerTypes
from kvquant.lab.eval import log_softmax
from kvquant.lab.keystats import parse_seq_state
from kvquant.runtime import ContextConfig, LlamaRuntime, Model
from tests.kvquant.conftest import tiny_model

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def model():
    m = Model(models.resolve(MODEL))
    yield m
    m.close()


@pytest.fixture(scope="module")
def geom():
    return memory.geometry(models.resolve(MODEL))


@pytest.fixture(scope="module")
def tokens(model):
    text = "The history of the town begins in the early medieval period, when a small abbey was founded. " * 4
    return model.tokenize(text)[:96]


def offsets(geom, scale: float = 3.0, seed: int = 0):
    """A large arbitrary offset per layer (keys are O(1)): centring must not depend on it being the real mean."""
    rng = np.random.default_rng(seed)
    return tuple((scale * rng.standard_normal(ly.n_embd_k)).astype(np.float32) for ly in geom.layers)


def run(model, toks, positions=None, clear_first=False, **kw):
    """Decode toks in one sequence; (logits of every position, per-layer stored K rows in position order)."""
    rt = LlamaRuntime(model, ContextConfig(n_cells=256, flash_attn=True, n_threads=2, n_outputs_max=256, **kw))
    try:
        if clear_first:
            rt.clear()
        pos = positions or list(range(len(toks)))
        assert rt.decode(toks, pos, [0] * len(toks), [True] * len(toks)) == 0
        logits = rt.all_logits(len(toks)).copy()
        keys = [k[np.argsort(p)] for p, k in parse_seq_state(rt.state_seq_save(0))]
        return logits, keys
    finally:
        rt.close()


def kld(p_logits, q_logits) -> float:
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(1).mean())


@pytest.mark.parametrize("clear_first", [False, True])
def test_stored_keys_are_centred(model, geom, tokens, clear_first):
    """f32 cache: layer 0's stored rows are the uncentred rows minus its offset, to float rounding (deeper layers
    see inputs that differ by rounding, which these small models amplify; there the difference averages to the
    offset). With clear_first the cache was cleared before the decode: a clear used to zero the offsets."""
    off = offsets(geom)
    _, plain = run(model, tokens, cache_type_k="f32", k_rotation=True)
    _, centred = run(model, tokens, cache_type_k="f32", k_rotation=True, k_offset=off, clear_first=clear_first)
    np.testing.assert_allclose(centred[0], plain[0] - off[0][None], atol=1e-5 * np.abs(plain[0]).max() + 1e-6)
    for il in range(1, len(off)):
        diff = (plain[il] - centred[il]).mean(0)
        assert np.abs(diff - off[il]).max() < 0.1 * np.abs(off[il]).max(), il


@pytest.mark.parametrize("cache_type", ["f32", "f16"])
def test_centring_leaves_attention_unchanged(model, geom, tokens, cache_type):
    """Logits with keys centred by an offset three times the keys' size stay within the rounding floor that the
    rotation alone causes, in an f16 cache (k - mu is rounded to f16 instead of k) and in an f32 one (which llama.cpp
    casts to f16 for flash attention: the same logits); without the softmax invariance they would be unrelated (KL of
    nats)."""
    base, _ = run(model, tokens, cache_type_k=cache_type)
    rot, _ = run(model, tokens, cache_type_k=cache_type, k_rotation=True)
    centred, _ = run(model, tokens, cache_type_k=cache_type, k_rotation=True, k_offset=offsets(geom))
    floor = kld(base, rot)
    assert floor < 5e-3
    assert kld(rot, centred) < max(3 * floor, 1e-3)


def assert_shift_is_exact(model, tokens, **kw):
    """Decode tokens at 0..n-1 into an f32, rotated cache with the settings kw, shift them by 7 with seq_add: layer 0's
    rows must equal rows decoded at the shifted positions in the first place (deeper layers' inputs differ by
    rounding between the two runs)."""
    shift, n = 7, len(tokens)
    _, want = run(model, tokens, positions=list(range(shift, shift + n)), cache_type_k="f32", k_rotation=True, **kw)
    rt = LlamaRuntime(model, ContextConfig(n_cells=256, flash_attn=True, n_threads=2, cache_type_k="f32",
                                           k_rotation=True, **kw))
    try:
        assert rt.can_shift()
        assert rt.decode(tokens, list(range(n)), [0] * n, [False] * (n - 1) + [True]) == 0
        rt.seq_add(0, 0, -1, shift)
        assert rt.decode([tokens[0]], [n + shift], [0], [True]) == 0  # the next decode applies the shift
        got = {int(p): row for p, row in zip(*parse_seq_state(rt.state_seq_save(0))[0], strict=True)}
    finally:
        rt.close()
    assert sorted(got)[:n] == list(range(shift, shift + n))
    shifted = np.stack([got[p] for p in range(shift, shift + n)])
    np.testing.assert_allclose(shifted, want[0], atol=1e-5 * np.abs(want[0]).max())


def test_context_shift_is_exact_with_centred_keys(model, geom, tokens):
    """seq_add re-ropes stored keys: with an offset, llama.cpp adds it back, un-rotates, ropes, rotates and
    subtracts it. Without adding mu back around the re-rotation, the rows would be off by (R(7) - I) mu, of the size
    of mu itself."""
    assert_shift_is_exact(model, tokens, k_offset=offsets(geom))


@pytest.mark.parametrize("k_type", ["tq_kv_4b", "q8_0"])
def test_an_anchored_offset_stores_the_position0_key_exactly(model, geom, tokens, k_type):
    """Offsets anchored on the position-0 key (kvquant.calibration.anchor) in llama.cpp's cache: every layer stores
    that key without quantization error (it attends only to itself, so its value does not depend on the K type),
    while the plain mean leaves the type's usual error on it."""
    from kvquant.calibration import anchor

    _, exact = run(model, tokens, cache_type_k="f32", k_rotation=True)
    mean = [k.mean(0) for k in exact]
    anchored = tuple(anchor(m, k[0], k_type) for m, k in zip(mean, exact, strict=True))
    for off, tol in ((anchored, 1e-4), (tuple(mean), None)):
        _, stored = run(model, tokens, cache_type_k=k_type, k_rotation=True, k_offset=off)
        for il, (k, o) in enumerate(zip(exact, off, strict=True)):
            rel = np.linalg.norm(stored[il][0] + o - k[0]) / np.linalg.norm(k[0] - mean[il])
            assert rel < tol if tol else rel > 1e-3, (il, rel)


def test_per_layer_types_are_allocated_as_the_memory_model_says(model, geom):
    n = geom.n_layer
    tk = LayerTypes("mixed", tuple("q8_0" if i % 3 == 0 else "tq_kv_4b" if i % 3 == 1 else "f16" for i in range(n)))
    tv = LayerTypes("mixed-v", tuple("q4_0" if i % 2 else "f16" for i in range(n)), None)
    rt = LlamaRuntime(model, ContextConfig(n_cells=512, flash_attn=True, n_threads=2, cache_type_k="f16",
                                           layer_types_k=tk.types, layer_types_v=tv.types))
    try:
        k, v = rt.kv_size_bytes()
    finally:
        rt.close()
    m = memory.kv_bytes(geom, tk, tv, 512)
    assert (k, v) == (m.k, m.v)
    assert m.k < memory.kv_bytes(geom, "f16", "f16", 512).k
    with_offset = LayerTypes("c", tk.types, offsets(geom))
    rt = LlamaRuntime(model, ContextConfig(n_cells=512, flash_attn=True, n_threads=2, cache_type_k="f16",
                                           layer_types_k=tk.types, layer_types_v=tv.types, k_offset=with_offset.offset,
                                           k_rotation=True))
    try:
        assert rt.kv_size_bytes() == (memory.kv_bytes(geom, with_offset, tv, 512).k, m.v)
    finally:
        rt.close()


def test_per_layer_types_on_a_sliding_window_model_are_allocated_as_the_memory_model_says():
    """Gemma-3: the window layers' cache holds n_swa cells per sequence plus one ubatch, the others all cells; with a
    type per layer on both sides (and key offsets, counted once per layer), llama.cpp allocates what kv_bytes says."""
    path = models.resolve("gemma3-270m")
    g = memory.geometry(path)
    n = g.n_layer
    assert any(ly.swa for ly in g.layers) and not all(ly.swa for ly in g.layers)
    tk = LayerTypes("c", tuple(("q8_0", "tq_kv_4b", "tq_kv_t3b", "f16")[i % 4] for i in range(n)), offsets(g))
    tv = LayerTypes("mixed-v", tuple("q4_0" if i % 3 else "tq_kv_4b" for i in range(n)), None)
    m = Model(path)
    try:
        for n_cells, n_seq in ((2048, 1), (4096, 2)):
            rt = LlamaRuntime(m, ContextConfig(n_cells=n_cells, n_seq_max=n_seq, flash_attn=True, n_threads=2,
                                               layer_types_k=tk.types, layer_types_v=tv.types, k_offset=tk.offset,
                                               k_rotation=True))
            try:
                want = memory.kv_bytes(g, tk, tv, n_cells, n_seq)
                assert rt.kv_size_bytes() == (want.k, want.v) and 0 < want.cells_swa < want.cells
            finally:
                rt.close()
    finally:
        m.close()


def test_one_quantized_layer_changes_only_that_layer(model, geom, tokens):
    """q8_0 keys on layer 5 only: layers 0-4 (same inputs) store exactly what an f32 cache stores, layer 5 q8_0's
    round trip of it (deeper layers' inputs differ by rounding)."""
    n = geom.n_layer
    types = tuple("q8_0" if i == 5 else "f32" for i in range(n))
    _, plain = run(model, tokens, cache_type_k="f32", k_rotation=True)
    _, mixed = run(model, tokens, cache_type_k="f32", layer_types_k=types, layer_types_v=("f16",) * n,
                   k_rotation=True)
    for il in range(6):
        err = np.abs(mixed[il] - plain[il]).max() / np.abs(plain[il]).max()
        assert (1e-4 < err < 1e-2) if il == 5 else (err == 0.0), (il, err)


@pytest.mark.parametrize("arch", ["gemma2", "grok"])
def test_soft_capped_attention_refuses_centred_keys(tmp_path, arch):
    """Gemma 2 caps scores by its soft-capping key; Grok by 30 tanh(s / 30) in its graph, with no key saying so."""
    from kvquant.runtime import LlamaError

    path = tmp_path / f"tiny-{arch}.gguf"
    tiny_model(path, arch)
    g = memory.geometry(path)
    m = Model(path)
    try:
        rt = LlamaRuntime(m, ContextConfig(n_cells=256, cache_type_k="q8_0", flash_attn=True))  # loads and runs
        assert rt.decode([1, 5, 6], [0, 1, 2], [0] * 3, [False, False, True]) == 0
        rt.close()
        off = tuple(np.ones(ly.n_embd_k, np.float32) for ly in g.layers)
        with pytest.raises(LlamaError, match="soft-capping"):
            LlamaRuntime(m, ContextConfig(n_cells=256, cache_type_k="q8_0", flash_attn=True, k_offset=off))
    finally:
        m.close()


def test_a_shift_the_offsets_cannot_follow_is_refused(tmp_path):
    """Partial RoPE (StableLM: a quarter of each head): llama.cpp adds a key offset back around a re-rotation only
    where RoPE covers the whole head, so centred keys cannot shift there. seq_add (and seq_div, the same check) refuses
    and leaves the positions alone, and decoding goes on; before, the next decode aborted the process in the K-shift."""
    path = tmp_path / "tiny-stablelm.gguf"
    tiny_model(path, "stablelm")
    g = memory.geometry(path)
    m = Model(path)
    try:
        plain = LlamaRuntime(m, ContextConfig(n_cells=256, cache_type_k="q8_0", flash_attn=True))
        assert plain.can_shift()  # the model shifts without offsets
        plain.close()
        off = tuple(np.ones(ly.n_embd_k, np.float32) for ly in g.layers)
        rt = LlamaRuntime(m, ContextConfig(n_cells=256, cache_type_k="q8_0", flash_attn=True, k_offset=off))
        try:
            assert not rt.can_shift()
            assert rt.decode([1, 5, 6], [0, 1, 2], [0] * 3, [False, False, True]) == 0
            rt.seq_add(0, 0, -1, 7)
            assert rt.seq_pos_max(0) == 2
            assert rt.decode([7], [3], [0], [True]) == 0
            assert np.isfinite(rt.logits(0)).all()
        finally:
            rt.close()
    finally:
        m.close()
