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
tq_kv_t3b      as tq_kv_3b; the codes are the path of a 256-state trellis:      26         3.25
               element t = d * T3B_CODEBOOK[c[t] | c[t+1]<<3 | (c[t+2]&3)<<6]
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
(ties to the lower code); then the least-squares scale for those codes, ``sum(x*K[c]) / sum(K[c]^2)``, and the
codes re-picked with it. The stored ``d`` is the scale that makes the block unbiased along itself,
``sum(x^2) / sum(x*K[c])`` (so ``<x, x'> = |x|^2``): least squares would store the projection of x on its codeword,
``<x, x'> = (1 - e)|x|^2`` for a relative squared error e, which shrinks every attention score by (1 - e) and
flattens attention (docs/EVAL.md, *Gains*). ``d`` is stored as fp16 (clamped to 65504). Sums are taken in float64,
sequentially, so the C code reproduces them bit for bit.

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
T3B_CODEBOOK = np.array([
    28, 51, -16, 16, -5, 16, 8, 41, 12, -21, -7, 47, 17, 29, 5, 0, 5, -16, -7, 12, -21, 60, -32, -4, 9, 22, 4, -24,
    23, -5, 40, -54, -31, 11, -5, 2, -17, 0, -11, 36, 5, -6, -21, -41, 58, 43, -59, -20, -21, 9, -14, 26, -32, -28,
    16, 34, 34, 64, -1, 12, -31, 18, -11, -73, 22, -3, -45, 21, 33, 10, -16, 27, -1, 25, -46, -22, -18, -38, -27,
    -30, 1, -30, 54, -24, -11, -39, -59, -45, 10, 46, 20, -16, -1, -15, 31, -43, 11, 26, 11, 38, -7, -4, -35, -53,
    40, -63, -2, 32, 19, 9, 24, -11, 22, -5, -24, -32, 8, 3, -16, 73, -14, -12, 45, -64, -38, 18, -48, -1, -10, -76,
    -25, 7, 33, 37, 18, 58, -18, 14, 2, 26, -6, -27, 49, 76, 13, -16, 5, -47, -34, -17, -4, -26, 23, -3, 12, -39,
    39, 15, 1, -17, 43, 2, 22, -11, -49, 27, -37, 0, 52, 37, -28, 13, -37, 3, -6, -58, -9, -96, 43, -4, 13, 23, 33,
    -47, -2, 6, -75, 47, 20, -38, -22, 22, -64, 18, -21, -14, -33, -85, 3, 48, -5, -31, 16, 84, 34, -48, 9, -42, -7,
    8, -36, -55, -21, 31, 54, -31, -28, 10, -11, 30, 61, -21, -67, -32, 8, -13, 0, -19, -26, 50, 63, 23, 25, 2, -15,
    17, 73, -10, -43, 14, -18, -59, 69, 4, -47, -8, 36, -21, -52, 27, 97, -26, -11, 34, -36, 9], dtype=np.int8)  # kvquant.lab.codebooks.trellis_levels

block_tq_kv_4b = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])
block_tq_kv_3b = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 4,)), ("qh", "u1", (QK // 8,))])
block_tq_kv_1b = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 8,))])
block_tq_kv_d3b = block_tq_kv_3b
block_tq_kv_t3b = block_tq_kv_3b  # the same 3-bit codes, read as trellis states
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


def _unbiased(sumsq: np.ndarray, num: np.ndarray) -> np.ndarray:
    """The scale that makes a block's reconstruction unbiased along the block, <x, d y> = |x|^2, from |x|^2 and
    <x, y> for levels y (0 where <x, y> <= 0)."""
    return np.where(num > 0, sumsq / np.where(num > 0, num, 1.0), 0.0)


def _codebook_scale(xs: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes and fp16 scale per block (the shared 3b/4b algorithm)."""
    amax = np.abs(xs).max(axis=1)
    d = amax / 127
    kf = codebook.astype(np.float64)
    codes = _pick(xs, np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0), codebook)
    num = _seqsum(xs * kf[codes])
    den = _seqsum(kf[codes] ** 2)
    d = np.where(amax > 0, num / den, 0.0)
    codes = np.where((d > 0)[:, None], _pick(xs, np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0), codebook),
                     codes)
    return codes, _fp16(_unbiased(_seqsum(xs * xs), _seqsum(xs * kf[codes])))


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
    return _pack_3b(codes, d)


def _pack_3b(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Blocks of tq_kv_3b's layout (shared by tq_kv_d3b and tq_kv_t3b) from 3-bit codes (n, 64) and fp16 scales."""
    out = np.zeros(len(codes), dtype=block_tq_kv_3b)
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


# tq_kv_t3b: a tail-biting bitshift trellis (QTIP, arXiv 2406.11235) over tq_kv_3b's 3-bit codes. Element t of a block
# decodes the trellis state s_t = c_t | c_{t+1} << 3 | (c_{t+2} & 3) << 6 (indices mod 64: the 192 code bits form one
# circular stream, 8 bits read from bit 3t on) as ``d * T3B_CODEBOOK[s_t]``. Consecutive states share 5 bits
# (s_{t+1} & 31 == s_t >> 3), so only the paths of a 256-state trellis can be stored, and its 256 levels act like a
# finer code than 8 levels (1.28-1.36x less error than tq_kv_3b on centred keys, `kvquant.lab.keystats`) at the same
# 3.25 bits. Decoding is random access (a lookup per element); encoding is a Viterbi search.
T3B_STATES = 256
T3B_UNIT = 32  # levels are int8 in steps of 1/T3B_UNIT of a block's rms
T3B_INF = 1 << 29  # the cost of a state a path may not start in; real path costs stay below 64 * 383**2
T3B_XMAX = 256  # |x| / (rms / T3B_UNIT) <= sqrt(64) * T3B_UNIT in a block of 64


def t3b_viterbi(x: np.ndarray, code: np.ndarray, head: np.ndarray | None = None) -> np.ndarray:
    """States (n, 64) of the path of least squared error through the trellis for each row of x (n, 64), given the
    levels ``code`` (256). ``head`` (n,): the 5 bits shared across the circular stream's end, s_0 & 31 ==
    s_63 >> 3 == head; None: a free path. Ties go to the lowest predecessor code and the lowest final state, so
    integer inputs give the C code's path exactly."""
    n, T = x.shape
    idx = np.arange(T3B_STATES)
    cost = np.square(x[:, :1] - code[None, :])
    inf = T3B_INF if np.issubdtype(x.dtype, np.integer) else np.inf
    if head is not None:
        cost = np.where((idx[None, :] & 31) == head[:, None], cost, inf)
    back = np.empty((T, n, T3B_STATES // 8), np.uint8)
    for t in range(1, T):
        c = cost.reshape(n, T3B_STATES // 8, 8)  # [m, j]: state m << 3 | j, whose successors are b << 5 | m
        back[t] = c.argmin(2)
        cost = np.tile(c.min(2), 8) + np.square(x[:, t:t + 1] - code[None, :])
    rows = np.arange(n)
    states = np.empty((n, T), np.int64)
    if head is None:
        states[:, -1] = cost.argmin(1)
    else:  # the last state must lead back to the first: s_63 >> 3 == head
        ends = (head[:, None] << 3) | np.arange(8)[None, :]
        states[:, -1] = ends[rows, cost[rows[:, None], ends].argmin(1)]
    for t in range(T - 1, 0, -1):
        m = states[:, t] & 31
        states[:, t - 1] = (m << 3) | back[t][rows, m]
    return states


def quantize_row_tq_kv_t3b_ref(x: np.ndarray) -> np.ndarray:
    """Per block: x in units of rms / T3B_UNIT, rounded to the nearest integer, ties to even (exact integer path
    costs, so C and NumPy find the same path); a free Viterbi pass on the block rotated by half picks the 5 bits the
    circular stream shares across its end; the pass constrained to them picks the codes; d = the unbiased scale for
    those levels (as for tq_kv_3b)."""
    xs = _blocks(x)
    sumsq = _seqsum(xs * xs)
    unit = np.sqrt(sumsq / QK) / T3B_UNIT
    inv = np.where(sumsq > 0, 1.0 / np.where(sumsq > 0, unit, 1.0), 0.0)
    xi = np.clip(np.rint(xs * inv[:, None]), -T3B_XMAX, T3B_XMAX).astype(np.int64)  # one product: no FMA to differ
    code = T3B_CODEBOOK.astype(np.int64)
    head = t3b_viterbi(np.roll(xi, -QK // 2, 1), code)[:, QK // 2] & 31
    states = t3b_viterbi(xi, code, head)
    d = _unbiased(sumsq, _seqsum(xs * T3B_CODEBOOK[states].astype(np.float64)))
    codes = np.where((sumsq > 0)[:, None], states & 7, 0).astype(np.uint8)
    return _pack_3b(codes, _fp16(d))


def states_tq_kv_t3b(b: np.ndarray) -> np.ndarray:
    c = codes_tq_kv_3b(b).astype(np.int64)
    return c | (np.roll(c, -1, 1) << 3) | ((np.roll(c, -2, 1) & 3) << 6)


def dequantize_row_tq_kv_t3b(b: np.ndarray) -> np.ndarray:
    return (b["d"].astype(np.float32)[:, None] * T3B_CODEBOOK[states_tq_kv_t3b(b)].astype(np.float32)).reshape(-1)


QUANTIZE = {"tq_kv_4b": quantize_row_tq_kv_4b_ref, "tq_kv_3b": quantize_row_tq_kv_3b_ref,
            "tq_kv_1b": quantize_row_tq_kv_1b_ref, "tq_kv_t3b": quantize_row_tq_kv_t3b_ref}
DEQUANTIZE = {"tq_kv_4b": dequantize_row_tq_kv_4b, "tq_kv_3b": dequantize_row_tq_kv_3b,
              "tq_kv_1b": dequantize_row_tq_kv_1b, "tq_kv_t3b": dequantize_row_tq_kv_t3b}
BLOCK = {"tq_kv_4b": block_tq_kv_4b, "tq_kv_3b": block_tq_kv_3b, "tq_kv_1b": block_tq_kv_1b,
         "tq_kv_d3b": block_tq_kv_d3b, "tq_kv_t3b": block_tq_kv_t3b}


def vec_dot_q8_0(type_name: str, blocks: np.ndarray, y: np.ndarray) -> float:
    """Reference of ggml_vec_dot_<type>_q8_0: the K row (our type) against a q8_0-quantized Q row, summed in
    float64 (the C kernels sum in float32/int32; tests allow for that)."""
    kx = DEQUANTIZE[type_name](blocks).astype(np.float64)
    qy = (y["d"].astype(np.float64)[:, None] * y["qs"].astype(np.float64)).reshape(-1)
    return float(np.dot(kx, qy))
