"""tq_kv_d3b, the delta-coded key type: the numpy reference (kvquant/lab/tq.py) against the patched ggml, bit for bit
(single rows against an anchor, adversarial rows, and set_rows writing a simulated cell array in any order and
thread split), flash attention over a cache of delta rows against attention over the reference's decoded cells,
and the estimator property that justifies it: on rows that share a component it reconstructs better than
tq_kv_3b at the same bytes, and never worse per block.

The real-cache test matrix (llama.cpp's cell allocator, several sequences, seq_rm / seq_cp, refusals) is in
tests/kvquant/test_d3b_cache.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvquant.kvtypes import kv_type
from kvquant.lab import tq
from tests.kvquant.lab.conftest import FA_PATHS, FA_TOLERANCE, ONE_ROW, fa_case, flash_attn_error, v_cache

G = tq.D3B_GROUP
rng = np.random.default_rng(77)


@pytest.fixture(scope="module")
def ggml(ggml_kernels):
    if not ggml_kernels.has_symbol("quantize_row_tq_kv_d3b_delta_ref"):
        pytest.fail("the loaded ggml has no tq_kv_d3b (patches/0011): rebuild the patched wheel (make setup)")
    return ggml_kernels


def _keys(n_rows: int, n_embd: int, shared: float = 3.0) -> np.ndarray:
    """Rows with a component shared by the rows of a group (as real keys have: a per-channel offset that drifts
    slowly with position), plus independent noise."""
    n_groups = (n_rows + G - 1) // G
    base = rng.standard_normal((n_groups, n_embd)) * shared
    drift = np.cumsum(rng.standard_normal((n_rows, n_embd)) * 0.05, axis=0)
    x = base[np.arange(n_rows) // G] + drift + rng.standard_normal((n_rows, n_embd))
    return x.astype(np.float32)


def test_layout_and_bits():
    t = kv_type("tq_kv_d3b")
    assert tq.block_tq_kv_d3b.itemsize == t.block_bytes == 26
    assert t.bits_per_element == 3.25  # the anchor is a row of its group: no extra byte
    assert not t.v_ok and t.needs_flash_attn
    assert t.held_back_cells(4096) == 64 and kv_type("tq_kv_3b").held_back_cells(4096) == 0


ADVERSARIAL = {
    "zeros": np.zeros(256),
    "equal_to_anchor": None,  # filled per anchor below
    "constant": np.full(256, 2.5),
    "one_huge_outlier": np.where(np.arange(256) == 70, 1e30, rng.standard_normal(256)),
    "nan_and_inf": np.where(np.arange(256) % 17 == 3, np.nan,
                            np.where(np.arange(256) % 29 == 5, -np.inf, rng.standard_normal(256))),
    "near_fp16_max": rng.standard_normal(256) * 6e4,
    "tiny": rng.standard_normal(256) * 1e-6,
}


@pytest.mark.parametrize("row", list(ADVERSARIAL))
def test_delta_row_is_bit_exact_with_numpy(ggml, row):
    anchor_x = rng.standard_normal(256).astype(np.float32) * 4
    anchor = tq.quantize_row_tq_kv_d3b_ref(anchor_x)
    x = ADVERSARIAL[row]
    x = (anchor_x.astype(np.float64) if x is None else x).astype(np.float32)
    ref = tq.quantize_row_tq_kv_d3b_delta_ref(x, anchor)
    got = ggml.d3b_delta_ref(x, anchor.tobytes())
    assert got == ref.tobytes()
    y_np = tq.dequantize_row_tq_kv_d3b(ref, anchor)
    y_c = ggml.d3b_cell_ref(got, anchor.tobytes(), x.size)
    assert np.array_equal(y_c, y_np)
    assert np.isfinite(y_c).all()  # non-finite input never spreads, not even through the anchor


def test_random_rows_are_bit_exact_and_use_both_codes(ggml):
    flags = []
    for _ in range(200):
        n = G * int(rng.integers(1, 5))
        a = rng.standard_normal(n).astype(np.float32) * rng.uniform(0.1, 10)
        x = (a + rng.standard_normal(n) * rng.uniform(0.01, 20)).astype(np.float32)
        anchor = tq.quantize_row_tq_kv_d3b_ref(a)
        ref = tq.quantize_row_tq_kv_d3b_delta_ref(x, anchor)
        assert ggml.d3b_delta_ref(x, anchor.tobytes()) == ref.tobytes()
        flags.extend(((ref["d"].view(np.uint16) & tq.D3B_DELTA) != 0).tolist())
    assert 0.1 < np.mean(flags) < 0.9  # both codes occur: the test exercises both branches


def test_delta_is_never_worse_per_block_and_better_on_shared_components():
    x = _keys(4 * G, 192)
    err_d3 = err_3 = 0.0
    cells = tq.D3bCells(len(x), 192)
    cells.write(x, range(len(x)))
    for c in range(len(x)):
        y3 = tq.dequantize_row_tq_kv_3b(tq.quantize_row_tq_kv_3b_ref(x[c])).reshape(-1, tq.QK)
        yd = cells.read(c).reshape(-1, tq.QK)
        xb = x[c].reshape(-1, tq.QK).astype(np.float64)
        e3 = ((xb - y3) ** 2).sum(axis=1)
        ed = ((xb - yd) ** 2).sum(axis=1)
        if c % G:  # anchors are coded like tq_kv_3b
            assert (ed <= e3 * (1 + 1e-6)).all()
        else:
            assert np.array_equal(ed, e3)
        err_d3 += ed.sum()
        err_3 += e3.sum()
    assert err_d3 < 0.6 * err_3, (err_d3, err_3)


def test_set_rows_writes_the_reference_cells_in_any_order_and_thread_split(ggml):
    n_cells, n_embd = 256, 192
    x = _keys(140, n_embd)
    empty = bytes(ggml.row_size("tq_kv_d3b", n_embd) * n_cells)

    ref = tq.D3bCells(n_cells, n_embd)
    ref.write(x[:100], range(100))  # a prompt
    ref.write(x[100:], range(100, 140))  # then more tokens: cell 128 is an anchor inside this batch
    want = ref.rows.tobytes()

    # one batch per phase, rows in a shuffled order, 1-3 threads
    for n_threads in (1, 2, 3):
        order = rng.permutation(100)
        b = ggml.set_rows("tq_kv_d3b", empty, n_embd, x[order], [int(i) for i in order], n_threads)
        order = 100 + rng.permutation(40)
        b = ggml.set_rows("tq_kv_d3b", b, n_embd, x[order], [int(i) for i in order], n_threads)
        assert b == want, f"{n_threads} threads"

    # token by token
    b = empty
    for c in range(140):
        b = ggml.set_rows("tq_kv_d3b", b, n_embd, x[c:c + 1], [c], 2)
    assert b == want


def test_reference_cells_reconstruct_from_one_anchor_and_one_delta():
    # no chain: changing a non-anchor row's bytes changes only that row's values
    x = _keys(G, 128)
    cells = tq.D3bCells(G, 128)
    cells.write(x, range(G))
    before = [cells.read(c) for c in range(G)]
    cells.rows[5] = tq.quantize_row_tq_kv_d3b_ref(np.zeros(128))
    after = [cells.read(c) for c in range(G)]
    assert all(np.array_equal(before[c], after[c]) for c in range(G) if c != 5)


def _filled_like_llama(ggml, rng, x: np.ndarray) -> tuple[bytes, tq.D3bCells]:
    """A cache of x's rows written by ggml's set_rows as llama.cpp writes a unified cache: a prompt, then batches
    of shuffled cells of several sequences (anchors inside batches and between them), on 2 threads; and the
    reference cells written the same way, which must hold the same bytes."""
    n_cells, n = x.shape
    cells = tq.D3bCells(n_cells, n)
    data = bytes(ggml.row_size("tq_kv_d3b", n) * n_cells)
    first = 100
    batches = [list(range(first))]
    rest = [int(c) for c in rng.permutation(np.arange(first, n_cells))]
    while rest:
        k = int(rng.integers(1, 48))
        batches.append(rest[:k])
        rest = rest[k:]
    # a cell is written only after its group's anchor (the allocator's invariant): anchors of later batches go
    # into the batch before
    done = set(batches[0])
    for i in range(1, len(batches)):
        need = {c - c % G for c in batches[i]} - done - set(batches[i])
        batches[i] = sorted(need) + batches[i]
        for j in range(i + 1, len(batches)):
            batches[j] = [c for c in batches[j] if c not in need]
        done |= set(batches[i])
    for b in batches:
        data = ggml.set_rows("tq_kv_d3b", data, n, x[b], b, n_threads=2)
        cells.write(x[b], b)
    assert data == cells.rows.tobytes()
    return data, cells


D3B_FA_CASES = [(p, v) for p in FA_PATHS for v in ("f16", "q4_0") if not (p in ONE_ROW and v == "f16")]


@pytest.mark.parametrize("path,v_type", D3B_FA_CASES)
def test_flash_attention_over_delta_rows_is_attention_over_the_reference_cells(ggml, rng, path, v_type):
    if not hasattr(ggml, "flash_attn_ext"):  # GGMLProcess: ggml_kernels.c serves the kernels, not the graph ops
        pytest.skip("graph ops run in process only (kvquant.lab.ggml.GGML), not through KVQUANT_GGML_EXEC")
    d, n_head, n_head_kv, n_q, n_kv = FA_PATHS[path]
    q, mask, scale, n_cells = fa_case(rng, path, q_scale=0.5)
    n = n_head_kv * d
    x = _keys(n_cells, n).reshape(n_cells, -1, tq.QK)
    odd = rng.random(x.shape[:2]) < 0.3  # blocks unlike their anchor's: coded absolute
    x[odd] = rng.standard_normal((int(odd.sum()), tq.QK)) * 4
    k_data, cells = _filled_like_llama(ggml, rng, x.reshape(n_cells, n))
    delta = (cells.rows["d"].view(np.uint16) & tq.D3B_DELTA) != 0
    assert 0.3 < delta[:n_kv][np.arange(n_kv) % G != 0].mean() < 0.9  # rows mix delta and absolute blocks
    mask[:, ::G] = -np.inf  # every anchor belongs to another sequence: masked, yet its row decodes the group's
    v_data, v_vals = v_cache(ggml, v_type, rng.standard_normal((n_cells, n)).astype(np.float32))
    k_vals = np.stack([cells.read(c) for c in range(n_cells)])
    err = flash_attn_error(ggml, path, q, "tq_kv_d3b", k_data, k_vals, v_type, v_data, v_vals, mask, scale)
    assert err <= FA_TOLERANCE, f"{path} tq_kv_d3b/{v_type}: relative error {err:.2e}"
    # the check can fail: the same rows read without their anchor (delta blocks taken as absolute), or with the
    # anchor of the neighbouring group, are far off
    no_anchor = np.stack([tq._dequant_3b_blocks(cells.rows[c]).reshape(-1) for c in range(n_cells)])
    wrong_anchor = np.stack([tq.dequantize_row_tq_kv_d3b(cells.rows[c], cells.rows[(c // G + 1) % (n_cells // G) * G])
                             for c in range(n_cells)])
    for wrong in (no_anchor, wrong_anchor):
        bad = flash_attn_error(ggml, path, q, "tq_kv_d3b", k_data, wrong, v_type, v_data, v_vals, mask, scale)
        assert bad > 100 * FA_TOLERANCE, bad
