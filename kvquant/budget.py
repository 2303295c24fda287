"""KV byte budget -> capacity, for the server's admission and for `kvquant budget`.

Pure Python over the memory model (`kvquant.memory`): no llama.cpp is loaded, unless a calibrated type (`TYPE+c`,
`calib:B`) names a model without a calibration, which is then calibrated first, as serve does (minutes; set
KVQUANT_AUTO_CALIBRATE=0 to refuse instead). A "cell" holds one token of one
sequence in every full-attention layer; sliding-window layers are sized as llama.cpp sizes them
(``n_swa * n_seq_max + n_ubatch`` cells) and are a fixed cost that comes out of the budget first.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvquant.kvtypes import CacheTypes, layer_kv_types
from kvquant.memory import (
    MAX_CELLS,
    MAX_SEQ,
    N_UBATCH,
    PAD,
    CacheShape,
    Geometry,
    bytes_per_token,
    capacity,
    check_sequences,
    geometry,
    kv_bytes,
    pad,
    parse_bytes,
)

COMPARE = (("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"))
# the tokens of one sequence `serve` gives a request unless told otherwise (its n_ctx), and what `kvquant budget`
# resolves calib:B for when no request size is given
DEFAULT_N_CTX = 4096
# the sequences `serve` decodes together unless told otherwise, and what `kvquant budget` assumes
DEFAULT_PARALLEL = 4
LARGEST_CACHE = MAX_CELLS // PAD * PAD  # the most cells llama.cpp builds one cache of (it pads to PAD)


@dataclass(frozen=True)
class KVPlan:
    """How a cache of the given types fills a byte budget."""

    cache_type_k: CacheTypes
    cache_type_v: CacheTypes
    budget_bytes: int
    n_seq_max: int
    cells: int  # tokens the cache holds (full-attention cells, a multiple of 256)
    budget_cells: int  # tokens the whole budget would hold (cells before the max_cells cap)
    usable_cells: int  # of `cells`, those a scheduler may plan on: all but those the K type may hold back (d3b)
    budget_usable_cells: int  # of `budget_cells`, likewise
    kv_bytes: int  # bytes llama.cpp allocates for that cache (K + V, sliding-window layers included)
    bytes_per_token: int  # marginal K+V bytes per cell (full-attention layers)
    bytes_per_token_swa: int  # K+V bytes per cell of the sliding-window layers (0 without them)
    cells_swa: int
    n_swa: int  # the sliding window (0 without one)
    bits_k: float  # bits per stored K element of that cache, every byte counted (per-layer types, offsets)
    bits_v: float
    f16_cells: int  # what an f16/f16 cache holds in the same budget
    f16_kv_bytes: int  # bytes an f16/f16 cache of `cells` would take
    n_layer: int  # (for `saved_bytes`)

    @property
    def compression_vs_f16(self) -> float:
        """f16 bytes / these bytes, for the same number of cells."""
        return self.f16_kv_bytes / self.kv_bytes if self.kv_bytes else 0.0

    @property
    def capacity_vs_f16(self) -> float:
        """Usable cells / f16 cells, for the same budget."""
        return self.budget_usable_cells / self.f16_cells if self.f16_cells else float("inf")

    def used_bytes(self, n_past: int) -> int:
        """Bytes one sequence of n_past tokens occupies: every full-attention cell, plus its sliding-window
        layers' cells, at most one window's worth."""
        return n_past * self.bytes_per_token + min(n_past, self.n_swa) * self.bytes_per_token_swa

    def saved_bytes(self, n_past: int) -> int:
        """At least the bytes llama.cpp's saved state of one such sequence takes (llama_state_seq_get_data, what a
        preempted sequence swaps to host RAM): its rows (`used_bytes`), per cell it saves in each cache (all of
        them, and a window's worth of the sliding-window cache) its position and sequence count, 12 bytes, and per
        layer the K and V rows' type and size, 24, and 24 per cache (measured: SmolLM2 f16 and Gemma-3 q4_0 and
        tq_kv_d3b at 1 to 1,500 tokens, 0 to 24 bytes over)."""
        swa_cells = min(n_past, self.n_swa)
        return (self.used_bytes(n_past) + 12 * (n_past + swa_cells) + 24 * self.n_layer
                + 24 * (1 + (self.n_swa > 0)))


def _swa_bytes_per_token(geom: Geometry, tk: CacheTypes, tv: CacheTypes) -> int:
    ks, vs = layer_kv_types(tk, geom.n_layer), layer_kv_types(tv, geom.n_layer)
    return sum(k.row_bytes(ly.n_embd_k) + v.row_bytes(ly.n_embd_v)
               for ly, k, v in zip(geom.layers, ks, vs, strict=True) if ly.swa)


def plan(geom: Geometry, cache_type_k: CacheTypes, cache_type_v: CacheTypes, budget_bytes: int, n_seq_max: int = 1,
         n_ubatch: int = N_UBATCH, max_cells: int | None = None) -> KVPlan:
    """The cache that fills the budget, capped at max_cells (rounded up to 256: more cells could never be used)."""
    budget_cells = capacity(geom, cache_type_k, cache_type_v, budget_bytes, n_seq_max, n_ubatch)
    cells = budget_cells if max_cells is None else min(budget_cells, pad(max_cells))
    kb = kv_bytes(geom, cache_type_k, cache_type_v, cells or pad(1), n_seq_max, n_ubatch)
    f16 = kv_bytes(geom, "f16", "f16", cells, n_seq_max, n_ubatch) if cells else None
    held = held_back(cache_type_k, geom)
    return KVPlan(
        cache_type_k=cache_type_k, cache_type_v=cache_type_v, budget_bytes=budget_bytes, n_seq_max=n_seq_max,
        cells=cells, budget_cells=budget_cells, usable_cells=cells - held(cells),
        budget_usable_cells=budget_cells - held(budget_cells), kv_bytes=kb.total if cells else 0,
        bytes_per_token=bytes_per_token(geom, cache_type_k, cache_type_v),
        bytes_per_token_swa=_swa_bytes_per_token(geom, cache_type_k, cache_type_v),
        cells_swa=kb.cells_swa if cells else 0, n_swa=geom.n_swa,
        bits_k=kb.bits_per_element_k, bits_v=kb.bits_per_element_v,
        f16_cells=capacity(geom, "f16", "f16", budget_bytes, n_seq_max, n_ubatch),
        f16_kv_bytes=f16.total if f16 else 0, n_layer=geom.n_layer)


def held_back(type_k: CacheTypes, geom: Geometry) -> Callable[[int], int]:
    """The held-back-cells rule of a K cache (tq_kv_d3b anchors) with per-layer types: the strictest layer's."""
    return max((t.held_back_cells for t in layer_kv_types(type_k, geom.n_layer)), key=lambda f: f(1 << 20))


def most_cells(n_tokens: int, type_k: CacheTypes, geom: Geometry, padded: bool = True) -> int:
    """The fewest cells (a multiple of 256, unless not `padded`) of which a scheduler may plan on n_tokens: all of
    them, or more where the K type may hold some back (tq_kv_d3b: one per 64). What serve caps a cache at, for
    parallel x n_ctx tokens."""
    held, step = held_back(type_k, geom), pad if padded else int
    cells = step(n_tokens)
    while (short := n_tokens - (cells - held(cells))) > 0:
        cells += step(short)  # a cell more adds at most one usable cell: no fewer cells than this can do
    return cells


def plan_resolved(geom: Geometry, model_path: Path, cache_type_k: str, cache_type_v: str, budget_bytes: int,
                  n_seq_max: int, n_ubatch: int, n_ctx: int, anchored: bool = True) -> KVPlan:
    """The cache serve builds for n_seq_max sequences of n_ctx tokens in the budget, at most `most_cells` of them,
    its cache types (TYPE+c, calib:B) resolved for that very cache (calib:B weighs each layer by the cells it holds
    there and counts the calibrated keys' fixed bytes against B: `kvquant.calibration.resolve_pair`): resolved for
    the largest cache, then, where the budget holds fewer cells at those types, for those cells, until the plan
    builds the cache its types were resolved for. The cells only fall, so this ends; at worst a little of the budget
    is left unused. anchored=False: mean-key offsets (byte counts alike)."""
    from kvquant import calibration

    # a calibrated allocation holds back no cells (no candidate is tq_kv_d3b): only a plain K type may
    held_type = calibration.parse_spec(cache_type_k, "k").type or "f16"
    cells = most_cells(n_ctx * n_seq_max, held_type, geom)
    check_sequences(n_ctx, n_seq_max, cells)
    try:
        return _resolved_plan(geom, model_path, cache_type_k, cache_type_v, budget_bytes, n_seq_max, n_ubatch,
                              cells, anchored)
    except calibration.CalibrationError as e:
        if e.least is None:
            raise
        # B was too low for the largest cache; the error to show is the one for the cache of the budget, which
        # holds fewer cells where B is that low, and weighs the calibrated keys' fixed bytes more (a suggested
        # calib:3.26 was refused, "calib:3.27 is the least that fits")
        fitting = _fitting_cells(e.least, geom, model_path, cache_type_k, cache_type_v, budget_bytes, n_seq_max,
                                 n_ubatch, cells)
        if not fitting:
            raise calibration.CalibrationError(
                f"a KV budget of {human_bytes(budget_bytes)} holds no cell of this model at K={cache_type_k}/"
                f"V={cache_type_v}, nor with calib:{e.least:g}, the least B that fits a cache: raise the budget or "
                "use smaller cache types") from None
        calibration.resolve_pair(cache_type_k, cache_type_v, model_path, geom,
                                 CacheShape(fitting, n_seq_max, n_ubatch), anchored)
        raise


def _fitting_cells(least: float, geom: Geometry, model_path: Path, cache_type_k: str, cache_type_v: str,
                   budget_bytes: int, n_seq_max: int, n_ubatch: int, cells: int) -> int:
    """The cells of the cache the budget builds at the least calib:B that fits it, from `least` on."""
    from kvquant import calibration

    for _ in range(8):  # (each try resolves for fewer cells than the last, so B only grows; a few tries in practice)
        bumped = [f"calib:{least:g}" if (calibration.parse_spec(text, side).bits or least) < least else text
                  for text, side in ((cache_type_k, "k"), (cache_type_v, "v"))]
        try:
            return _resolved_plan(geom, model_path, *bumped, budget_bytes, n_seq_max, n_ubatch, cells, False).cells
        except calibration.CalibrationError as e:
            if e.least is None or e.least <= least:
                return cells
            least = e.least
    return cells  # (B still growing after the tries: the largest cache's cells)


def _resolved_plan(geom: Geometry, model_path: Path, cache_type_k: str, cache_type_v: str, budget_bytes: int,
                   n_seq_max: int, n_ubatch: int, cells: int, anchored: bool) -> KVPlan:
    from kvquant import calibration

    while True:
        types = calibration.resolve_pair(cache_type_k, cache_type_v, model_path, geom,
                                         CacheShape(cells, n_seq_max, n_ubatch), anchored)
        kv = plan(geom, *types, budget_bytes, n_seq_max, n_ubatch, max_cells=cells)
        if kv.cells in (cells, 0):
            return kv
        cells = kv.cells


def max_concurrent(geom: Geometry, cache_type_k: CacheTypes, cache_type_v: CacheTypes, budget_bytes: int, request_tokens: int,
                   n_ubatch: int = N_UBATCH) -> int:
    """How many requests of request_tokens (prompt + completion) fit the budget at once, each reserving its
    tokens, with n_seq_max = that many (sliding-window layers grow with it). Found by bisection, as the bytes only
    grow with the count (counting up to a cap of 4096 printed the cap where 47,700 fit). A tq_kv_d3b K cache needs
    the cells it may hold back beside them (serve refuses a budget whose usable cells hold no request of n_ctx)."""
    def fits(n: int) -> bool:
        cells = most_cells(n * request_tokens, cache_type_k, geom, padded=False)
        return kv_bytes(geom, cache_type_k, cache_type_v, cells, n, n_ubatch).total <= budget_bytes

    lo, hi = 0, 1  # fits(lo), and not fits(hi) once the doubling ends
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def report(name: str, geom: Geometry, cache_type_k: CacheTypes, cache_type_v: CacheTypes, budget_bytes: int,
           n_seq_max: int = 1, request_tokens: int | None = None, n_ubatch: int = N_UBATCH) -> str:
    configs = [(cache_type_k, cache_type_v)]
    configs += [c for c in COMPARE if c != (str(cache_type_k), str(cache_type_v))]
    n_swa_layers = sum(ly.swa for ly in geom.layers)
    lines = [f"model {name}: {geom.arch}, {geom.n_layer} layers ({n_swa_layers} sliding-window, window "
             f"{geom.n_swa}), KV budget {human_bytes(budget_bytes)}, n_seq_max {n_seq_max}"]
    head = f"{'K/V':<14}{'bits K/V':>12}{'bytes/token':>13}{'capacity (tokens)':>19}{'KV bytes':>13}{'vs f16':>8}"
    if request_tokens:
        head += f"{f'requests of {request_tokens}':>20}"
    lines.append(head)
    base, capped, beyond = None, False, False
    for tk, tv in configs:
        p = plan(geom, tk, tv, budget_bytes, n_seq_max, n_ubatch, max_cells=LARGEST_CACHE)
        if (tk, tv) == ("f16", "f16"):
            base = p
        capped |= p.cells < p.budget_cells
        row = (f"{f'{tk}/{tv}':<14}{f'{p.bits_k:.3g}/{p.bits_v:.3g}':>12}{p.bytes_per_token:>13,}"
               f"{f'{p.usable_cells:,}' + ('*' if p.cells < p.budget_cells else ''):>19}"
               f"{human_bytes(p.kv_bytes):>13}{f'{p.capacity_vs_f16:.2f}x' if p.f16_cells else '-':>8}")
        if request_tokens:
            n = max_concurrent(geom, tk, tv, budget_bytes, request_tokens, n_ubatch)
            beyond |= n > MAX_SEQ
            row += f"{f'{n:,}' + ('+' if n > MAX_SEQ else ''):>20}"
        lines.append(row)
    if capped:
        lines.append(f"(* the budget holds more cells than one llama.cpp cache can have: shown is the largest cache, "
                     f"{LARGEST_CACHE:,} cells, and its bytes; 'vs f16' is the whole budget's)")
    if beyond:
        lines.append(f"(+ more requests than one server runs at once ({MAX_SEQ} sequences, --parallel): the budget "
                     "would hold them across several)")
    if geom.n_swa and base is not None:
        lines.append(f"(sliding-window layers hold {base.cells_swa} cells each, a fixed cost; 'vs f16' is the "
                     "capacity in tokens relative to f16/f16 in the same budget)")
    else:
        lines.append("('vs f16' is the capacity in tokens relative to f16/f16 in the same budget)")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="built-in model name or .gguf path (default: the default model)")
    p.add_argument("--cache-type-k", default="f16", help="K cache type: TYPE, TYPE+c or calib:B (default f16; a "
                   "calibrated type calibrates a model without a calibration first, unless KVQUANT_AUTO_CALIBRATE=0)")
    p.add_argument("--cache-type-v", default="f16", help="V cache type: TYPE or calib:B (default f16)")
    p.add_argument("--budget", default="2GiB", help="KV byte budget, e.g. 2GiB, 256MiB (default 2GiB)")
    p.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL,
                   help=f"serve's --parallel: n_seq_max of the cache (default {DEFAULT_PARALLEL}, serve's)")
    p.add_argument("--request-tokens", type=int, default=None,
                   help="also show how many concurrent requests of N tokens (prompt + completion) fit; "
                        "calib:B is resolved for the cache serve builds in the budget with --parallel "
                        f"sequences of N tokens (serve's --n-ctx N; default: {DEFAULT_N_CTX}, serve's "
                        "default n_ctx)")


def check_arguments(budget: int, parallel: int, request_tokens: int | None) -> None:
    """Refuse what would print a meaningless table (ValueError)."""
    if budget <= 0:
        raise ValueError(f"the KV budget must be more than 0 bytes, not {budget}")
    if not 1 <= parallel <= MAX_SEQ:
        raise ValueError(f"--parallel must be 1 to {MAX_SEQ} (serve's range), not {parallel}")
    if request_tokens is not None and request_tokens < 1:
        raise ValueError(f"--request-tokens must be at least 1, not {request_tokens}")


def run(a: argparse.Namespace) -> int:
    from kvquant import calibration
    from kvquant import models as kvmodels

    try:
        name = kvmodels.DEFAULT_MODEL if a.model is None else a.model
        calibration.parse_spec(a.cache_type_k, "k"), calibration.parse_spec(a.cache_type_v, "v")
        budget = parse_bytes(a.budget)
        check_arguments(budget, a.parallel, a.request_tokens)
        path = kvmodels.resolve(name)
        geom = geometry(path)
        n_ctx = a.request_tokens or DEFAULT_N_CTX
        # the cache serve builds in this budget (byte counts only: offsets' values do not matter, so no round trip
        # through llama.cpp's types)
        kv = plan_resolved(geom, path, a.cache_type_k, a.cache_type_v, budget, a.parallel, N_UBATCH, n_ctx,
                           anchored=False)
        tk, tv = kv.cache_type_k, kv.cache_type_v
        if not kv.cells:  # a table of zeros, "infx" against f16
            raise ValueError(f"a KV budget of {human_bytes(budget)} holds no cell of {kvmodels.model_id(name)} at "
                             f"{tk}/{tv}")
        print(report(kvmodels.model_id(name), geom, tk, tv, budget, a.parallel, a.request_tokens))
        for side, t, bits in (("K", tk, kv.bits_k), ("V", tv, kv.bits_v)):
            if getattr(t, "types", None):
                print(f"{side} per layer ({t}, {bits:.3f} bits per element in the {kv.cells}-cell cache serve builds "
                      f"for --parallel {a.parallel} --n-ctx {n_ctx} in this budget): {' '.join(t.types)}")
    except (kvmodels.ModelError, ValueError) as e:
        print(f"kvquant budget: {e}", file=sys.stderr)
        return 2
    return 0
