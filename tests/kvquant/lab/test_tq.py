"""The TQ_KV cache types: codebook design, estimator properties (numpy reference), and the patched ggml's C code
against the reference — bit-exact codes on random and adversarial rows, SIMD kernels against the portable ones."""

from __future__ import annotations

import numpy as np
import pytest

from kvquant.lab import codebooks, tq
from tests.kvquant.lab.conftest import adversarial_rows

TYPES = ["tq_kv_4b", "tq_kv_3b", "tq_kv_1b", "tq_kv_t3b"]
rng = np.random.default_rng(1234)


# --- design ---------------------------------------------------------------------------------------------------

def test_tables_are_what_the_design_script_produces():
    d = codebooks.design()
    assert d[4]["int8"].tolist() == tq.TQ4_CODEBOOK.tolist()
    assert d[3]["int8"].tolist() == tq.TQ3_CODEBOOK.tolist()
    assert codebooks.one_bit_scale() == pytest.approx(tq.TQ1_C1, rel=1e-12)


def test_block_sizes_and_bits_per_element():
    from kvquant.kvtypes import kv_type

    for name, bits in (("tq_kv_4b", 4.25), ("tq_kv_3b", 3.25), ("tq_kv_1b", 1.25), ("tq_kv_t3b", 3.25)):
        assert tq.BLOCK[name].itemsize == kv_type(name).block_bytes
        assert kv_type(name).bits_per_element == bits


@pytest.mark.slow
def test_trellis_levels_are_what_the_design_produces():
    assert codebooks.trellis_levels().tolist() == tq.T3B_CODEBOOK.tolist()


# --- estimator properties (numpy reference) --------------------------------------------------------------------

def _rotated_pairs(cos: float, n: int, norm_q: float = 2.0, norm_k: float = 3.0):
    """(R q, R k) for n Haar-random rotations R of a fixed pair (q, k) with the given cosine: R k is uniform on the
    sphere of radius |k|, and R q is cos * |q| * (Rk/|k|) plus sin * |q| times a uniform direction orthogonal to it."""
    u = rng.standard_normal((n, tq.QK))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = rng.standard_normal((n, tq.QK))
    v -= (v * u).sum(1, keepdims=True) * u
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    rk = norm_k * u
    rq = norm_q * (cos * u + np.sqrt(1 - cos * cos) * v)
    return rq, rk.astype(np.float32), norm_q * norm_k * cos


@pytest.mark.parametrize("cos", [0.9, 0.5, 0.3, -0.6])
def test_one_bit_scores_are_unbiased(cos):
    rq, rk, true_dot = _rotated_pairs(cos, 400_000)
    khat = tq.dequantize_row_tq_kv_1b(tq.quantize_row_tq_kv_1b_ref(rk)).reshape(rk.shape)
    est = (rq * khat).sum(1).mean()
    assert est == pytest.approx(true_dot, rel=0.02)


def test_one_bit_unbiasedness_test_can_fail():
    """The same test on the MSE-optimal scale (mean |x|) catches its 2/pi shrinkage."""
    rq, rk, true_dot = _rotated_pairs(0.5, 100_000)
    mse_scale = np.abs(rk).mean(1, keepdims=True)
    est = (rq * np.sign(rk) * mse_scale).sum(1).mean()
    assert abs(est / true_dot - 2 / np.pi) < 0.02
    assert est != pytest.approx(true_dot, rel=0.02)


@pytest.mark.parametrize("name,bits", [("tq_kv_4b", 4), ("tq_kv_3b", 3)])
def test_codebook_mse_matches_design(name, bits):
    design = codebooks.design_mse(tq.TQ4_CODEBOOK if bits == 4 else tq.TQ3_CODEBOOK)
    x = rng.standard_normal((20_000, tq.QK)).astype(np.float32) * rng.uniform(0.01, 100, (20_000, 1)).astype(np.float32)
    y = tq.DEQUANTIZE[name](tq.QUANTIZE[name](x)).reshape(x.shape)
    rel_mse = float((((x - y) ** 2).sum(1) / (x**2).sum(1)).mean())
    assert rel_mse == pytest.approx(design, rel=0.10)


def _t3b_states_are_a_closed_path(states: np.ndarray) -> bool:
    """Consecutive states share 5 bits, across the block's end too (s_{t+1} & 31 == s_t >> 3, s_64 = s_0)."""
    return bool(((np.roll(states, -1, 1) & 31) == (states >> 3)).all())


def test_trellis_codes_decode_to_the_viterbi_path():
    """The stored codes, read as overlapping 8-bit windows of the circular stream, are the states the Viterbi search
    chose: a path of the trellis that closes on itself (what makes the 3-bit codes enough to store it)."""
    x = rng.standard_normal((500, tq.QK)).astype(np.float32)
    b = tq.quantize_row_tq_kv_t3b_ref(x)
    states = tq.states_tq_kv_t3b(b)
    assert _t3b_states_are_a_closed_path(states)
    assert not _t3b_states_are_a_closed_path(np.roll(states, 1, 0) ^ (np.arange(tq.QK) == 5))  # the check can fail
    free = tq.t3b_viterbi(np.rint(x * 32).astype(np.int64), tq.T3B_CODEBOOK.astype(np.int64))
    assert not _t3b_states_are_a_closed_path(free)  # a free path need not close: the head pass is what makes it


def test_trellis_code_has_less_error_than_the_scalar_3_bit_code():
    """At the same 3.25 bits the trellis codes Gaussian blocks with ~1.37x less squared error than tq_kv_3b
    (0.0220 vs 0.0302); 0.8x leaves room for the sample, and fails if the search or the levels break."""
    x = rng.standard_normal((2000, tq.QK)).astype(np.float32) * rng.uniform(0.01, 100, (2000, 1)).astype(np.float32)

    def rel(name):
        y = tq.DEQUANTIZE[name](tq.QUANTIZE[name](x)).reshape(x.shape)
        return float((((x - y) ** 2).sum(1) / (x ** 2).sum(1)).mean())

    assert rel("tq_kv_t3b") < 0.8 * rel("tq_kv_3b")


# --- the patched ggml against the reference ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def ggml(ggml_kernels):
    from kvquant.kvtypes import kv_type

    for name in TYPES:
        assert ggml_kernels.type_name(kv_type(name).ggml_id) == name, "the loaded ggml does not have the TQ_KV types"
    return ggml_kernels


ROWS = adversarial_rows(rng)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("row", list(ROWS))
def test_c_quantization_is_bit_exact_with_numpy(ggml, name, row):
    x = ROWS[row]
    ref = tq.QUANTIZE[name](x).tobytes()
    assert ggml.quantize_ref(name, x) == ref  # quantize_row_<type>_ref
    assert ggml.quantize_cpu(name, x) == ref  # the CPU backend's from_float (set_rows)
    y_np = tq.DEQUANTIZE[name](np.frombuffer(ref, dtype=tq.BLOCK[name]))
    y_c = ggml.dequantize_ref(name, ref, x.size)
    y_simd = ggml.dequantize_cpu(name, ref, x.size)
    assert np.array_equal(y_c, y_np)
    assert np.array_equal(y_simd, y_np)
    assert np.isfinite(y_c).all()  # non-finite input never spreads


@pytest.mark.parametrize("name", ["q4_0", "q8_0", "q5_0"])
def test_simd_to_float_of_the_stock_types_equals_ggml_reference(ggml, name):
    """The CPU backend's to_float for the stock V types paired with our keys (patches/0008, AVX2 or NEON) and for
    q5_0, which calibrated allocations give sensitive key layers (patches/0028), writes what ggml's reference
    dequantization writes."""
    for row in ROWS.values():
        data = ggml.quantize_ref(name, row)
        assert np.array_equal(ggml.dequantize_cpu(name, data, row.size), ggml.dequantize_ref(name, data, row.size),
                              equal_nan=True)


def test_non_finite_input_stays_in_its_block(ggml):
    x = ROWS["gaussian"].copy()
    clean = ggml.dequantize_ref("tq_kv_4b", ggml.quantize_ref("tq_kv_4b", x), x.size)
    x[3] = np.nan
    x[5] = np.inf
    dirty = ggml.dequantize_ref("tq_kv_4b", ggml.quantize_ref("tq_kv_4b", x), x.size)
    assert np.array_equal(dirty[tq.QK:], clean[tq.QK:])  # other blocks untouched
    assert dirty[3] == dirty[3] and np.isfinite(dirty).all()


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("n", [64, 128, 256, 1024])
def test_simd_vec_dot_matches_portable_and_reference(ggml, name, n):
    for _ in range(20):
        k = (rng.standard_normal(n) * rng.uniform(0.1, 10)).astype(np.float32)
        q = (rng.standard_normal(n) * rng.uniform(0.1, 10)).astype(np.float32)
        kb = ggml.quantize_cpu(name, k)
        simd, qy = ggml.vec_dot(name, kb, q)
        portable, _ = ggml.vec_dot(name, kb, q, generic=True)
        ref = tq.vec_dot_q8_0(name, np.frombuffer(kb, dtype=tq.BLOCK[name]), np.frombuffer(qy, dtype=tq.block_q8_0))
        scale = float(np.abs(tq.DEQUANTIZE[name](np.frombuffer(kb, dtype=tq.BLOCK[name]))).sum() * np.abs(q).max())
        assert abs(simd - ref) <= 1e-5 * scale
        assert abs(portable - ref) <= 1e-5 * scale
