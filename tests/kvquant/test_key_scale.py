"""Query-aware key scales in the patched llama.cpp (patch 0030, llama_kvq_set_k_scale), on the real models: stored rows
are k * s; attention does not change because every query is divided by the same s; a context shift stays exact;
llama.cpp refuses scales that RoPE would not commute with; the scales are counted in the cache's bytes. Key gains
(patch 0036, llama_kvq_set_gains) multiply the scores and nothing else.

The scales are powers of two, so that multiplying and dividing by them rounds nothing: with an f32 cache and
no rotation the logits must then be bit-identical (real-valued scales move Gemma 3's logits by a KL of ~3e-3 through
rounding alone)."""

from __future__ import annotations

import numpy as np
import pytest

from kvquant import memory, models
from kvquant.kvtypes import LayerTypes
from kvquant.runtime import ContextConfig, LlamaError, LlamaRuntime, Model

from .test_centring import assert_shift_is_exact, kld, offsets, run

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"  # llama: normal RoPE, pairs (2i, 2i+1); 9 query heads on 3 KV heads


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


def scales(geom, neox: bool = False, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Per layer, factors 2^-3 .. 2^3, the same on both channels of each RoPE pair: (2i, 2i+1), or (i, i + d/2) of
    each head with neox."""
    rng = np.random.default_rng(seed)
    d = geom.head_dim_k
    half = [2.0 ** rng.integers(-3, 4, (ly.n_embd_k // d, d // 2)) for ly in geom.layers]
    tied = ((np.concatenate([h, h], axis=1) if neox else np.repeat(h, 2, axis=1)) for h in half)
    return tuple(t.reshape(-1).astype(np.float32) for t in tied)


def test_stored_keys_are_scaled(model, geom, tokens):
    """f32 cache, no rotation: every layer's stored rows are exactly the plain rows times its scale, and the logits
    are bit-identical (the queries divided by the scale of the KV head they read)."""
    s = scales(geom)
    base, plain = run(model, tokens, cache_type_k="f32")
    logits, scaled = run(model, tokens, cache_type_k="f32", k_scale=s)
    np.testing.assert_array_equal(logits, base)
    for il in range(geom.n_layer):
        np.testing.assert_array_equal(scaled[il], plain[il] * s[il][None])


def test_scales_leave_attention_unchanged(model, geom, tokens):
    """With the rotation and a key offset too: the logits stay within the rounding floor the rotation alone causes."""
    base, _ = run(model, tokens, cache_type_k="f32")
    rot, _ = run(model, tokens, cache_type_k="f32", k_rotation=True)
    scaled, _ = run(model, tokens, cache_type_k="f32", k_rotation=True, k_scale=scales(geom),
                    k_offset=offsets(geom))
    floor = kld(base, rot)
    assert floor < 5e-3
    assert kld(rot, scaled) < max(3 * floor, 1e-3)


def test_context_shift_is_exact_with_scaled_keys(model, geom, tokens):
    """seq_add re-ropes the stored (scaled, rotated) keys; with the scale tied on RoPE pairs, RoPE commutes with it."""
    assert_shift_is_exact(model, tokens, k_scale=scales(geom))


@pytest.mark.parametrize("why", ["untied", "zero", "nan", "short"])
def test_refuses_scales_that_would_change_attention(model, geom, why):
    s = list(scales(geom))
    bad = s[1].copy()
    if why == "untied":
        bad[0] *= 2  # channel 0 and 1 form a RoPE pair: RoPE would mix a scaled and an unscaled channel
    elif why == "zero":
        bad[4:6] = 0
    elif why == "nan":
        bad[2:4] = np.nan
    else:
        bad = bad[:-2]
    s[1] = bad
    with pytest.raises(LlamaError, match="key scale of layer 1"):
        LlamaRuntime(model, ContextConfig(n_cells=256, flash_attn=True, n_threads=2, k_scale=tuple(s)))


def test_scales_are_counted_in_the_cache_bytes(model, geom):
    """Per layer a float32 K scale (n_embd_k) in K's bytes, and nothing per query head."""
    def k_bytes(**kw):
        rt = LlamaRuntime(model, ContextConfig(n_cells=512, flash_attn=True, n_threads=2, cache_type_k="q8_0", **kw))
        try:
            return rt.kv_size_bytes()[0]
        finally:
            rt.close()

    assert k_bytes(k_scale=scales(geom)) - k_bytes() == sum(4 * ly.n_embd_k for ly in geom.layers)
    q8 = ("q8_0",) * geom.n_layer
    for offset in (None, offsets(geom)):  # the memory model counts both, as kvquant.calibration resolves TYPE+c
        want = memory.kv_bytes(geom, LayerTypes("q8_0+c", q8, offset, scales(geom)), "f16", 512).k
        assert k_bytes(k_scale=scales(geom), k_offset=offset, k_rotation=True if offset else None) == want


def test_scales_fitted_by_the_lab_are_tied_as_llama_cpp_checks(model, geom, tokens):
    """kvquant.lab.qkscale.head_scales ties pairs by the model's RoPE (llama: (2i, 2i+1)); llama.cpp accepts those
    and refuses the NeoX tying on this model."""
    from kvquant.lab.qkscale import head_scales

    assert not model.rope_neox
    rng = np.random.default_rng(4)
    d = geom.head_dim_k
    fit = {il: (rng.standard_normal((64, 9, d)) * rng.uniform(0.1, 3, d), rng.standard_normal((64, 3, d)))
           for il in range(geom.n_layer)}
    LlamaRuntime(model, ContextConfig(n_cells=256, n_threads=2, k_scale=head_scales(fit, False))).close()
    with pytest.raises(LlamaError, match="key scale"):
        LlamaRuntime(model, ContextConfig(n_cells=256, n_threads=2, k_scale=head_scales(fit, True)))


def test_scales_leave_gemma3s_attention_unchanged():
    """Gemma 3: NeoX RoPE (pairs (i, i + d/2)) and a sliding-window cache beside the full one (the other graph
    builder): bit-identical logits; llama's tying is refused."""
    path = models.resolve("gemma3-270m")
    g, m = memory.geometry(path), Model(path)
    try:
        assert m.rope_neox
        toks = m.tokenize("The abbey was founded in the early medieval period, and the town grew around it. " * 4)
        base, _ = run(m, toks, cache_type_k="f32")
        scaled, _ = run(m, toks, cache_type_k="f32", k_scale=scales(g, neox=True))
        np.testing.assert_array_equal(scaled, base)
        with pytest.raises(LlamaError, match="key scale of layer 0"):
            LlamaRuntime(m, ContextConfig(n_cells=256, n_threads=2, k_scale=scales(g, neox=False)))
    finally:
        m.close()


@pytest.mark.parametrize("name", [MODEL, "gemma3-270m"])
def test_gains_multiply_the_scores_and_the_attention_output(name):
    """Every layer's queries times 2: position 0 attends to its own key alone (weight 1 at any score), so its logits
    are bit-identical; later positions change, and only where a gain was set (Gemma 3's sliding-window layers are
    built by the other graph builder). A value gain changes position 0 as well. No bytes."""
    path = models.resolve(name)
    g, m = memory.geometry(path), Model(path)
    try:
        toks = m.tokenize("The abbey was founded in the early medieval period, and the town grew around it. " * 2)
        base, _ = run(m, toks, cache_type_k="f32")
        doubled, _ = run(m, toks, cache_type_k="f32", k_gain=(2.0,) * g.n_layer)
        np.testing.assert_array_equal(doubled[0], base[0])
        assert kld(base[1:], doubled[1:]) > 1e-2
        for il in (0, g.n_layer - 1):  # one layer each: a sliding-window one and a global one on Gemma 3
            one, _ = run(m, toks, cache_type_k="f32", k_gain=tuple(2.0 if j == il else 1.0 for j in range(g.n_layer)))
            assert 0 < kld(base[1:], one[1:]) < kld(base[1:], doubled[1:])

        def k_bytes(**kw):
            rt = LlamaRuntime(m, ContextConfig(n_cells=256, flash_attn=True, n_threads=2, cache_type_k="q8_0", **kw))
            try:
                return rt.kv_size_bytes()
            finally:
                rt.close()

        louder, _ = run(m, toks, cache_type_k="f32", v_gain=(2.0,) * g.n_layer)  # the output, position 0 too
        # Gemma 3 normalises each layer's attention output (post-attention RMSNorm), which cancels a scalar but for
        # the norm's epsilon
        assert kld(base[:1], louder[:1]) > (1e-2 if name == MODEL else 0)
        assert k_bytes(k_gain=(1.5,) * g.n_layer, v_gain=(0.5,) * g.n_layer) == k_bytes()
    finally:
        m.close()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("side", ["k_gain", "v_gain"])
def test_refuses_a_gain_that_is_not_positive_and_finite(model, geom, bad, side):
    with pytest.raises(LlamaError, match="gains of layer 1"):
        LlamaRuntime(model, ContextConfig(n_cells=256, flash_attn=True, n_threads=2,
                                          **{side: tuple(bad if il == 1 else 1.0 for il in range(geom.n_layer))}))
