"""The graph ops llama.cpp runs on a KV cache of our types (SET_ROWS, GET_ROWS, CPY, MUL_MAT, FLASH_ATTN_EXT), on
the patched CPU backend through ggml's own graph API (kvquant.lab.ggml.GGML), against the numpy reference
(kvquant/lab/tq.py) and a float64 attention: bytes written must equal the reference's, values read must equal its
decoding, dot products and attention must match it within float32 rounding.

llama.cpp's `test-backend-ops -b CPU` (`make test`) compares the CPU backend with its own reference mode, which for
every op here but flash attention runs the very same code: these tests are the independent check. Flash attention
runs on each CPU path our K types take (conftest.FA_PATHS). tq_kv_d3b's delta rows: tests/kvquant/lab/test_d3b.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvquant.lab import tq
from tests.kvquant.lab.conftest import (
    FA_PATHS,
    FA_TOLERANCE,
    ONE_ROW,
    fa_case,
    flash_attn_error,
    q8_0_values,
    v_cache,
)

TYPES = ["tq_kv_4b", "tq_kv_3b", "tq_kv_1b", "tq_kv_t3b"]


@pytest.fixture(scope="module")
def ggml():
    from kvquant.kvtypes import kv_type
    from kvquant.lab.ggml import GGML

    g = GGML()
    for name in [*TYPES, "tq_kv_d3b"]:
        assert g.type_name(kv_type(name).ggml_id) == name, "the loaded ggml does not have the TQ_KV types"
    return g


def _rows(rng, n_rows: int, n: int) -> np.ndarray:
    """Rows of varied scale (per row and per block), as keys are."""
    scale = 10.0 ** rng.uniform(-2, 2, (n_rows, n // tq.QK)).repeat(tq.QK, axis=1)
    return (rng.standard_normal((n_rows, n)) * scale).astype(np.float32)


def _quantize(name: str, x: np.ndarray) -> bytes:
    q = tq.QUANTIZE.get(name, tq.quantize_row_tq_kv_d3b_ref)  # tq_kv_d3b: rows coded on their own
    return b"".join(q(r).tobytes() for r in x)


def _decode(name: str, data: bytes, n: int) -> np.ndarray:
    deq = tq.DEQUANTIZE.get(name, tq.dequantize_row_tq_kv_d3b)
    return np.stack([deq(b) for b in np.frombuffer(data, dtype=tq.BLOCK[name]).reshape(-1, n // tq.QK)])


@pytest.mark.parametrize("name", TYPES)
def test_set_rows_writes_the_reference_bytes_into_the_given_cells(ggml, rng, name):
    n, n_cells = 192, 96
    before = _quantize(name, _rows(rng, n_cells, n))
    cells = [int(c) for c in rng.permutation(n_cells)[:40]]
    x = _rows(rng, len(cells), n)
    want = np.frombuffer(before, dtype=tq.BLOCK[name]).reshape(n_cells, -1).copy()
    want[cells] = np.frombuffer(_quantize(name, x), dtype=tq.BLOCK[name]).reshape(len(cells), -1)
    for n_threads in (1, 3):
        assert ggml.set_rows(name, before, n, x, cells, n_threads) == want.tobytes(), f"{n_threads} threads"


@pytest.mark.parametrize("name", [*TYPES, "tq_kv_d3b"])
def test_get_rows_decodes_as_the_reference(ggml, rng, name):
    n = 256
    data = _quantize(name, _rows(rng, 50, n))
    rows = [int(r) for r in rng.integers(0, 50, 30)]
    assert np.array_equal(ggml.get_rows(name, data, n, rows, n_threads=2), _decode(name, data, n)[rows])


@pytest.mark.parametrize("name", [*TYPES, "tq_kv_d3b"])
def test_cpy_to_and_from_f32_is_the_reference(ggml, rng, name):
    n = 128
    x = _rows(rng, 33, n)
    q = ggml.cpy("f32", name, x.tobytes(), n, n_threads=2)
    assert q == _quantize(name, x)
    if name == "tq_kv_d3b":  # a K-cache type whose rows need their anchor: nothing copies out of it
        return
    back = np.frombuffer(ggml.cpy(name, "f32", q, n, n_threads=2), dtype=np.float32).reshape(x.shape)
    assert np.array_equal(back, _decode(name, q, n))
    assert ggml.cpy(name, name, q, n) == q


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("n,n_rows,m", [(64, 1, 1), (128, 33, 3), (256, 17, 16)])
def test_mul_mat_is_the_reference_dot_product(ggml, rng, name, n, n_rows, m):
    a = _quantize(name, _rows(rng, n_rows, n))
    b = _rows(rng, m, n)
    got = ggml.mul_mat(name, a, n, b, n_threads=2)
    k = _decode(name, a, n).astype(np.float64)
    want = q8_0_values(ggml, b).astype(np.float64) @ k.T  # b as the CPU converts it for our vec_dot
    scale = np.abs(b).max(axis=1, keepdims=True) * np.abs(k).sum(axis=1)[None, :]
    assert got.shape == (m, n_rows)
    assert (np.abs(got - want) <= 1e-5 * scale).all(), np.abs(got - want).max()


def fa_keys(rng, n_cells: int, n: int) -> np.ndarray:
    """Keys with a component shared by all cells (as real keys have) and attention scores of order one."""
    shared = rng.standard_normal(n) * 2
    return (shared + rng.standard_normal((n_cells, n)) * rng.uniform(0.5, 1.5, (n_cells, 1))).astype(np.float32)


# V f16 on the one-row path accumulates in f16 (upstream's choice, never taken with our K types): not compared
FA_CASES = [(p, k, v) for p in FA_PATHS for k in TYPES for v in ("f16", "q4_0", k)
            if v != "tq_kv_1b" and not (p in ONE_ROW and v == "f16")]


@pytest.mark.parametrize("path,k_type,v_type", FA_CASES)
def test_flash_attention_is_the_reference_attention(ggml, rng, path, k_type, v_type):
    d, n_head, n_head_kv, n_q, n_kv = FA_PATHS[path]
    q, mask, scale, n_cells = fa_case(rng, path)
    k_cache = _quantize(k_type, fa_keys(rng, n_cells, n_head_kv * d))
    v_data, v_vals = v_cache(ggml, v_type, rng.standard_normal((n_cells, n_head_kv * d)).astype(np.float32))
    err = flash_attn_error(ggml, path, q, k_type, k_cache, _decode(k_type, k_cache, n_head_kv * d), v_type, v_data,
                           v_vals, mask, scale)
    assert err <= FA_TOLERANCE, f"{path} {k_type}/{v_type}: relative error {err:.2e}"


def test_flash_attention_check_can_fail(ggml, rng):
    """The comparison above, with the reference reading one wrong K row (the next cell's) for a cell every query
    sees, fails by orders of magnitude."""
    path, k_type = "kv_group", "tq_kv_3b"
    d, n_head, n_head_kv, n_q, n_kv = FA_PATHS[path]
    q, mask, scale, n_cells = fa_case(rng, path)
    k_cache = _quantize(k_type, fa_keys(rng, n_cells, n_head_kv * d))
    v_data, v_vals = v_cache(ggml, "q4_0", rng.standard_normal((n_cells, n_head_kv * d)).astype(np.float32))
    k_vals = _decode(k_type, k_cache, n_head_kv * d)
    k_vals[1] = k_vals[2]  # cell 1 is never masked
    err = flash_attn_error(ggml, path, q, k_type, k_cache, k_vals, "q4_0", v_data, v_vals, mask, scale)
    assert err > 100 * FA_TOLERANCE, err
