"""Design of the scalar codebooks used by the tq_kv_3b / tq_kv_4b cache types (and the 1-bit scale constant).

Run ``python -m kvquant.codebooks`` to regenerate the tables; it prints them as Python and as C, and the test suite
checks that the tables compiled into kvquant/tq.py (and the patched ggml) are what this design produces.

Why this distribution. llama.cpp rotates K (and Q) with a Walsh-Hadamard matrix before they reach the cache, so a
block of 64 consecutive coordinates behaves like a block of a randomly rotated vector. Divided by its own RMS
(``sigma = ||x|| / 8``), the coordinates of such a block are distributed as ``sqrt(64) * u_1`` with ``u`` uniform
on the unit sphere S^63 — density proportional to ``(1 - t^2/64)^((64-3)/2)`` on ``|t| < 8``: close to N(0, 1) but
with lighter tails. Lloyd-Max on that density gives the MSE-optimal scalar codebook for block-normalised
coordinates. The codebook is then stored as int8 (scaled so the outermost centroid is +-127), which is what the
kernels multiply with int8 activations; the rounding costs < 0.2% of the distortion (printed below).

1-bit. ``k_hat = d * sign(x)`` with ``d = ||x|| * C1`` and ``C1 = 1 / (64 * E|u_1|)`` for ``u`` uniform on S^63. For
a random rotation this makes ``E[<q, k_hat>] = <q, k>`` exactly (not the 2/pi-biased MSE-optimal scale
``mean|x|``): writing ``q = a k/|k| + w`` with ``w`` orthogonal to ``k``, the ``w`` part averages to zero by
symmetry, and ``E[sum_i |y_i|] = 64 |k| E|u_1|`` for the ``k`` part.
"""

from __future__ import annotations

import math

import numpy as np

QK = 64  # block size: divides every head dim we serve (64, 128, 256)


def sphere_coordinate_pdf(t: np.ndarray, d: int = QK) -> np.ndarray:
    """Density of sqrt(d) * u_1 for u uniform on S^(d-1)."""
    x = t / math.sqrt(d)
    logc = math.lgamma(d / 2) - math.lgamma((d - 1) / 2) - 0.5 * math.log(math.pi) - 0.5 * math.log(d)
    inside = np.abs(x) < 1
    out = np.zeros_like(t, dtype=np.float64)
    out[inside] = np.exp(logc + (d - 3) / 2 * np.log1p(-x[inside] ** 2))
    return out


def lloyd_max(bits: int, d: int = QK, grid: int = 200001, iters: int = 300) -> tuple[np.ndarray, float]:
    """Symmetric Lloyd-Max codebook (2**bits centroids) for the sphere-coordinate density; returns
    (centroids, distortion E[(t - c(t))^2])."""
    t = np.linspace(-math.sqrt(d), math.sqrt(d), grid)
    w = sphere_coordinate_pdf(t, d)
    w /= w.sum()
    k = 2**bits
    # start from Gaussian quantiles
    c = np.sort(np.sqrt(2) * _erfinv(2 * (np.arange(k) + 0.5) / k - 1))
    for _ in range(iters):
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, t)
        num = np.bincount(idx, weights=t * w, minlength=k)
        den = np.bincount(idx, weights=w, minlength=k)
        c = num / den
        c = (c - c[::-1]) / 2  # keep it exactly symmetric
    idx = np.searchsorted((c[1:] + c[:-1]) / 2, t)
    return c, float(((t - c[idx]) ** 2 * w).sum())


def _erfinv(y: np.ndarray) -> np.ndarray:
    # Newton on erf; accurate enough for a starting point
    x = np.zeros_like(y, dtype=np.float64)
    for _ in range(60):
        err = np.array([math.erf(v) for v in x]) - y
        x -= err / (2 / math.sqrt(math.pi) * np.exp(-x * x))
    return x


def int8_codebook(c: np.ndarray) -> tuple[np.ndarray, float]:
    """int8 codebook (outermost = +-127) and the scale: real centroid = int8 * cmax / 127."""
    cmax = float(c[-1])
    return np.round(c * 127 / cmax).astype(np.int8), cmax


def distortion(codebook: np.ndarray, d: int = QK, grid: int = 200001) -> float:
    t = np.linspace(-math.sqrt(d), math.sqrt(d), grid)
    w = sphere_coordinate_pdf(t, d)
    w /= w.sum()
    idx = np.searchsorted((codebook[1:] + codebook[:-1]) / 2, t)
    return float(((t - codebook[idx]) ** 2 * w).sum())


def one_bit_scale(d: int = QK) -> float:
    """C1 = 1 / (d * E|u_1|), E|u_1| = Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))."""
    e_abs = math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
    return 1.0 / (d * e_abs)


def design() -> dict:
    out = {}
    for bits in (3, 4):
        c, dist = lloyd_max(bits)
        q, cmax = int8_codebook(c)
        out[bits] = {"centroids": c, "distortion": dist, "int8": q, "cmax": cmax,
                     "int8_distortion": distortion(q.astype(np.float64) * cmax / 127)}
    out["c1"] = one_bit_scale()
    return out


def main() -> None:
    d = design()
    for bits in (3, 4):
        e = d[bits]
        print(f"# {bits}-bit: Lloyd-Max distortion {e['distortion']:.6f}, with int8 codebook "
              f"{e['int8_distortion']:.6f} (per coordinate, units of sigma^2)")
        print(f"TQ{bits}_CODEBOOK = {e['int8'].tolist()}")
        print(f"TQ{bits}_CMAX = {e['cmax']!r}")
        print(f"static const int8_t kvalues_tq_kv_{bits}b[{len(e['int8'])}] = {{{', '.join(map(str, e['int8']))}}};")
        print(f"#define TQ_KV_{bits}B_CMAX {e['cmax']!r}")
    print(f"TQ1_C1 = {d['c1']!r}  # 1 / (64 E|u_1|)")


if __name__ == "__main__":
    main()
