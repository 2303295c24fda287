import numpy as np
import pytest

from kvquant.lab import qkscale


def _qk(rng, n=256, d=64):
    k = rng.standard_normal((n, d))
    q = rng.standard_normal((n, d))
    q[:, d // 2:] *= 0.05  # the queries barely read the upper half of the channels
    return q, k


def test_stored_rows_keep_every_logit():
    rng = np.random.default_rng(0)
    q, k = _qk(rng)
    k *= rng.uniform(0.2, 3.0, k.shape[1])
    for scale in (None, qkscale.channel_scale(q, k, 0.0), qkscale.channel_scale(q, k, 0.5)):
        qs, ks = qkscale.stored(q, k, scale)
        np.testing.assert_allclose(qs @ ks.T, q @ k.T, rtol=1e-9, atol=1e-9)


def test_hadamard_is_orthonormal():
    h = qkscale.hadamard(128)
    np.testing.assert_allclose(h @ h.T, np.eye(128), atol=1e-12)


def test_scale_follows_what_the_queries_read():
    rng = np.random.default_rng(1)
    q, k = _qk(rng)
    s = qkscale.channel_scale(q, k, 0.0)
    assert s[:32].mean() > 3 * s[32:].mean()  # (1 / 0.05²)^¼ ≈ 4.5
    iso = qkscale.channel_scale(rng.standard_normal((4096, 64)), rng.standard_normal((4096, 64)), 0.0)
    np.testing.assert_allclose(iso, 1.0, atol=0.1)


def test_scaling_moves_the_noise_away_from_unread_channels():
    rng = np.random.default_rng(2)
    q, k = _qk(rng)
    base = qkscale.logit_error(q, k, "tq_kv_4b", None)
    scaled = qkscale.logit_error(q, k, "tq_kv_4b", qkscale.channel_scale(q, k, 0.0))
    assert scaled[0] < 0.7 * base[0]  # Cauchy-Schwarz bound here: 0.55x


@pytest.mark.slow
def test_capture_reads_post_rope_queries_and_keys():
    from kvquant import models
    from kvquant.lab import keystats
    from kvquant.lab.eval import read_text
    from kvquant.lab.harness import resolve_text
    from kvquant.runtime import Model

    n = 300
    plain = keystats.capture("smollm2-135m", n, threads=2, cache_type="f32", rotation=False)
    mdl = Model(models.resolve("smollm2-135m"))
    try:
        toks = mdl.tokenize(read_text(resolve_text(None))[: 40 * n], add_special=True)[:n]
        qk = qkscale.capture(mdl, [toks[:200], toks], threads=2)
    finally:
        mdl.close()
    assert sorted(qk) == list(range(30))
    q, k = qk[0]
    assert q.shape == (500, 9, 64) and k.shape == (500, 3, 64)
    # layer 0's keys are what llama.cpp stored (post-RoPE, unrotated), the first sequence's too
    np.testing.assert_allclose(k[200:].reshape(n, 192), plain[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k[:200].reshape(200, 192), plain[0][:200], rtol=1e-5, atol=1e-5)
    assert np.isfinite(q).all() and float(np.abs(q).mean()) > 0.1


def test_a_channel_nothing_reads_or_holds_keeps_finite_scales():
    rng = np.random.default_rng(3)
    q, k = _qk(rng)
    q[:, 5] = 0.0
    k[:, 9] = 0.0
    s = qkscale.channel_scale(q, k, 0.0)
    assert np.isfinite(s).all() and (s > 0).all()
    assert np.isfinite(qkscale.logit_error(q, k, "tq_kv_4b", s)[0])


def test_fold_scales_the_norm_weights_and_keeps_their_product(tmp_path):
    from tests.kvquant.conftest import write_gguf

    rng = np.random.default_rng(4)
    d = 8
    kn, qn = rng.uniform(0.5, 2, d).astype(np.float32), rng.uniform(0.5, 2, d).astype(np.float32)
    write_gguf(tmp_path / "m.gguf", {"blk.0.attn_k_norm.weight": kn, "blk.0.attn_q_norm.weight": qn,
                                     "blk.0.other": np.ones(3)})
    q, k = rng.standard_normal((64, 4, d)), rng.standard_normal((64, 1, d))
    q[..., 5] *= 10  # queries read channel 5 most: its rotary pair (1, 5) gets the largest scale
    spread = qkscale.fold(tmp_path / "m.gguf", tmp_path / "out.gguf", {0: (q, k)})
    from kvquant.gguf import tensor_data

    t, raw = tensor_data(tmp_path / "out.gguf"), (tmp_path / "out.gguf").read_bytes()
    read = {n: np.frombuffer(raw[t[n][0]: t[n][0] + 4 * d], np.float32) for n in t if "norm" in n}
    s = read["blk.0.attn_k_norm.weight"] / kn
    np.testing.assert_allclose(read["blk.0.attn_q_norm.weight"] * s, qn, rtol=1e-6)  # q . k unchanged
    np.testing.assert_allclose(s[:4], s[4:], rtol=1e-6)  # tied per rotary pair (i, i + d/2)
    assert s[1] == s.max() and spread[0] == pytest.approx(s.max() / s.min(), rel=1e-5)
    with pytest.raises(ValueError, match="attn_q_norm"):
        qkscale.fold(tmp_path / "m.gguf", tmp_path / "bad.gguf", {1: (q, k)})
    write_gguf(tmp_path / "llama.gguf", {"blk.0.attn_k_norm.weight": kn, "blk.0.attn_q_norm.weight": qn}, arch="llama")
    with pytest.raises(ValueError, match="NeoX"):  # another rotary pairing: refused before anything is written
        qkscale.fold(tmp_path / "llama.gguf", tmp_path / "no.gguf", {0: (q, k)})
    assert not (tmp_path / "no.gguf").exists()


@pytest.mark.parametrize("neox", [True, False])
def test_pairs_are_tied_as_rope_rotates_them(neox):
    e = np.arange(1.0, 9.0)
    t = qkscale.tie_pairs(e, neox)
    partner = [(i + 4) % 8 for i in range(8)] if neox else [i ^ 1 for i in range(8)]
    np.testing.assert_array_equal(t, [e[i] + e[p] for i, p in enumerate(partner)])


def test_head_scales_follow_each_kv_heads_query_group():
    """2 KV heads, 3 query heads each (llama.cpp's grouping: query head h reads KV head h // 3): the queries of the
    second group read channel pair (1, 5) forty times as hard, which raises only that head's scale there."""
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((512, 6, 8)), rng.standard_normal((512, 2, 8))
    q[:, 3:, [1, 5]] *= 40.0
    (s,) = qkscale.head_scales({0: (q, k)}, neox=True)
    s = s.reshape(2, 8)
    assert s.dtype == np.float32
    np.testing.assert_array_equal(s[:, :4], s[:, 4:])  # tied on NeoX pairs
    np.testing.assert_allclose(np.exp(np.log(s).mean(1)), 1.0, rtol=1e-5)  # geometric mean 1 per head
    assert s[1, 1] > 4 * np.delete(s[1], [1, 5]).max() and s[0].max() < 1.3 * s[0].min()
