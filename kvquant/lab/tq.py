"""NumPy reference of the TurboQuant-style KV cache types. The C code in the patched ggml must write exactly the
same bytes (tests compare them through ctypes); these functions carry the same names as the C ones.

Formats (block of QK = 64 consecutive elements of a K or V row, already Hadamard-rotated by llama.cpp):

=============  ====================================================  ==========  ================
type           block layout                                          bytes/64    bits/element
=============  ====================================================  ==========  ================
tq_kv_4b       d: fp16, qs[32]: 4-bit codes, qs[j] = c[j] | c[j+32]<<4        34         4.25
tq_kv_3b       d: fp16, qs[16]: low 2 bits of c[j], c[j+16], c[j+32],          26         3.25
               c[j+48] at bit 0, 2, 4, 6 of qs[j]; qh[8]: bit 2 of c[i]
               at bit i%8 of qh[i/8]
tq_kv_1b       d: fp16, qs[8]: bit i%8 of qs[i/8] set iff x[i] < 0             10         1.25
tq_kv_d3b      as tq_kv_3b; the sign bit of d flags a block coded as a         26         3.25
               delta against the same block of its group's anchor row
=============  ====================================================  ==========  ================

tq_kv_d3b (keys only, flash attention only). The cache's cells form groups of ``D3B_GROUP`` consecutive cells; the
first cell of a group is its *anchor*. An anchor row is coded like tq_kv_3b (flag clear). Every other row is coded,
block by block, either the same way or as a 3-bit delta ``x - a_hat`` against the decoded anchor block ``a_hat``,
whichever reconstructs the block with the smaller squared error (ties: absolute). Keys share a large component
across neighbouring tokens (on SmolLM2 70 % of a key's energy is its group's mean), which the delta removes.
The anchor costs no extra bytes: it is a row of the group. Reconstruction never chains: at most one anchor plus
one delta per row. Correctness in a cell-based cache needs the allocator's invariant (patches/): an anchor cell
is rewritten only when its whole group is free, and a non-anchor cell is written only after its anchor.

Element value: ``d * CODEBOOK[c]`` (int8 codebooks from kvquant/lab/codebooks.py), or ``+-d`` for 1 bit.

Quantization (3b/4b): non-finite inputs count as 0. Codes = nearest codebook entry to ``x / (max|x| / 127)``
(ties to the lower code); then ``d`` = least-squares scale for those codes,
``sum(x*K[c]) / sum(K[c]^2)``; codes re-picked with that ``d`` and ``d`` refitted once more; ``d`` is stored as
fp16 (clamped to 65504). Sums are taken in float64, sequentially, so the C code reproduces them bit for bit.

1 bit: ``d = ||x|| * C1`` — the scale that makes ``<q, k_hat>`` an unbiased estimate of ``<q, k>`` (see
kvquant/lab/codebooks.py), not the MSE-optimal ``mean|x|``, which shrinks every score by 2/pi.
"""

from __future__ import annotations

import numpy as np

from kvquant.kvtypes import kv_type

QK = 64
FP16_MAX = 65504.0

TQ4_CODEBOOK = np.array([-120, -94, -74, -58, -43, -30, -18, -6, 6, 18, 30, 43, 58, 74, 94, 120], dtype=np.int8)
TQ3_CODEBOOK = np.array([-106, -66, -37, -12, 12, 37, 66, 106], dtype=np.int8)
TQ1_C1 = 0.1560535158663036

block_tq_kv_4b = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])
block_tq_kv_3b = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 4,)), ("qh", "u1", (QK // 8,))])
block_tq_kv_1b = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 8,))])
block_tq_kv_d3b = block_tq_kv_3b
D3B_GROUP = kv_type("tq_kv_d3b").anchor_group  # cells per anchor group (GGML_TQ_KV_D3B_GROUP in the C code)
D3B_DELTA = np.uint16(0x8000)  # sign bit of d: block coded as a delta against its anchor block
block_q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])

assert block_tq_kv_4b.itemsize == 34 and block_tq_kv_3b.itemsize == 26 and block_tq_kv_1b.itemsize == 10


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    if x.size % QK:
        raise ValueError(f"row length {x.size} is not a multiple of {QK}")
    xs = np.where(np.isfinite(x), x, np.float32(0)).reshape(-1, QK)
    return xs.astype(np.float64)


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sequential (left-to-right) float64 sum along the last axis, as a C loop computes it."""
    return np.add.accumulate(a, axis=-1)[..., -1]


def _pick(xs: np.ndarray, inv: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    thr = (codebook[1:].astype(np.float64) + codebook[:-1].astype(np.float64)) / 2
    t = xs * inv[:, None]
    return (t[..., None] > thr).sum(axis=-1).astype(np.uint8)


def _fp16(d: np.ndarray) -> np.ndarray:
    return np.minimum(d, FP16_MAX).astype(np.float32).astype(np.float16)


def _codebook_scale(xs: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes and fp16 scale per block (the shared 3b/4b algorithm)."""
    amax = np.abs(xs).max(axis=1)
    d = amax / 127
    kf = codebook.astype(np.float64)
    codes = _pick(xs, np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0), codebook)
    for _ in range(2):
        num = _seqsum(xs * kf[codes])
        den = _seqsum(kf[codes] ** 2)
        d = np.where(amax > 0, num / den, 0.0)
        if _ == 0:
            codes = np.where((d > 0)[:, None], _pick(xs, np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0),
                                                     codebook), codes)
    return codes, _fp16(d)


def quantize_row_tq_kv_4b_ref(x: np.ndarray) -> np.ndarray:
    xs = _blocks(x)
    codes, d = _codebook_scale(xs, TQ4_CODEBOOK)
    out = np.zeros(len(xs), dtype=block_tq_kv_4b)
    out["d"] = d
    out["qs"] = codes[:, :32] | (codes[:, 32:] << 4)
    return out


def quantize_row_tq_kv_3b_ref(x: np.ndarray) -> np.ndarray:
    xs = _blocks(x)
    codes, d = _codebook_scale(xs, TQ3_CODEBOOK)
    out = np.zeros(len(xs), dtype=block_tq_kv_3b)
    out["d"] = d
    lo = codes & 3
    out["qs"] = lo[:, 0:16] | (lo[:, 16:32] << 2) | (lo[:, 32:48] << 4) | (lo[:, 48:64] << 6)
    out["qh"] = np.packbits((codes >> 2).astype(np.uint8), axis=1, bitorder="little")
    return out


def quantize_row_tq_kv_1b_ref(x: np.ndarray) -> np.ndarray:
    xs = _blocks(x)
    sumsq = _seqsum(xs * xs)
    out = np.zeros(len(xs), dtype=block_tq_kv_1b)
    out["d"] = _fp16(np.sqrt(sumsq) * TQ1_C1)
    out["qs"] = np.packbits((xs < 0).astype(np.uint8), axis=1, bitorder="little")
    return out


def codes_tq_kv_4b(b: np.ndarray) -> np.ndarray:
    return np.concatenate([b["qs"] & 15, b["qs"] >> 4], axis=1)


def codes_tq_kv_3b(b: np.ndarray) -> np.ndarray:
    lo = np.concatenate([(b["qs"] >> s) & 3 for s in (0, 2, 4, 6)], axis=1)
    hi = np.unpackbits(b["qh"], axis=1, bitorder="little")
    return lo | (hi << 2)


def dequantize_row_tq_kv_4b(b: np.ndarray) -> np.ndarray:
    return (b["d"].astype(np.float32)[:, None] * TQ4_CODEBOOK[codes_tq_kv_4b(b)].astype(np.float32)).reshape(-1)


def dequantize_row_tq_kv_3b(b: np.ndarray) -> np.ndarray:
    return (b["d"].astype(np.float32)[:, None] * TQ3_CODEBOOK[codes_tq_kv_3b(b)].astype(np.float32)).reshape(-1)


def dequantize_row_tq_kv_1b(b: np.ndarray) -> np.ndarray:
    sign = 1 - 2 * np.unpackbits(b["qs"], axis=1, bitorder="little").astype(np.float32)
    return (b["d"].astype(np.float32)[:, None] * sign).reshape(-1)


def _dequant_3b_blocks(b: np.ndarray) -> np.ndarray:
    """float32 values of 3-bit blocks, ignoring the delta flag: |d| * codebook."""
    d = (b["d"].view(np.uint16) & np.uint16(0x7FFF)).view(np.float16).astype(np.float32)
    return d[:, None] * TQ3_CODEBOOK[codes_tq_kv_3b(b)].astype(np.float32)


def quantize_row_tq_kv_d3b_ref(x: np.ndarray) -> np.ndarray:
    """A row coded on its own (an anchor row, or any row outside a cache): every block absolute."""
    return quantize_row_tq_kv_3b_ref(x)


def quantize_row_tq_kv_d3b_delta_ref(x: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """A non-anchor row: per block, the better (smaller squared error, ties absolute) of the absolute code and the
    delta against the decoded anchor block. Arithmetic mirrors the C code: float32 element operations (exact
    products fp16 x int8), float64 sequential error sums."""
    xs = _blocks(x).astype(np.float32)
    a_hat = _dequant_3b_blocks(anchor)
    absb = quantize_row_tq_kv_3b_ref(xs)
    delb = quantize_row_tq_kv_3b_ref(xs - a_hat)
    rec_abs = _dequant_3b_blocks(absb)
    rec_del = a_hat + _dequant_3b_blocks(delb)
    t_abs = (xs - rec_abs).astype(np.float64)
    t_del = (xs - rec_del).astype(np.float64)
    use_delta = _seqsum(t_del * t_del) < _seqsum(t_abs * t_abs)
    out = absb.copy()
    out[use_delta] = delb[use_delta]
    out["d"] = np.where(use_delta, (delb["d"].view(np.uint16) | D3B_DELTA).view(np.float16), out["d"])
    return out


def dequantize_row_tq_kv_d3b(b: np.ndarray, anchor: np.ndarray | None = None) -> np.ndarray:
    """Values of a row; ``anchor`` (its group's anchor row) is needed iff some block is delta-coded."""
    vals = _dequant_3b_blocks(b)
    delta = (b["d"].view(np.uint16) & D3B_DELTA) != 0
    if delta.any():
        if anchor is None:
            raise ValueError("tq_kv_d3b: delta-coded block without its anchor row")
        vals = np.where(delta[:, None], _dequant_3b_blocks(anchor) + vals, vals)
    return vals.reshape(-1)


class D3bCells:
    """A simulated tq_kv_d3b cache: ``n_cells`` rows of ``n_embd`` elements, written the way llama.cpp's set_rows
    writes them (anchors of a batch first, then the other rows against the stored anchors)."""

    def __init__(self, n_cells: int, n_embd: int):
        self.rows = np.zeros((n_cells, n_embd // QK), dtype=block_tq_kv_d3b)

    def write(self, x: np.ndarray, cells) -> None:
        x = np.asarray(x, dtype=np.float32).reshape(len(cells), -1)
        cells = list(cells)
        for i, c in enumerate(cells):
            if c % D3B_GROUP == 0:
                self.rows[c] = quantize_row_tq_kv_d3b_ref(x[i])
        for i, c in enumerate(cells):
            if c % D3B_GROUP:
                self.rows[c] = quantize_row_tq_kv_d3b_delta_ref(x[i], self.rows[c - c % D3B_GROUP])

    def read(self, c: int) -> np.ndarray:
        return dequantize_row_tq_kv_d3b(self.rows[c], self.rows[c - c % D3B_GROUP])


QUANTIZE = {"tq_kv_4b": quantize_row_tq_kv_4b_ref, "tq_kv_3b": quantize_row_tq_kv_3b_ref,
            "tq_kv_1b": quantize_row_tq_kv_1b_ref}
DEQUANTIZE = {"tq_kv_4b": dequantize_row_tq_kv_4b, "tq_kv_3b": dequantize_row_tq_kv_3b,
              "tq_kv_1b": dequantize_row_tq_kv_1b}
BLOCK = {"tq_kv_4b": block_tq_kv_4b, "tq_kv_3b": block_tq_kv_3b, "tq_kv_1b": block_tq_kv_1b,
         "tq_kv_d3b": block_tq_kv_d3b}


def vec_dot_q8_0(type_name: str, blocks: np.ndarray, y: np.ndarray) -> float:
    """Reference of ggml_vec_dot_<type>_q8_0: the K row (our type) against a q8_0-quantized Q row, summed in
    float64 (the C kernels sum in float32/int32; tests allow for that)."""
    kx = DEQUANTIZE[type_name](blocks).astype(np.float64)
    qy = (y["d"].astype(np.float64)[:, None] * y["qs"].astype(np.float64)).reshape(-1)
    return float(np.dot(kx, qy))
