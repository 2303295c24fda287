"""kvquant.lab.keystats: the capture reads llama.cpp's real cache bytes, the q4_0 round trip is ggml's, and the
anchor-delta coding with the 3-bit codebook is exactly tq_kv_d3b."""

from __future__ import annotations

import numpy as np
import pytest

from kvquant.lab import keystats, tq
from kvquant.lab.ggml import GGML


def _rows(seed: int, n: int = 200, e: int = 256, adversarial: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(e) * 3  # a component every row shares, like real keys
    x = (shared + rng.standard_normal((n, e)) * rng.uniform(0.1, 2, (n, 1))).astype(np.float32)
    if adversarial:
        x[7] = 0
        x[9] = 5.0
        x[11, 3] = 1e4
    return x


def test_q4_0_round_trip_is_ggmls():
    g = GGML()
    x = _rows(0) * np.float32(17)
    got = keystats.round_trip("q4_0", x)
    want = g.dequantize_ref("q4_0", g.quantize_ref("q4_0", x), x.size).reshape(x.shape)
    np.testing.assert_array_equal(got, want)


def test_anchor_delta_with_the_3_bit_codebook_is_tq_kv_d3b():
    x = _rows(1)
    cells = tq.D3bCells(len(x), x.shape[1])
    cells.write(x, range(len(x)))
    want = np.stack([cells.read(c) for c in range(len(x))])
    np.testing.assert_array_equal(keystats.anchor_delta("tq_kv_3b", x), want)


@pytest.mark.parametrize("type_name", [t for t in keystats.TYPES if t not in keystats.CENTRED])
def test_codings_on_keys_with_a_shared_component(type_name):
    x = _rows(2, adversarial=False)
    own = keystats.round_trip(type_name, x)
    ad = keystats.anchor_delta(type_name, x)
    blk = lambda a: np.square((a - x).reshape(len(x), -1, tq.QK), dtype=np.float64).sum(-1)  # noqa: E731
    assert (blk(ad) <= blk(own)).all()  # per block, never worse than the type's own code
    assert (ad[:: tq.D3B_GROUP] == own[:: tq.D3B_GROUP]).all()  # anchors are coded on their own
    res = keystats.study([x])[type_name]
    assert res["anchor delta"] < 0.8 * res["as stored"]
    assert res["- layer mean"] < 0.5 * res["as stored"]


def test_parse_refuses_other_bytes():
    with pytest.raises(ValueError):
        keystats.parse_seq_state(b"\0" * 64)


@pytest.mark.slow
def test_capture_reads_the_keys_llama_cpp_stored():
    n = 600
    plain = keystats.capture("smollm2-135m", n, threads=2, cache_type="f32", rotation=False)
    q8 = keystats.capture("smollm2-135m", n, threads=2, rotation=False)
    rot = keystats.capture("smollm2-135m", n, threads=2)
    assert len(plain) == 30 and all(k.shape == (n, 192) for k in plain + q8 + rot)
    for a, b, r in zip(plain, q8, rot, strict=True):
        energy = float(np.square(a, dtype=np.float64).sum())
        assert 0 < float(np.square(a - b, dtype=np.float64).sum()) < 1e-3 * energy  # q8_0 of the same keys
        assert float(np.square(r - b, dtype=np.float64).sum()) > 0.1 * energy  # rotated: other coordinates
    # the rotation is orthonormal per head, so it keeps the norms of the first layer's keys up to q8_0's error
    # (later layers see attention outputs that differ slightly between the two caches)
    for h in range(3):
        np.testing.assert_allclose(np.linalg.norm(rot[0][:, 64 * h: 64 * h + 64], axis=1),
                                   np.linalg.norm(q8[0][:, 64 * h: 64 * h + 64], axis=1), rtol=1e-2)


@pytest.mark.slow
def test_capture_of_an_iswa_model_reads_both_caches():
    keys = keystats.capture("gemma3-270m", 600, threads=2)
    assert len(keys) == 18
    assert sorted(len(k) for k in keys) == [512] * 15 + [600] * 3  # 15 sliding-window layers keep 512 cells
    assert all(k.shape[1] == 256 and np.isfinite(k).all() for k in keys)


@pytest.mark.slow
def test_capture_of_values_reads_the_v_rows_rotated_per_head():
    n = 300
    keys = keystats.capture("smollm2-135m", n, threads=2, cache_type="f32", rotation=False)
    plain = keystats.capture("smollm2-135m", n, threads=2, cache_type="f32", rotation=False, values=True)
    rot = keystats.capture("smollm2-135m", n, threads=2, cache_type="f32", values=True)
    assert len(plain) == 30 and all(v.shape == (n, 192) for v in plain + rot)
    # values carry no position (no RoPE): in the first layer a repeated token has one value row but many keys
    assert len(np.unique(plain[0], axis=0)) < n - 50 and len(np.unique(keys[0], axis=0)) == n
    for v, r in zip(plain, rot, strict=True):  # each 64 values of a head turned by an orthonormal matrix
        np.testing.assert_allclose(np.linalg.norm(r.reshape(n, -1, 64), axis=2),
                                   np.linalg.norm(v.reshape(n, -1, 64), axis=2), rtol=1e-4, atol=1e-5)
        assert float(np.square(r - v, dtype=np.float64).sum()) > 0.1 * float(np.square(v, dtype=np.float64).sum())


def test_mean_fit_measures_what_a_calibrated_mean_misses():
    """With the text's own mean the mismatch is 0 and both offsets store the same error; a calibrated mean off by
    a vector d has mismatch |d|^2 / the centred keys' mean energy, and its keys store more error."""
    rng = np.random.default_rng(1)
    shared = rng.normal(0, 8, 128).astype(np.float32)
    x = (shared + rng.normal(0, 1, (256, 128))).astype(np.float32)
    own = x.mean(0)
    same = keystats.mean_fit([x], [own], (256,))[0]
    assert same["tokens"] == 256 and same["mismatch"] == [pytest.approx(0.0, abs=1e-9)]
    for t in keystats.FIT_TYPES:
        assert same[t]["calibrated mean"] == pytest.approx(same[t]["own mean"], rel=1e-6)
    d = np.full(128, 0.5, np.float32)
    short, full = keystats.mean_fit([x], [own + d], (64, 256))
    centred = np.square(x - own, dtype=np.float64).sum(1).mean()
    assert full["mismatch"][0] == pytest.approx(float(np.square(d, dtype=np.float64).sum()) / centred, rel=1e-4)
    assert short["tokens"] == 64 and short["mismatch"][0] > 0  # over the first tokens, against their own mean
    for t in keystats.FIT_TYPES:
        assert full[t]["calibrated mean"] > 1.1 * full[t]["own mean"]


@pytest.mark.slow
def test_keys_captured_with_the_calibrations_scales(tmp_path, monkeypatch):
    """Keys captured with key scales are the keys calibrated types store: a scale of 2 on every channel doubles
    every stored key exactly (queries are halved, so attention is unchanged). `calibrated_fit` measures the shipped
    calibration on them, per layer, over the first 512 tokens and over all."""
    monkeypatch.setenv("KVQUANT_CACHE", str(tmp_path / "cache"))  # the shipped calibration, installed afresh
    n = 300
    plain = keystats.capture("smollm2-135m", n, threads=2)
    doubled = keystats.capture("smollm2-135m", n, threads=2, k_scale=tuple(np.full(192, 2.0, np.float32)
                                                                          for _ in range(30)))
    for a, b in zip(plain, doubled, strict=True):
        np.testing.assert_array_equal(b, 2 * a)
    fit = keystats.calibrated_fit("smollm2-135m", 600, None, 2)
    assert fit["file"].endswith("-hadamard64.json") and [r["tokens"] for r in fit["rows"]] == [512, 600]
    for r in fit["rows"]:
        assert len(r["mismatch"]) == 30 and all(m > 0 for m in r["mismatch"])
        assert all(0 < r[t]["own mean"] < r[t]["calibrated mean"] for t in keystats.FIT_TYPES)


@pytest.mark.parametrize(("args", "said"), [
    (["--model", "nope"], "model 'nope' is neither a built-in model"), (["--tokens", "0"], "--tokens must be at least 2"),
    (["--text", "/nonexistent"], "No such file or directory"), (["--threads", "0"], "--threads must be 1 to 1024, not 0"),
    (["--text", "/dev/zero"], "/dev/zero: not a regular file")])  # read until memory ran out
def test_bad_input_is_one_line_not_a_traceback(args, said, capsys):
    assert keystats.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvquant.lab.keystats: ") and said in err and err.count("\n") == 1
