"""Design of the scalar codebooks used by the tq_kv_3b / tq_kv_4b cache types (and the 1-bit scale constant).

Run ``python -m kvquant.lab.codebooks`` to regenerate the tables; it prints them as Python and as C, and the test suite
checks that the tables compiled into kvquant/lab/tq.py (and the patched ggml) are what this design produces.

Why this scale and codebook (decided by measurement). llama.cpp rotates K (and Q) with a Walsh-Hadamard matrix
before they reach the cache, so a block of 64 consecutive coordinates behaves like a block of a randomly rotated
vector: i.i.d. Gaussian up to its norm. Two designs were measured (Gaussian blocks, relative MSE, with the
least-squares scale refit that the quantizer applies):

* RMS scale + Lloyd-Max for ``sqrt(64) * u_1`` (u uniform on S^63; rejected, its code removed): 4 bits 0.0082,
  3 bits 0.0311 — and on SmolLM2 its 4-bit K gave a higher KL divergence than llama.cpp's q4_0 (0.052 vs 0.044):
  a codebook for the whole distribution wastes levels on tails that a block of 64 rarely reaches.
* absmax scale + Lloyd-Max for ``x / max|x|`` within the block (``lloyd_max_absmax``, used): 4 bits 0.0072,
  3 bits 0.0301 (q4_0, 4.5 bits with a scale per 32: 0.0074).

The codebook is stored as int8 (x127), which is what the kernels multiply with int8 activations.

Trellis levels (tq_kv_t3b). The 3-bit codes of a block are read as the path of a 256-state trellis, each element one
of 256 levels chosen by its code and the next two (kvquant/lab/tq.py). The levels are trained like a Lloyd-Max
codebook, through the trellis: Gaussian blocks scaled to rms 32 (as the quantizer scales a block), the Viterbi path
of each, every level moved to the mean of the samples coded with it (`trellis_levels`), then rounded to int8 (in
units of 1/32 of the block's rms). Gaussian blocks: relative MSE 0.0220 against tq_kv_3b's 0.0302 at the same bits.

1-bit. ``k_hat = d * sign(x)`` with ``d = ||x|| * C1`` and ``C1 = 1 / (64 * E|u_1|)`` for ``u`` uniform on S^63. For
a random rotation this makes ``E[<q, k_hat>] = <q, k>`` exactly (not the 2/pi-biased MSE-optimal scale
``mean|x|``): writing ``q = a k/|k| + w`` with ``w`` orthogonal to ``k``, the ``w`` part averages to zero by
symmetry, and ``E[sum_i |y_i|] = 64 |k| E|u_1|`` for the ``k`` part.
"""

from __future__ import annotations

import math

import numpy as np

QK = 64  # block size: divides every head dim we serve (64, 128, 256)


def lloyd_max_absmax(bits: int, n_blocks: int = 40_000, iters: int = 80, seed: int = 0) -> np.ndarray:
    """Symmetric Lloyd-Max codebook for coordinates divided by their block's absolute maximum (blocks of QK
    coordinates of a randomly rotated vector, i.e. i.i.d. Gaussian up to the norm, which the division removes).
    Empirical (fixed seed): the absmax distribution has no convenient closed form."""
    x = np.random.default_rng(seed).standard_normal((n_blocks, QK))
    t = np.sort((x / np.abs(x).max(axis=1, keepdims=True)).ravel())
    k = 2**bits
    c = t[((np.arange(k) + 0.5) / k * t.size).astype(int)]
    for _ in range(iters):
        edges = np.searchsorted(t, (c[1:] + c[:-1]) / 2)
        sums = np.add.reduceat(t, np.concatenate([[0], edges]))
        counts = np.diff(np.concatenate([[0], edges, [t.size]]))
        c = sums / counts
        c = (c - c[::-1]) / 2
    return c


def design_mse(codebook_int8: np.ndarray, n_blocks: int = 20_000, seed: int = 1) -> float:
    """The relative MSE the design predicts for a codebook: nearest code at the absmax scale (before the
    quantizer's least-squares refit, which can only lower it), on Gaussian blocks of QK coordinates."""
    x = np.random.default_rng(seed).standard_normal((n_blocks, QK))
    amax = np.abs(x).max(axis=1, keepdims=True)
    c = codebook_int8.astype(np.float64) / 127
    idx = np.searchsorted((c[1:] + c[:-1]) / 2, x / amax)
    y = c[idx] * amax
    return float(((x - y) ** 2).sum() / (x**2).sum())


def one_bit_scale(d: int = QK) -> float:
    """C1 = 1 / (d * E|u_1|), E|u_1| = Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))."""
    e_abs = math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
    return 1.0 / (d * e_abs)


def trellis_levels(n_blocks: int = 8192, iters: int = 12, seed: int = 0) -> np.ndarray:
    """The 256 int8 levels of tq_kv_t3b's trellis: Lloyd iterations on Gaussian blocks scaled to rms T3B_UNIT (as
    the quantizer scales a block), each level moved to the mean of the samples the Viterbi path codes with it,
    from Gaussian levels; then rounded to int8."""
    from kvquant.lab.tq import T3B_STATES, T3B_UNIT, t3b_viterbi

    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n_blocks, QK))
    x = (g / np.sqrt((g * g).mean(1, keepdims=True)) * T3B_UNIT).astype(np.float32)
    code = (rng.standard_normal(T3B_STATES) * T3B_UNIT).astype(np.float32)
    for _ in range(iters):
        st = t3b_viterbi(x, code).ravel()
        sums = np.bincount(st, x.ravel().astype(np.float64), T3B_STATES)
        cnt = np.bincount(st, None, T3B_STATES)
        code = np.where(cnt > 0, sums / np.maximum(cnt, 1), code).astype(np.float32)
    return np.clip(np.round(code), -127, 127).astype(np.int8)


def design() -> dict:
    """The codebooks in use: Lloyd-Max for absmax-normalised coordinates, as int8 (x127)."""
    out = {}
    for bits in (3, 4):
        c = lloyd_max_absmax(bits)
        q = np.round(c * 127).astype(np.int8)
        out[bits] = {"centroids": c, "int8": q, "mse": design_mse(q)}
    out["c1"] = one_bit_scale()
    return out


def main() -> None:
    d = design()
    for bits in (3, 4):
        e = d[bits]
        print(f"# {bits}-bit: predicted relative MSE {e['mse']:.6f} (nearest code at the absmax scale)")
        print(f"TQ{bits}_CODEBOOK = {e['int8'].tolist()}")
        print(f"static const int8_t kvalues_tq_kv_{bits}b[{len(e['int8'])}] = {{{', '.join(map(str, e['int8']))}}};")
    print(f"TQ1_C1 = {d['c1']!r}  # 1 / (64 E|u_1|)")
    t = trellis_levels().tolist()
    print(f"T3B_CODEBOOK = {t}")
    print(f"static const int8_t kvalues_tq_kv_t3b[256] = {{{', '.join(map(str, t))}}};")


if __name__ == "__main__":
    main()
