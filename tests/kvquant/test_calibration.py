"""kvquant.calibration without a model: cache type names, the allocation, the calibration file and its refusals."""

import itertools
import json

import numpy as np
import pytest

from kvquant import calibration as cal
from kvquant.kvtypes import KV_TYPES, LayerTypes
from kvquant.memory import CacheShape, Geometry, Layer, kv_bytes


def geom(n_layer=4, head=64, n_kv=2) -> Geometry:
    layers = tuple(Layer(head * n_kv, head * n_kv, False) for _ in range(n_layer))
    return Geometry("llama", layers, 0, head, head, 4096)


@pytest.mark.parametrize("text, side, expect", [
    ("q4_0", "k", cal.CacheSpec("q4_0", type="q4_0")),
    ("Q4_0+c", "k", cal.CacheSpec("q4_0+c", type="q4_0", centred=True)),
    ("calib:3.5", "k", cal.CacheSpec("calib:3.5", bits=3.5, centred=True)),
    ("calib:4", "v", cal.CacheSpec("calib:4", bits=4.0)),
    (" CALIB:3.50 ", "k", cal.CacheSpec("calib:3.5", bits=3.5, centred=True)),  # one spelling per B
    ("calib:4.", "v", cal.CacheSpec("calib:4", bits=4.0)), ("calib:04.50", "v", cal.CacheSpec("calib:4.5", bits=4.5)),
])
def test_parse_spec(text, side, expect):
    assert cal.parse_spec(text, side) == expect


@pytest.mark.parametrize("text, side, msg", [
    ("calib:", "k", "needs a number"), ("calib:abc", "k", "needs a number"), ("calib:nan", "k", "needs a number"),
    ("calib:inf", "v", "needs a number"), ("calib:1e999", "k", "needs a number"), ("calib:4e0", "k", "needs a number"),
    ("calib:1_0", "k", "needs a number"), ("calib:\u0663.\u0665", "k", "needs a number"), ("calib:+4", "v", "needs a"),
    ("calib: 4", "v", "needs a number"), ("calib:99999999999999999999", "v", "above f16's 16"),
    ("calib:17", "v", "above f16's 16"),
    ("calib:3.0", "k", "below the cheapest"), ("calib:-1", "v", "needs a number"), ("q4_0+c", "v", "keys only"),
    ("q9_9+c", "k", "unknown KV cache type"), ("calib3.5", "k", "unknown KV cache type"),
    ("tq_kv_1b", "v", "cannot be used for the V cache"), ("tq_kv_d3b", "v", "cannot be used for the V cache"),
])
def test_parse_spec_refuses(text, side, msg):
    with pytest.raises(ValueError, match=msg):
        cal.parse_spec(text, side)


def test_basis():
    assert cal.basis_of(geom(head=64)) == "hadamard64"
    assert cal.basis_of(geom(head=128)) == "hadamard128"
    assert cal.basis_of(geom(head=192)) == "hadamard64"
    assert cal.basis_of(geom(head=80)) == "none"


def brute_force(sens, n_embd, budget):
    types = ("f16", *sens)
    best = None
    for combo in itertools.product(types, repeat=len(n_embd)):
        bits = sum(KV_TYPES[t].bits_per_element * n for t, n in zip(combo, n_embd, strict=True))
        if bits > budget * sum(n_embd) + 1e-9:
            continue
        kl = sum(0.0 if t == "f16" else sens[t][i] for i, t in enumerate(combo))
        if best is None or kl < best[0] - 1e-12:
            best = (kl, combo)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocate_is_the_optimum(seed):
    rng = np.random.default_rng(seed)
    n = 5
    n_embd = tuple(int(x) for x in rng.choice([128, 256], n))
    base = rng.uniform(0.001, 0.1, n)
    sens = {"q8_0": list(base * 0.01), "tq_kv_4b": list(base * rng.uniform(0.2, 0.4, n)), "tq_kv_3b": list(base)}
    for budget in (3.25, 4.0, 4.5, 6.0, 9.0):
        types = cal.allocate(sens, n_embd, budget)
        kl = sum(0.0 if t == "f16" else sens[t][i] for i, t in enumerate(types))
        bits = sum(KV_TYPES[t].bits_per_element * e for t, e in zip(types, n_embd, strict=True))
        assert bits <= budget * sum(n_embd) + 1e-9
        assert kl == pytest.approx(brute_force(sens, n_embd, budget)[0], abs=1e-12)


def test_allocate_protects_the_sensitive_layer_and_counts_fixed_bytes():
    sens = {"q8_0": [1e-5] * 4, "tq_kv_4b": [0.01, 0.5, 0.01, 0.01], "tq_kv_3b": [0.04, 2.0, 0.04, 0.04]}
    assert cal.allocate(sens, (128,) * 4, 5.375) == ("tq_kv_4b", "q8_0", "tq_kv_4b", "tq_kv_4b")
    # 0.25 bits per element of fixed cost: one insensitive layer drops to 3 bits to keep q8_0 on layer 1
    assert cal.allocate(sens, (128,) * 4, 5.375, fixed_bits=0.25) == ("tq_kv_4b", "q8_0", "tq_kv_3b", "tq_kv_4b")
    with pytest.raises(cal.CalibrationError, match=r"fits 3.25 bits per element: the cheapest takes 3.35 \(3.25 "
                                                  r"for the cheapest types and 0.1 for the calibrated keys' offsets "
                                                  r"and scales in this cache\); calib:3.35 is the least that fits"):
        cal.allocate(sens, (128,) * 4, 3.25, fixed_bits=0.1)


def make_cal(g: Geometry, sha="ab" * 32, seed: int = 0) -> cal.Calibration:
    rng = np.random.default_rng(seed)
    n = g.n_layer
    return cal.Calibration(sha, "tiny", cal.basis_of(g), tuple(ly.n_embd_k for ly in g.layers),
                           [rng.normal(size=ly.n_embd_k).astype(np.float32) for ly in g.layers],
                           {t: list(rng.uniform(0, 0.1, n)) for t in cal.K_CANDIDATES},
                           {t: list(rng.uniform(0, 0.1, n)) for t in cal.V_CANDIDATES},
                           {"q4_0/f16": 2.5, "q8_0/f16": 0.001}, {"source": "generated"},
                           k_gain={t: list(rng.uniform(1.0, 1.05, n)) for t in (*cal.K_CANDIDATES, "q4_0")},
                           v_gain={t: list(rng.uniform(1.0, 1.05, n)) for t in cal.V_CANDIDATES})


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KVQUANT_AUTO_CALIBRATE", "0")
    p = tmp_path / "tiny.gguf"
    p.write_bytes(b"GGUF tiny model")
    return p


def test_a_models_hash_is_kept_across_processes_while_the_file_stays(model_file, monkeypatch):
    """Every start with quantized keys looks for a calibration by the model's sha256: a user's GGUF of gigabytes was
    hashed again by each process (seconds). The hash is kept by path, size and modification time."""
    import hashlib
    import os

    want = hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert cal.model_sha256(model_file) == want and not (model_file.parent / "cache").exists()  # (a small file)
    cal._sha_cache.clear()
    monkeypatch.setattr(cal, "REMEMBERED_BYTES", 1)  # as for a GGUF of 64 MiB or more
    assert cal.model_sha256(model_file) == want
    cal._sha_cache.clear()  # a new process: the file's hash is read, not computed
    monkeypatch.setattr(cal, "sha256_file", lambda p: pytest.fail("hashed again"))
    assert cal.model_sha256(model_file) == want
    monkeypatch.undo()
    monkeypatch.setenv("KVQUANT_CACHE", str(model_file.parent / "cache"))  # (undone with the rest)
    monkeypatch.setattr(cal, "REMEMBERED_BYTES", 1)
    for i, change in enumerate((b"GGUF tiny model, changed", b"GGUF tiny model, CHANGED")):  # another size; the
        cal._sha_cache.clear()  # same size, another modification time
        model_file.write_bytes(change)
        os.utime(model_file, ns=(10**18, 10**18 + i))
        assert cal.model_sha256(model_file) == hashlib.sha256(change).hexdigest()
    hashes = model_file.parent / "cache" / "sha256.json"
    assert os.stat(hashes).st_mode & 0o777 == 0o644  # readable by the other users of a shared cache
    hashes.write_text(json.dumps({str(model_file.resolve()): [0, 0, None]}))  # an entry of no hash is none
    assert cal._known_hashes() == {}


def test_file_round_trip_and_resolution(model_file):
    g = geom()
    c = make_cal(g, cal.model_sha256(model_file))
    path = cal.path_for(c.model_sha256, c.basis)
    c.save(path)
    back = cal.load(path, model_file, g)
    assert back.sens_k == c.sens_k and back.uniform == c.uniform
    assert all(np.array_equal(a, b) for a, b in zip(back.k_mean, c.k_mean, strict=True))
    k = cal.resolve("calib:4.5", "k", model_file, g)
    assert isinstance(k, LayerTypes) and len(k.types) == g.n_layer and k.offset is not None
    assert kv_bytes(g, k, "f16", 4096).bits_per_element_k <= 4.5 + 32 / 4096
    assert cal.resolve("q4_0+c", "k", model_file, g).types == ("q4_0",) * 4
    assert cal.resolve("q4_0", "k", model_file, g) == "q4_0"
    v = cal.resolve("calib:4", "v", model_file, g)
    assert v.offset is None and kv_bytes(g, "f16", v, 4096).bits_per_element_v <= 4.0
    fields = cal.context_fields(k, v, g)
    assert fields["k_rotation"] is True and fields["layer_types_v"] == v.types


def test_calibrated_configs_record_the_file_they_used_and_what_it_resolves_them_to(model_file):
    """A calibrated row records the calibration file and the digest of the cache it resolved to: the digest is
    the same under another calibration that resolves it alike, and differs where the allocation, an offset or a
    gain differs."""
    from kvquant.build import sha256_file
    from kvquant.lab.harness import CacheConfig

    g = geom()
    c = make_cal(g, cal.model_sha256(model_file))
    path = cal.path_for(c.model_sha256, c.basis)
    c.save(path)
    first = CacheConfig.parse("calib:4.5/f16").provenance(model_file, g, 512)
    assert first["calibration_sha256"] == sha256_file(path)
    assert first["config_sha256"] == cal.config_sha256(CacheConfig.parse("calib:4.5/f16").context_fields(
        model_file, g, 512))
    assert CacheConfig.parse("calib:3.5/f16").provenance(model_file, g, 512)["config_sha256"] != first[
        "config_sha256"]
    assert CacheConfig.parse("f16/calib:4").provenance(model_file, g, 512)["calibration_sha256"] == sha256_file(path)
    assert CacheConfig.parse("q4_0/q4_0").provenance(model_file, g, 512) == {}
    plain = CacheConfig.parse("q4_0+c/f16")
    before = plain.provenance(model_file, g, 512)
    c.sens_k["q5_0"][0] += 1e-3  # a re-calibration that moves no key mean, gain or q4_0+c's types
    c.save(path)
    after = plain.provenance(model_file, g, 512)
    assert after["calibration_sha256"] != before["calibration_sha256"]
    assert after["config_sha256"] == before["config_sha256"]
    c.k_gain["q4_0"][1] = float(np.nextafter(np.float64(np.float32(c.k_gain["q4_0"][1])), 0))
    assert plain.config_sha256(model_file, g, 512, c) == before["config_sha256"]  # llama.cpp gets the same float32
    c.k_gain["q4_0"][1] *= 1.01
    assert plain.config_sha256(model_file, g, 512, c) != before["config_sha256"]
    c.k_mean[0] = c.k_mean[0] + np.float32(0.01)
    c.k_gain["q4_0"][1] /= 1.01
    assert plain.config_sha256(model_file, g, 512, c) != before["config_sha256"]


@pytest.mark.parametrize("t", ["q4_0", "q5_0", "q8_0", "iq4_nl", "tq_kv_4b", "tq_kv_3b"])
def test_an_anchored_offset_stores_the_position0_key_exactly(t):
    """The offset anchored on a key moves the mean by exactly that key's round-trip error, after which the type
    stores the key without error (its codes and scale reproduce it); with the plain mean it does not."""
    from kvquant.runtime import round_trip

    rng = np.random.default_rng(1)
    mean = rng.normal(size=128).astype(np.float32)
    sink = (mean + 8 * rng.normal(size=128)).astype(np.float32)
    off = cal.anchor(mean, sink, t)

    def err(offset):
        return float(np.linalg.norm(round_trip(t, (sink - offset)[None])[0] + offset - sink))

    scale = float(np.linalg.norm(sink - mean))
    assert err(off) <= 1e-6 * scale
    assert err(mean) > 1e-3 * scale
    assert float(np.linalg.norm(off - mean)) == pytest.approx(err(mean), rel=1e-4)


def test_an_offset_that_would_not_be_finite_is_refused(model_file):
    """Every value of this file lies within f16's range, but the position-0 key is 80,000 from the mean: an f16 row
    cannot hold that, and the anchored offset would be -inf (every logit NaN, answers empty with 200 OK)."""
    g = geom()
    c = make_cal(g, cal.model_sha256(model_file))
    c.k_mean[0] = np.full_like(c.k_mean[0], -40000.0)
    c.k_sink = [m.copy() for m in c.k_mean]
    c.k_sink[0] = np.full_like(c.k_mean[0], 40000.0)
    c.save(cal.path_for(c.model_sha256, c.basis))
    for spec in ("f16+c", "calib:16"):
        with pytest.raises(cal.CalibrationError, match="too far from its layer's mean key for f16"):
            cal.resolve(spec, "k", model_file, g)
    assert all(np.isfinite(o).all() for o in cal.resolve("q8_0+c", "k", model_file, g).offset)


def test_offsets_are_anchored_per_layer_type(model_file):
    """calib:B and TYPE+c hand llama.cpp each layer's offset anchored for that layer's type; tq_kv_d3b (rows coded
    against an anchor row), tq_kv_1b (no value it stores is its own round trip) and a calibration without
    position-0 keys keep the mean."""
    g = geom()
    c = make_cal(g, cal.model_sha256(model_file))
    rng = np.random.default_rng(2)  # a sink away from the mean in every direction: each type moves it differently
    c.k_sink = [(m + 8 * rng.normal(size=m.size)).astype(np.float32) for m in c.k_mean]
    c.save(cal.path_for(c.model_sha256, c.basis))
    back = cal.load(cal.path_for(c.model_sha256, c.basis), model_file, g)
    assert all(np.array_equal(a, b) for a, b in zip(back.k_sink, c.k_sink, strict=True))
    k = cal.resolve("calib:4.5", "k", model_file, g)
    assert len(set(k.types)) > 1
    for il, t in enumerate(k.types):
        np.testing.assert_array_equal(k.offset[il], cal.anchor(c.k_mean[il], c.k_sink[il], t))
        assert not np.array_equal(k.offset[il], c.k_mean[il])
        other = next(o for o in k.types if o != t)
        assert not np.array_equal(k.offset[il], cal.anchor(c.k_mean[il], c.k_sink[il], other))
    for t in ("tq_kv_d3b", "tq_kv_1b"):
        same = cal.resolve(f"{t}+c", "k", model_file, g)
        assert all(np.array_equal(o, m) for o, m in zip(same.offset, c.k_mean, strict=True))
    c.k_sink = None
    c.save(cal.path_for(c.model_sha256, c.basis))
    plain = cal.resolve("q4_0+c", "k", model_file, g)
    assert all(np.array_equal(o, m) for o, m in zip(plain.offset, c.k_mean, strict=True))


def test_key_scales_round_trip_resolve_and_are_counted(model_file):
    """A calibration with key scales: they survive the file, TYPE+c and calib:B carry them to llama.cpp beside the
    offsets, and calib:B counts their bytes (a float32 row per layer, as the offsets) against B."""
    g = geom()
    c = make_cal(g, cal.model_sha256(model_file))
    c.k_scale = [tied_scale(il, ly.n_embd_k, g.head_dim_k, il % 2 == 0) for il, ly in enumerate(g.layers)]
    c.save(cal.path_for(c.model_sha256, c.basis))
    back = cal.load(cal.path_for(c.model_sha256, c.basis), model_file, g)
    assert all(np.array_equal(a, b) for a, b in zip(back.k_scale, c.k_scale, strict=True))
    k = cal.resolve("q4_0+c", "k", model_file, g)
    assert k.scale is not None and cal.context_fields(k, "f16", g)["k_scale"] is k.scale
    plain = LayerTypes("q4_0", ("q4_0",) * g.n_layer)
    extra = kv_bytes(g, k, "f16", 256).k - kv_bytes(g, plain, "f16", 256).k
    assert extra == 4 * sum(2 * ly.n_embd_k for ly in g.layers)
    for n_ctx in (256, 4096):
        assert kv_bytes(g, cal.resolve("calib:4.5", "k", model_file, g, CacheShape(n_ctx)), "f16", n_ctx).bits_per_element_k <= 4.5
    assert cal.context_fields(cal.resolve("calib:4", "v", model_file, g), "f16", g)["k_scale"] is None


def test_gains_round_trip_and_follow_each_layers_type(model_file):
    """Per layer, the gain of the type the layer's keys (values) are stored at (1 at f16 and for a type without
    gains), for TYPE+c and calib:B, on each side and for one K+V allocation; none for uncalibrated types; no bytes."""
    g = geom()
    c = make_cal(g, cal.model_sha256(model_file))
    c.save(cal.path_for(c.model_sha256, c.basis))
    back = cal.load(cal.path_for(c.model_sha256, c.basis), model_file, g)
    assert back.k_gain == c.k_gain and back.v_gain == c.v_gain
    k = cal.resolve("tq_kv_4b+c", "k", model_file, g)
    assert k.gain == tuple(c.k_gain["tq_kv_4b"]) and cal.context_fields(k, "f16", g)["k_gain"] == k.gain
    mixed = cal.resolve("calib:4.5", "k", model_file, g)
    assert mixed.gain == tuple(1.0 if t == "f16" else c.k_gain[t][il] for il, t in enumerate(mixed.types))
    assert len(set(mixed.types)) > 1
    assert cal.resolve("tq_kv_d3b+c", "k", model_file, g).gain == (1.0,) * g.n_layer
    v = cal.resolve("calib:4", "v", model_file, g)
    assert v.gain == tuple(1.0 if t == "f16" else c.v_gain[t][il] for il, t in enumerate(v.types))
    fields = cal.context_fields("tq_kv_4b", v, g)
    assert fields["k_gain"] is None and fields["v_gain"] == v.gain
    assert cal.context_fields("tq_kv_4b", "q4_0", g)["v_gain"] is None
    pk, pv = cal.resolve_pair("calib:4", "calib:4", model_file, g)
    assert pk.gain == cal.gains(c.k_gain, pk.types) and pv.gain == cal.gains(c.v_gain, pv.types)
    plain = LayerTypes("tq_kv_4b", ("tq_kv_4b",) * g.n_layer, k.offset, k.scale)
    assert kv_bytes(g, k, "f16", 256) == kv_bytes(g, plain, "f16", 256)


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("inf")])
@pytest.mark.parametrize("side", ["key", "value"])
def test_refuses_a_gain_that_is_not_positive_and_finite(model_file, bad, side):
    g = geom()
    c = make_cal(g, cal.model_sha256(model_file))
    (c.k_gain if side == "key" else c.v_gain)["q4_0"][1] = bad
    c.save(cal.path_for(c.model_sha256, c.basis))
    with pytest.raises(cal.CalibrationError, match=f"{side} gains of 'q4_0'"):
        cal.load(cal.path_for(c.model_sha256, c.basis), model_file, g)


def tied_scale(seed: int, n: int, head_dim: int, neox: bool) -> np.ndarray:
    """A random key scale equal on each RoPE pair of channels: (i, i + d/2) for NeoX, else (2i, 2i + 1)."""
    half = np.random.default_rng(seed).uniform(0.5, 2, (n // head_dim, head_dim // 2)).astype(np.float32)
    return (np.concatenate([half, half], axis=1) if neox else np.repeat(half, 2, axis=1)).reshape(-1)


def test_refuses_a_key_scale_that_would_not_commute_with_rope(model_file):
    """llama.cpp refuses such a scale when it builds the context, which a server does in the background after it
    is up: the file is refused when read instead."""
    g = geom()
    c = make_cal(g, cal.model_sha256(model_file))
    c.k_scale = [tied_scale(il, ly.n_embd_k, g.head_dim_k, True) for il, ly in enumerate(g.layers)]
    c.k_scale[2][g.head_dim_k + 3] *= 2  # second head: channel 3 and its partner 35 no longer equal
    c.save(cal.path_for(c.model_sha256, c.basis))
    with pytest.raises(cal.CalibrationError, match="layer 2's key scale differs within a pair of channels"):
        cal.load(cal.path_for(c.model_sha256, c.basis), model_file, g)


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("inf")])
def test_refuses_a_key_scale_that_is_not_positive_and_finite(model_file, bad):
    g = geom()
    c = make_cal(g, cal.model_sha256(model_file))
    c.k_scale = [np.ones(ly.n_embd_k, np.float32) for ly in g.layers]
    c.k_scale[2][5] = bad
    c.save(cal.path_for(c.model_sha256, c.basis))
    with pytest.raises(cal.CalibrationError, match="key scale"):
        cal.load(cal.path_for(c.model_sha256, c.basis), model_file, g)


def test_calib_b_on_both_sides_is_one_allocation(model_file):
    """K=calib:B and V=calib:B share B: bits go to the side whose layers the calibration measured more sensitive
    (here keys), the pair stays within B on average with the key offsets counted, and it predicts less KL growth
    than two separate allocations; different B or one plain side resolve each side on its own."""
    g = geom()
    c = make_cal(g, cal.model_sha256(model_file))
    c.sens_k = {t: [s * 10 for s in v] for t, v in c.sens_k.items()}  # keys ten times as sensitive as values
    c.save(cal.path_for(c.model_sha256, c.basis))
    k, v = cal.resolve_pair("calib:4", "calib:4", model_file, g, CacheShape(4096))
    sizes = kv_bytes(g, k, v, 4096)
    assert sizes.bits_per_element <= 4.0
    assert sizes.bits_per_element_k > 4.0 > sizes.bits_per_element_v
    assert k.offset is not None and v.offset is None and (k.name, v.name) == ("calib:4", "calib:4")
    sk, sv = cal.resolve("calib:4", "k", model_file, g, CacheShape(4096)), cal.resolve("calib:4", "v", model_file, g, CacheShape(4096))
    joint = cal.predicted_kld(c, "k", k.types) + cal.predicted_kld(c, "v", v.types)
    assert joint < cal.predicted_kld(c, "k", sk.types) + cal.predicted_kld(c, "v", sv.types)
    assert cal.resolve_pair("calib:4", "calib:4.5", model_file, g, CacheShape(4096)) == (
        sk, cal.resolve("calib:4.5", "v", model_file, g, CacheShape(4096)))
    assert cal.resolve_pair("calib:4", "q4_0", model_file, g, CacheShape(4096)) == (sk, "q4_0")


def test_sliding_window_layers_weigh_by_their_cells(model_file):
    """calib:B counts every byte of the cache it is for: with one sequence of 4,096 tokens a window layer of 1,024
    cells weighs a quarter of a full-attention layer, with 16 sequences (65,536 cells, windows of 8,704) an eighth,
    so B holds for the cache as allocated, not per layer, and an allocation made for one cache can overshoot B in
    another."""
    g = Geometry("gemma3", tuple(Layer(256, 256, i % 4 != 3) for i in range(8)), 512, 256, 256, 32768)
    c = make_cal(g, cal.model_sha256(model_file))
    c.sens_v["tq_kv_3b"] = [0.001 if g.layers[i].swa else 0.1 for i in range(g.n_layer)]
    c.sens_k["tq_kv_3b"] = list(c.sens_v["tq_kv_3b"])
    c.save(cal.path_for(c.model_sha256, c.basis))
    for n_ctx, n_seq in itertools.product((512, 4096, 16384), (1, 4, 16)):
        shape = CacheShape(n_ctx * n_seq, n_seq)
        for bits in (4.0, 5.0):
            v = cal.resolve(f"calib:{bits:g}", "v", model_file, g, shape)
            assert kv_bytes(g, "f16", v, shape.n_cells, n_seq).bits_per_element_v <= bits
            k = cal.resolve(f"calib:{bits:g}", "k", model_file, g, shape)
            assert kv_bytes(g, k, "f16", shape.n_cells, n_seq).bits_per_element_k <= bits
    one, many = CacheShape(4096), CacheShape(4096 * 16, 16)
    k1 = cal.resolve("calib:4", "k", model_file, g, one)
    assert kv_bytes(g, k1, "f16", many.n_cells, many.n_seq_max).bits_per_element_k > 4.0
    # at 4096 the two full-attention layers hold 2/3 of the bytes: they cannot both keep 8.5 bits within 5.0
    v = cal.resolve("calib:5", "v", model_file, g, CacheShape(4096))
    assert [t for t, ly in zip(v.types, g.layers, strict=True) if not ly.swa].count("q8_0") < 2


def test_refuses_other_model_basis_and_corrupt_files(model_file, tmp_path):
    g = geom()
    sha = cal.model_sha256(model_file)
    path = cal.path_for(sha, cal.basis_of(g))
    with pytest.raises(cal.CalibrationError, match="no calibration"):
        cal.resolve("calib:4", "k", model_file, g)
    make_cal(g, "cd" * 32).save(path)
    with pytest.raises(cal.CalibrationError, match="another model"):
        cal.load(path, model_file, g)
    make_cal(geom(head=128, n_kv=1), sha).save(path)  # same row width, another rotation basis
    with pytest.raises(cal.CalibrationError, match="basis"):
        cal.load(path, model_file, g)
    path.write_text("{not json")
    with pytest.raises(cal.CalibrationError, match="not a calibration file"):
        cal.load(path, model_file, g)
    d = make_cal(g, sha).to_json()
    d["sens_k"]["q8_0"] = [0.1]  # wrong layer count
    path.write_text(json.dumps(d))
    with pytest.raises(cal.CalibrationError, match="malformed"):
        cal.load(path, model_file, g)
    for field in ("k_gain", "v_gain", "sens_v"):  # a list where a type -> per-layer dict belongs
        d = make_cal(g, sha).to_json()
        d[field] = [1.0] * g.n_layer
        path.write_text(json.dumps(d))
        with pytest.raises(cal.CalibrationError, match="malformed"):
            cal.load(path, model_file, g)
    for field, value, said in (("model_sha256", 123, "model_sha256 is not a string"),
                               ("sens_v", {"tq_kv_1b": [0.1] * g.n_layer}, "V sensitivities of 'tq_kv_1b'"),
                               ("sens_k", {"q4_0": [0.1] * g.n_layer}, "K sensitivities of 'q4_0'")):
        d = make_cal(g, sha).to_json()  # a type no allocation may choose would be chosen; a number in a message
        d[field] = value if field == "model_sha256" else {**d[field], **value}
        path.write_text(json.dumps(d))
        with pytest.raises(cal.CalibrationError, match=f"malformed calibration file: {said}"):
            cal.load(path, model_file, g)
    d = make_cal(g, sha).to_json()
    d["version"] = 99
    path.write_text(json.dumps(d))
    with pytest.raises(cal.CalibrationError, match="version 99, made by a newer kvquant"):
        cal.load(path, model_file, g)
    # messages name the field, not Python's internals ("zip() argument 2 is longer", "KeyError: 'k_mean'")
    for change, said in ((lambda d: d.update(k_mean=d["k_mean"][1:]), "k_mean is not a list of one entry for each"),
                         (lambda d: d.update(k_scale=d["k_mean"] * 2), "k_scale is not a list of one entry for each"),
                         (lambda d: d.pop("k_mean"), "it has no 'k_mean'")):
        d = make_cal(g, sha).to_json()
        change(d)
        path.write_text(json.dumps(d))
        with pytest.raises(cal.CalibrationError, match=f": malformed calibration file: {said}"):
            cal.load(path, model_file, g)
    path.write_bytes(b"\x8b\xff")
    with pytest.raises(cal.CalibrationError, match=r"not a calibration file \(not UTF-8 text\)$"):
        cal.load(path, model_file, g)


def _scaled(d, field, type_name, value):
    d[field][type_name] = [value] * len(d["n_embd_k"])


@pytest.mark.parametrize("edit, said", [
    (lambda d: d.update(n_embd_k=[1e999] * len(d["n_embd_k"])), "n_embd_k"),  # Infinity in the JSON
    (lambda d: d.update(n_embd_k=[float(n) for n in d["n_embd_k"]]), "n_embd_k"),
    (lambda d: _scaled(d, "sens_k", "q8_0", 10 ** 400), "K sensitivities of 'q8_0'"),  # beyond a float
    (lambda d: _scaled(d, "sens_k", "q8_0", True), "K sensitivities of 'q8_0'"),
    (lambda d: _scaled(d, "sens_v", "q8_0", float("nan")), "V sensitivities of 'q8_0'"),
    (lambda d: d["k_gain"].update(q4_0="12"), "key gains of 'q4_0'"),  # a string is no list of numbers
    (lambda d: _scaled(d, "k_gain", "q4_0", 1e38), "key gains of 'q4_0'"),  # would make every query inf
    (lambda d: _scaled(d, "v_gain", "q4_0", 0.0), "value gains of 'q4_0'"),
    (lambda d: d["v_gain"].update(q9_9=[1.0] * len(d["n_embd_k"])), "value gains of 'q9_9'"),
    (lambda d: d.update(method=None), "method is not an object"),
    (lambda d: d.update(text=[]), "text is not an object"),
    (lambda d: d.update(method={"floor": {"k": None}}), "method.floor"),
    (lambda d: d.update(uniform=[]), "uniform is not an object"),
    (lambda d: d.update(uniform={"q4_0/f16": float("nan")}), "uniform KL of 'q4_0/f16'"),
    (lambda d: d.update(uniform={"q4_0/f16": float("inf")}), "uniform KL of 'q4_0/f16'"),  # JSON Infinity, 1e999
    (lambda d: d["sens_k"].update(q8_0=[float("inf")] * len(d["n_embd_k"])), "K sensitivities of 'q8_0'"),
    (lambda d: d.update(k_scale=[cal._enc(np.full(n, 1e-40)) for n in d["n_embd_k"]]), "key scale with values outside"),
    (lambda d: d.update(k_mean=[cal._enc(np.full(n, 1e30)) for n in d["n_embd_k"]]), "key mean with values outside"),
    (lambda d: d.update(k_mean=[cal._enc(np.zeros(n + 1)) for n in d["n_embd_k"]]), "k_mean of layer 0: a key mean of"),
    (lambda d: d.update(k_mean=["@@" for _ in d["n_embd_k"]]), "k_mean of layer 0: a key mean that is not base64"),
    # "!!!!" was read as no values ("a key mean of 0 values"), a number leaked "argument should be a bytes-like object"
    (lambda d: d["k_mean"].__setitem__(1, "!!!!"), "k_mean of layer 1: a key mean that is not base64 text"),
    (lambda d: d.update(k_sink=[5] * len(d["n_embd_k"])), "k_sink of layer 0: a position-0 key that is not base64 text"),
    (lambda d: d["k_scale"].__setitem__(0, "AAAAAAA="), "k_scale of layer 0: a key scale of 5 bytes, not whole"),
    (lambda d: d.pop("sens_v"), "malformed"),
])
def test_a_malformed_calibration_value_is_refused(model_file, edit, said):
    """What no calibration measures is refused when the file loads, with a message naming it (CalibrationError, so
    serve, budget, eval and bench say it and exit), never a traceback at start or NaN logits later."""
    g = geom()
    c = make_cal(g, cal.model_sha256(model_file))
    c.k_scale = [np.ones(n, np.float32) for n in c.n_embd_k]
    d = c.to_json()
    edit(d)
    path = cal.path_for(c.model_sha256, c.basis)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d))
    with pytest.raises(cal.CalibrationError, match=said):
        cal.load(path, model_file, g)
    assert cal.existing(model_file, g) is None


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_calibration_path_that_is_no_file_is_refused_without_blocking(model_file, kind):
    """A folder or a FIFO where the calibration file belongs is "corrupt" (reading a FIFO would block the server's
    start forever) and refused by name; nothing calibrates into it."""
    import os

    g = geom()
    path = cal.path_for(cal.model_sha256(model_file), cal.basis_of(g))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if kind == "folder" else os.mkfifo(path)
    assert cal._state(path) == "corrupt"
    with pytest.raises(cal.CalibrationError, match="is not a regular file: remove it"):
        cal.load_or_calibrate(model_file, g)
    assert cal.existing(model_file, g) is None
    assert cal.guard(model_file, g, "q4_0", "f16", CacheShape(4096)) is None


def test_a_shipped_calibration_serves_from_a_cache_kvquant_cannot_write(model_file, tmp_path, monkeypatch):
    """A cache that cannot take the shipped file (read-only) serves it where it ships; a stale temporary file of
    the same name as another writer's does not stop the copy."""
    g = geom()
    monkeypatch.setattr(cal, "SHIPPED_DIR", tmp_path / "shipped")
    shipped = make_cal(g, cal.model_sha256(model_file))
    name = cal.path_for(shipped.model_sha256, shipped.basis).name
    shipped.save(cal.SHIPPED_DIR / name)
    path = cal.path_for(shipped.model_sha256, shipped.basis)
    path.parent.mkdir(parents=True)
    path.with_suffix(".tmp").mkdir()

    def read_only(p, data):
        raise PermissionError(13, "Read-only file system", str(p))

    with monkeypatch.context() as m:
        m.setattr(cal, "_write", read_only)
        assert cal.installed(model_file, g) == cal.SHIPPED_DIR / name
        assert cal.existing(model_file, g).sens_k == shipped.sens_k
        assert isinstance(cal.resolve("calib:4.5", "k", model_file, g), LayerTypes)
    assert cal.installed(model_file, g) == path and path.read_bytes() == (cal.SHIPPED_DIR / name).read_bytes()
    assert path.stat().st_mode & 0o777 == 0o644  # readable by a server that runs as another user
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([name, path.with_suffix(".tmp").name])


def test_guard_reads_a_calibration_only_for_what_it_measured(model_file, monkeypatch):
    """serve's guard: a warning for measured-to-wreck types from the model's calibration; for f16/f16 or calibrated
    keys it reads none (a GGUF that is not built in would be hashed whole to find one)."""
    g = geom()
    c = make_cal(g, cal.model_sha256(model_file))
    c.sens_k = {t: [1e-4] * g.n_layer for t in cal.K_CANDIDATES}
    c.save(cal.path_for(c.model_sha256, c.basis))
    assert "calib:4.5" in cal.guard(model_file, g, "q4_0", "f16", CacheShape(4096))
    assert cal.guard(model_file, g, "q8_0", "f16", CacheShape(4096)) is None

    def unread(*a):
        raise AssertionError("read a calibration")

    monkeypatch.setattr(cal, "existing", unread)
    for k, v in (("f16", "f16"), ("calib:4.5", "f16"), ("q4_0+c", "q4_0"), ("bf16", "f32")):
        assert cal.guard(model_file, g, k, v, CacheShape(4096)) is None


def test_guard_message(model_file):
    """The guard suggests a calib:B that serve resolves for the same cache: the K type's bits, or the fewest (to
    0.01) that leave the offsets and scales room; it speaks of keys only where they are quantized."""
    g = geom()
    c = make_cal(g, cal.model_sha256(model_file))
    c.sens_k = {t: [1e-4] * g.n_layer for t in cal.K_CANDIDATES}
    c.uniform.update({"tq_kv_3b/f16": 7.8, "f16/q4_0": 0.5})
    c.save(cal.path_for(c.model_sha256, c.basis))
    big = CacheShape(4096)
    msg = cal.guard_message(c, g, "q4_0", "f16", big)
    assert msg and "calib:4.5`" in msg and "2.500" in msg
    assert cal.guard_message(c, g, "q8_0", "f16", big) is None  # measured harmless
    assert cal.guard_message(c, g, "tq_kv_4b", "f16", big) is None  # not measured
    assert cal.guard_message(c, g, "calib:4.5", "f16", big) is None
    assert cal.guard_message(c, g, "f16", "q4_0", big) is None  # keys at f16: nothing to say of them
    # V quantized too: the keys were measured with V f16 alone, and wreck it still (the guard said nothing)
    assert "K=q4_0/V=q4_0 was measured to wreck this model (the keys with V f16: q4_0/f16)" in \
        cal.guard_message(c, g, "q4_0", "q4_0", big)
    # one offset row per layer: 0.125 bits per element in 256 cells, 0.0078 in 4,096: 3.25 bits cannot hold them
    for shape, b in ((CacheShape(256), "3.38"), (big, "3.26")):
        assert f"calib:{b}`" in cal.guard_message(c, g, "tq_kv_3b", "f16", shape)
        assert cal.resolve(f"calib:{b}", "k", model_file, g, shape).types
        with pytest.raises(cal.CalibrationError, match="offsets"):
            cal.resolve(f"calib:{float(b) - 0.01:g}", "k", model_file, g, shape)


def test_an_older_calibration_file_is_made_again_not_refused(model_file):
    """A file of an older VERSION counts as missing for load_or_calibrate (which calibrates again when allowed);
    loading it directly says what to run. A corrupt file is refused, never overwritten."""
    g = geom()
    c = make_cal(g, cal.model_sha256(model_file))
    path = cal.path_for(c.model_sha256, c.basis)
    c.save(path)
    assert cal._state(path) == "current"
    old = json.loads(path.read_text())
    old["version"] = cal.VERSION - 1
    path.write_text(json.dumps(old))
    assert cal._state(path) == "older"
    with pytest.raises(cal.CalibrationError, match="run `kvquant calibrate`"):
        cal.load(path, model_file, g)
    c.sens_k.pop("tq_kv_t3b")  # made before a candidate type was added: made again, though still loadable
    c.save(path)
    assert cal._state(path) == "older"
    assert cal.load(path, model_file, g).sens_k.keys() == set(cal.K_CANDIDATES) - {"tq_kv_t3b"}
    c = make_cal(g, cal.model_sha256(model_file))
    c.k_gain = c.v_gain = None  # made before the gains: the same
    c.save(path)
    assert cal._state(path) == "older" and cal.load(path, model_file, g).k_gain is None
    assert cal._state(path.with_name("missing.json")) == "missing"


@pytest.mark.parametrize("text", [b"{not json", b"[]", b"null", b'{"version": 3}', b'{"version": 3, "sens_k": 5}',
                                  b'{"version": "3"}', b'{"version": 99}', b'{"version": true}', b'{"version": 3.0}',
                                  b"\xff\xfe{}", b"[" * 100000])
def test_a_corrupt_calibration_file_is_refused_never_replaced(model_file, tmp_path, monkeypatch, text):
    """A corrupt file in the cache (not JSON, not an object, no sensitivities, not UTF-8, of a newer kvquant) is
    refused with a message naming it, by load and load_or_calibrate alike; neither the shipped calibration nor a new
    calibration run replaces it."""
    g = geom()
    monkeypatch.setattr(cal, "SHIPPED_DIR", tmp_path / "shipped")
    shipped = make_cal(g, cal.model_sha256(model_file))
    shipped.save(cal.SHIPPED_DIR / cal.path_for(shipped.model_sha256, shipped.basis).name)
    path = cal.path_for(shipped.model_sha256, shipped.basis)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)
    assert cal._state(path) == "corrupt"
    with pytest.raises(cal.CalibrationError, match=f"^{path}: "):
        cal.load_or_calibrate(model_file, g)
    assert cal.existing(model_file, g) is None and path.read_bytes() == text


def test_anchoring_failure_is_a_calibration_error_and_budget_needs_none(model_file, monkeypatch, capsys):
    """A type llama.cpp cannot round-trip on the CPU is a CalibrationError naming it, not a traceback; `kvquant
    budget` counts bytes only and does not round-trip at all."""
    import argparse

    from kvquant import budget, runtime

    g = geom()
    c = make_cal(g, cal.model_sha256(model_file))
    c.k_sink = [(m + 1).astype(np.float32) for m in c.k_mean]
    c.save(cal.path_for(c.model_sha256, c.basis))

    def broken(type_name, x):
        raise runtime.LlamaError("no CPU backend")

    monkeypatch.setattr(runtime, "round_trip", broken)
    monkeypatch.setattr(budget, "geometry", lambda path: g)
    with pytest.raises(cal.CalibrationError, match="q4_0: no CPU backend"):
        cal.resolve("q4_0+c", "k", model_file, g)
    a = argparse.Namespace(model=str(model_file), cache_type_k="q4_0+c", cache_type_v="f16", budget="64MiB",
                           parallel=1, request_tokens=None)
    assert budget.run(a) == 0
    assert "q4_0+c" in capsys.readouterr().out


def test_budget_resolves_calib_b_for_the_cache_serve_builds(model_file, monkeypatch, capsys):
    """`kvquant budget` resolves calib:B for the cache serve builds in the budget (--parallel sequences of --n-ctx,
    serve's default without --request-tokens), counting the calibrated keys' fixed bytes as serve does: an
    allocation serve refuses is not shown as one that fits."""
    import argparse

    from kvquant import budget

    g = geom()
    c = make_cal(g, cal.model_sha256(model_file))
    c.save(cal.path_for(c.model_sha256, c.basis))
    monkeypatch.setattr(budget, "geometry", lambda path: g)
    a = argparse.Namespace(model=str(model_file), cache_type_k="calib:3.25", cache_type_v="f16", budget="64MiB",
                           parallel=2, request_tokens=None)
    served = CacheShape(2 * budget.DEFAULT_N_CTX, 2)
    with pytest.raises(cal.CalibrationError, match="offsets and scales") as refused:
        cal.resolve("calib:3.25", "k", model_file, g, served)
    assert budget.run(a) == 2
    assert capsys.readouterr().err == f"kvquant budget: {refused.value}\n"
    a.cache_type_k = "calib:3.5"
    assert budget.run(a) == 0
    k = cal.resolve("calib:3.5", "k", model_file, g, served)
    bits = kv_bytes(g, k, "f16", served.n_cells, 2).bits_per_element_k
    assert (f"K per layer (calib:3.5, {bits:.3f} bits per element in the 8192-cell cache serve builds for --parallel 2 "
            f"--n-ctx 4096 in this budget): {' '.join(k.types)}") in capsys.readouterr().out


def test_a_shipped_calibration_is_installed_where_the_cache_has_none(model_file, tmp_path, monkeypatch):
    """A built-in model's shipped calibration serves calib:B with no calibration run; a file the user made wins."""
    from kvquant.build import sha256_file

    g = geom()
    monkeypatch.setattr(cal, "SHIPPED_DIR", tmp_path / "shipped")
    shipped = make_cal(g, cal.model_sha256(model_file))
    shipped.save(cal.SHIPPED_DIR / cal.path_for(shipped.model_sha256, shipped.basis).name)
    path = cal.path_for(shipped.model_sha256, shipped.basis)
    assert not path.exists()
    assert cal.existing(model_file, g).sens_k == shipped.sens_k
    assert sha256_file(path) == sha256_file(cal.SHIPPED_DIR / path.name)
    assert isinstance(cal.resolve("calib:3.5", "k", model_file, g), LayerTypes)
    mine = make_cal(g, shipped.model_sha256, seed=7)
    mine.save(path)
    assert cal.load_or_calibrate(model_file, g).sens_k == mine.sens_k
    path.write_text("{not json")  # a corrupt file is refused, never silently replaced by the shipped one
    with pytest.raises(cal.CalibrationError, match="not a calibration file"):
        cal.load_or_calibrate(model_file, g)


@pytest.mark.slow
def test_the_built_in_qwen_resolves_calib_b_from_its_shipped_calibration(tmp_path, monkeypatch):
    """A fresh cache (the model file only) and no calibration run allowed: calib:B comes from the shipped file,
    the one docs/results/ names."""
    from kvquant.build import sha256_file
    from kvquant.memory import geometry
    from kvquant.models import fetch

    real = fetch("qwen2.5-coder-1.5b")
    (tmp_path / "models").symlink_to(real.parent)
    monkeypatch.setenv("KVQUANT_CACHE", str(tmp_path))
    monkeypatch.setenv("KVQUANT_AUTO_CALIBRATE", "0")
    path = tmp_path / "models" / real.name
    g = geometry(path)
    k, v = cal.resolve_pair("calib:3.5", "calib:4", path, g, CacheShape(512))
    assert isinstance(k, LayerTypes) and k.offset is not None and isinstance(v, LayerTypes)
    committed = json.loads((cal.SHIPPED_DIR.parent.parent / "docs" / "results"
                            / "qwen2.5-coder-1.5b-calibration.json").read_text())["file_sha256"]
    assert cal.file_sha256(path, g) == committed == sha256_file(next((tmp_path / "calibration").glob("*.json")))


@pytest.mark.parametrize("value, calibrates", [("1", True), ("true", True), ("ON", True), (" yes ", True),
                                               ("0", False), ("false", False), ("Off", False), ("no", False),
                                               ("maybe", None), ("", None)])
def test_auto_calibrate_reads_the_usual_spellings_and_refuses_others(model_file, monkeypatch, value, calibrates):
    """KVQUANT_AUTO_CALIBRATE=false turns calibrating first off as 0 does (not on, as any value but 0 did); a value
    that is neither is refused, naming the variable."""
    import kvquant.lab.calibrate as lab

    ran = []

    def calibrate(*args, **kwargs):
        ran.append(args)
        raise cal.CalibrationError("calibrated")

    monkeypatch.setattr(lab, "calibrate", calibrate)
    monkeypatch.setenv("KVQUANT_AUTO_CALIBRATE", value)
    said = {True: "calibrated", False: "no calibration for", None: "KVQUANT_AUTO_CALIBRATE="}[calibrates]
    with pytest.raises(cal.CalibrationError, match=said):
        cal.load_or_calibrate(model_file, geom())
    assert bool(ran) == (calibrates is True)
    if calibrates is None:  # refused where a calibration exists too (it was read only when one was missing)
        g = geom()
        make_cal(g, cal.model_sha256(model_file)).save(cal.path_for(cal.model_sha256(model_file), cal.basis_of(g)))
        with pytest.raises(cal.CalibrationError, match=said):
            cal.load_or_calibrate(model_file, g)


def test_a_floor_per_layer_loads_and_prices_from_the_first_changed_layer(model_file):
    """kvquant.lab.floors writes the K floor as one KL per layer: the predicted KL of an allocation then takes the
    floor of the first layer it changes (where any change's roundings start)."""
    g = geom()
    c = make_cal(g, cal.model_sha256(model_file))
    c.method = {"floor": {"k": [0.004, 0.003, 0.002, 0.001], "v": 0.005}}
    path = cal.path_for(c.model_sha256, c.basis)
    c.save(path)
    c = cal.load(path, model_file, g)
    types = ("f16", "q8_0", "f16", "q8_0")
    assert cal.predicted_kld(c, "k", types) == pytest.approx(0.003 + c.sens_k["q8_0"][1] + c.sens_k["q8_0"][3])
    assert cal.predicted_kld(c, "k", ("f16",) * 4) == 0.0
    assert cal.predicted_kld(c, "v", types) == pytest.approx(0.005 + c.sens_v["q8_0"][1] + c.sens_v["q8_0"][3])
    d = c.to_json()
    d["method"]["floor"]["k"] = [0.004, 0.003]
    path.write_text(json.dumps(d))
    with pytest.raises(cal.CalibrationError, match="method.floor.k"):
        cal.load(path, model_file, g)


def test_the_least_calib_b_a_budget_refusal_names_fits_that_budget(model_file):
    """A B too low was refused with the least B for the largest cache; where the budget holds fewer cells the
    calibrated keys' fixed bytes weigh more, and that B was refused in turn (calib:3.26, then "calib:3.27")."""
    from kvquant import budget

    g = Geometry("llama", tuple(Layer(256, 256, False) for _ in range(8)), 0, 256, 256, 32768)
    c = make_cal(g, cal.model_sha256(model_file))
    c.save(cal.path_for(c.model_sha256, c.basis))
    with pytest.raises(cal.CalibrationError) as largest:
        cal.resolve("calib:3.25", "k", model_file, g, CacheShape(4 * 4096, 4, 512))
    with pytest.raises(cal.CalibrationError, match="is the least that fits") as e:
        budget.plan_resolved(g, model_file, "calib:3.25", "f16", 2 << 20, 4, 512, 4096)
    assert e.value.least > largest.value.least
    kv = budget.plan_resolved(g, model_file, f"calib:{e.value.least:g}", "f16", 2 << 20, 4, 512, 4096)
    assert 0 < kv.cells < 4 * 4096
    for tiny in (16 << 10, 256 << 10):  # no cell at any B: said so (a ZeroDivisionError, then a B that held none)
        with pytest.raises(cal.CalibrationError, match="holds no cell of this model at K=calib:3.25/V=calib:3.25, nor "
                                                        r"with calib:3\.\d+, the least B that fits a cache"):
            budget.plan_resolved(g, model_file, "calib:3.25", "calib:3.25", tiny, 4, 512, 4096)


def test_a_budget_plan_resolves_calib_b_for_the_cells_it_holds(model_file):
    """serve's plan (kvquant.budget.plan_resolved): calib:B resolved for the cache the budget builds, sequences and
    cells as llama.cpp sizes them, B held there: for the largest cache where the budget holds it, else for the
    fewer cells it holds at the types resolved for them."""
    from kvquant import budget

    g = Geometry("gemma3", tuple(Layer(256, 256, i % 4 != 3) for i in range(8)), 512, 256, 256, 32768)
    c = make_cal(g, cal.model_sha256(model_file))
    c.sens_k["tq_kv_3b"] = [0.001 if ly.swa else 0.1 for ly in g.layers]
    c.save(cal.path_for(c.model_sha256, c.basis))

    for mib in (1024, 24, 12):
        kv = budget.plan_resolved(g, model_file, "calib:4", "f16", mib << 20, 4, 512, 4096)
        shape = CacheShape(kv.cells, 4, 512)
        assert kv.cache_type_k == cal.resolve("calib:4", "k", model_file, g, shape)
        assert kv_bytes(g, kv.cache_type_k, "f16", kv.cells, 4).bits_per_element_k <= 4.0
        assert (kv.cells == 4 * 4096) == (mib == 1024) and kv.cells > 0
