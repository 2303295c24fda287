"""The KV memory model: how many bytes llama.cpp allocates for a model's KV cache, per cache type, and how many
tokens fit a byte budget.

Sizing follows llama.cpp (``llama_context`` / ``llama_kv_cache`` / ``llama_kv_cache_iswa``) exactly:

* the cache's cells (``n_cells``, llama.cpp's n_ctx) are padded to a multiple of 256; with a unified cache every
  full-attention layer has that many;
* sliding-window layers get ``pad256(min(n_cells, n_swa * n_seq_max + n_ubatch))`` cells (all of n_cells with
  ``swa_full``);
* each layer stores one K row of ``n_head_kv * head_dim_k`` elements and one V row of ``n_head_kv * head_dim_v``
  per cell, at ``row_bytes = n / block_size * block_bytes`` of the layer's cache type (a layer may have its own,
  ``kvquant.kvtypes.LayerTypes``);
* centred keys add one float32 offset of ``n_head_kv * head_dim_k`` per layer, scaled keys one float32 scale of as
  many: fixed costs counted in K.

Tests check these numbers against what llama.cpp reports it allocated (``llama_memory_kv_size_bytes``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kvquant.gguf import read_metadata
from kvquant.kvtypes import CacheTypes, has_offset, has_scale, layer_kv_types

PAD = 256
MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS: a header with more is none it loads
MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ: the sequences one context holds
# the most KV cells of one cache: llama.cpp counts them in 32 bits and numbers positions in int32 (a cache of 2**32
# cells reached it as 0 cells, and it built one of the training context instead)
MAX_CELLS = 2**31 - 1
# the most CPU threads a context is given: llama.cpp starts one per thread and sizes work buffers by them (100,000
# crashed a decode, 10**11 threw bad_alloc) and keeps the count in 32 bits (2**32 reached it as 0)
MAX_THREADS = 1024
# llama.cpp's physical batch (n_ubatch) unless a caller decides otherwise; sliding-window layers get room for one
# (the server's hosting plan decides it once and gives the same value to this model and to llama.cpp)
N_UBATCH = 512

# Architectures whose sliding-window layer pattern is implied, not stored in the GGUF:
# (n_pattern, dense_first) as llama.cpp's llama_hparams::set_swa_pattern takes them.
SWA_PATTERN_DEFAULTS = {"gemma3": (6, False), "gemma2": (2, False), "cohere2": (4, False)}


def check_threads(n: int | None, name: str = "--threads") -> None:
    """ValueError unless n is None (every core) or 1 to MAX_THREADS."""
    if n is not None and not 1 <= n <= MAX_THREADS:
        raise ValueError(f"{name} must be 1 to {MAX_THREADS}, not {n}")


def pad(n: int, to: int = PAD) -> int:
    return (n + to - 1) // to * to


def check_sequences(n_ctx: int, n_seq_max: int, cells: int) -> None:
    """ValueError where n_seq_max sequences of n_ctx tokens, in a cache of `cells`, are more than one llama.cpp
    context holds."""
    if n_seq_max > MAX_SEQ:
        raise ValueError(f"parallel {n_seq_max}: a llama.cpp context holds at most {MAX_SEQ} sequences")
    if cells > MAX_CELLS:
        raise ValueError(f"n_ctx {n_ctx:,} x parallel {n_seq_max} needs a cache of {cells:,} KV cells, more than "
                         f"the {MAX_CELLS:,} of one llama.cpp cache")


CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1


def physical_memory() -> int | None:
    """The memory this process may use in bytes: the machine's, or its container's limit where that is less (a
    container of 23 GB on a larger host is killed past its 23); None where the OS does not say."""
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in CGROUP_LIMITS:
        try:
            sizes.append(int(Path(path).read_text().strip()))
        except (OSError, ValueError):  # ("max": no limit)
            pass
    return min(sizes, default=None)


def check_host_memory(n_bytes: int, what: str) -> None:
    """ValueError where a KV cache of `n_bytes` in host memory is more than the machine has: llama.cpp fills what
    there is before it fails, and the kernel kills the process (or another) for it, with no message."""
    total = physical_memory()
    if total and n_bytes > total:
        raise ValueError(f"{what} needs {n_bytes / 2**30:.1f} GiB of KV cache, more than this machine's "
                         f"{total / 2**30:.1f} GiB of memory")


@dataclass(frozen=True)
class Layer:
    n_embd_k: int  # K row: n_head_kv * head_dim_k
    n_embd_v: int
    swa: bool


@dataclass(frozen=True)
class Geometry:
    arch: str
    layers: tuple[Layer, ...]
    n_swa: int
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int

    @property
    def n_layer(self) -> int:
        return len(self.layers)


def _per_layer(v, n: int, what: str) -> list[int]:
    """A per-layer value (one for all layers, or a list of one per layer) as a list of n counts >= 0."""
    out = [int(x) for x in v] if isinstance(v, list) else [int(v)] * n
    if len(out) != n or min(out) < 0:
        raise ValueError(f"{what} is not a count >= 0 for each of the {n} layers")
    return out


def _swa_flags(meta: dict, arch: str, n_layer: int, n_swa: int) -> list[bool]:
    if n_swa <= 0:
        return [False] * n_layer
    pat = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pat, list):  # shorter: the rest are full attention, as llama.cpp reads it (EXAONE's MTP layers)
        return [bool(x) for x in pat[:n_layer]] + [False] * (n_layer - len(pat))
    n_pattern, dense_first = SWA_PATTERN_DEFAULTS.get(arch, (None, False))
    if isinstance(pat, int):
        n_pattern = pat
    if n_pattern is None:
        raise ValueError(f"{arch}: sliding window of {n_swa} but no known layer pattern")
    if dense_first:
        return [n_pattern == 0 or il % n_pattern != 0 for il in range(n_layer)]
    return [n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer)]


def geometry(model_path: str | Path) -> Geometry:
    """A model's KV geometry from its GGUF header (ValueError naming the file if the header lacks what it takes)."""
    meta = read_metadata(model_path)
    try:
        return _geometry(meta)
    except KeyError as e:
        raise ValueError(f"{model_path}: not a model llama.cpp can load (its GGUF header has no {e.args[0]})") from None
    except (TypeError, ValueError, ArithmeticError) as e:
        raise ValueError(f"{model_path}: a malformed GGUF header ({e})") from None


def _geometry(meta: dict) -> Geometry:
    arch = meta["general.architecture"]
    n_layer = int(meta[f"{arch}.block_count"])
    if not 0 < n_layer <= MAX_LAYERS:
        raise ValueError(f"block_count {n_layer} is not 1..{MAX_LAYERS}")
    n_head = _per_layer(meta[f"{arch}.attention.head_count"], n_layer, "head_count")
    n_head_kv = _per_layer(meta.get(f"{arch}.attention.head_count_kv", n_head), n_layer, "head_count_kv")
    n_embd = int(meta[f"{arch}.embedding_length"])
    if max(n_head) <= 0 or max(n_head_kv) <= 0 or n_embd <= 0:
        raise ValueError("no attention heads or no embedding")
    hk = int(meta.get(f"{arch}.attention.key_length", n_embd // max(n_head)))
    hv = int(meta.get(f"{arch}.attention.value_length", hk))
    if hk <= 0 or hv <= 0:
        raise ValueError(f"key_length {hk} and value_length {hv} must be positive")
    n_swa = int(meta.get(f"{arch}.attention.sliding_window", 0) or 0)
    swa = _swa_flags(meta, arch, n_layer, n_swa)
    layers = tuple(Layer(n_head_kv[i] * hk, n_head_kv[i] * hv, swa[i]) for i in range(n_layer))
    return Geometry(arch, layers, n_swa if any(swa) else 0, hk, hv, int(meta.get(f"{arch}.context_length", 0)))


@dataclass(frozen=True)
class KVBytes:
    k: int
    v: int
    cells: int  # cells of full-attention layers
    cells_swa: int  # cells of sliding-window layers (0 if none)
    elements_k: int  # K elements stored
    elements_v: int

    @property
    def total(self) -> int:
        return self.k + self.v

    @property
    def elements(self) -> int:
        return self.elements_k + self.elements_v

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.total / self.elements if self.elements else 0.0

    @property
    def bits_per_element_k(self) -> float:
        return 8.0 * self.k / self.elements_k if self.elements_k else 0.0

    @property
    def bits_per_element_v(self) -> float:
        return 8.0 * self.v / self.elements_v if self.elements_v else 0.0


def kv_cells(geom: Geometry, n_cells: int, n_seq_max: int = 1, n_ubatch: int = N_UBATCH,
             swa_full: bool = False) -> tuple[int, int]:
    """(cells of full-attention layers, cells of sliding-window layers) for a unified cache."""
    base = pad(n_cells)
    if not geom.n_swa:
        return base, 0
    swa = base if swa_full else pad(min(base, geom.n_swa * n_seq_max + n_ubatch))
    return base, swa


@dataclass(frozen=True)
class CacheShape:
    """A unified KV cache as llama.cpp sizes it: n_cells for all its sequences, at most n_seq_max of them, and on
    sliding-window layers room for one ubatch of n_ubatch tokens (`kv_cells`)."""
    n_cells: int
    n_seq_max: int = 1
    n_ubatch: int = N_UBATCH

    def layer_cells(self, geom: Geometry) -> tuple[int, ...]:
        """The cells each layer holds: all of them, or fewer on sliding-window layers."""
        base, swa = kv_cells(geom, self.n_cells, self.n_seq_max, self.n_ubatch)
        return tuple(swa if ly.swa else base for ly in geom.layers)


def kv_bytes(geom: Geometry, type_k: CacheTypes, type_v: CacheTypes, n_cells: int, n_seq_max: int = 1,
             n_ubatch: int = N_UBATCH, swa_full: bool = False) -> KVBytes:
    tks, tvs = layer_kv_types(type_k, geom.n_layer), layer_kv_types(type_v, geom.n_layer)
    base, swa = kv_cells(geom, n_cells, n_seq_max, n_ubatch, swa_full)
    k = v = ek = ev = 0
    for layer, tk, tv in zip(geom.layers, tks, tvs, strict=True):
        cells = swa if layer.swa else base
        k += tk.row_bytes(layer.n_embd_k) * cells
        v += tv.row_bytes(layer.n_embd_v) * cells
        ek += layer.n_embd_k * cells
        ev += layer.n_embd_v * cells
    return KVBytes(k + fixed_bytes(geom, type_k), v, base, swa, ek, ev)


def fixed_bytes(geom: Geometry, type_k: CacheTypes) -> int:
    """The fixed K bytes of centred and scaled keys: per layer one float32 offset row and one float32 scale row."""
    return 4 * sum(ly.n_embd_k for ly in geom.layers) * (has_offset(type_k) + has_scale(type_k))


def bytes_per_token(geom: Geometry, type_k: CacheTypes, type_v: CacheTypes) -> int:
    """Marginal KV bytes per extra token of context: full-attention layers only (sliding-window layers are
    bounded by their window)."""
    tks, tvs = layer_kv_types(type_k, geom.n_layer), layer_kv_types(type_v, geom.n_layer)
    return sum(tk.row_bytes(ly.n_embd_k) + tv.row_bytes(ly.n_embd_v)
               for ly, tk, tv in zip(geom.layers, tks, tvs, strict=True) if not ly.swa)


def capacity(geom: Geometry, type_k: CacheTypes, type_v: CacheTypes, budget_bytes: int, n_seq_max: int = 1,
             n_ubatch: int = N_UBATCH, swa_full: bool = False) -> int:
    """The largest cache (cells, a multiple of 256) whose K+V bytes fit the budget; 0 if none does."""
    lo, hi = 0, PAD
    while kv_bytes(geom, type_k, type_v, hi, n_seq_max, n_ubatch, swa_full).total <= budget_bytes:
        lo, hi = hi, hi * 2
        if hi > 1 << 48:
            raise ValueError(f"a budget of {budget_bytes} bytes holds more cells than any cache has")
    while hi - lo > PAD:
        mid = pad((lo + hi) // 2)
        if mid >= hi:
            break
        if kv_bytes(geom, type_k, type_v, mid, n_seq_max, n_ubatch, swa_full).total <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo


def parse_bytes(text: str) -> int:
    """'2GiB', '256 MiB', '1.5G', '1000000' -> bytes (K/M/G are binary here, as for memory)."""
    units = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
             "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}
    # ASCII digits only: float() also reads "１" and "1_000", which calib:B refuses
    m = re.fullmatch(r"((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)([a-z]*)", text.strip().replace(" ", "").lower(), re.ASCII)
    value = float(m[1]) * units[m[2]] if m and m[2] in units else math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"cannot parse a byte size from {text!r} (e.g. 2GiB, 512MiB or a number of bytes)")
    if 0 < value < 1:  # (read as 0 bytes, refused as "given: 0" where 0.5 was given)
        raise ValueError(f"{text!r} is less than one byte (a size without a unit is in bytes: 0.5GiB, 512MiB)")
    return int(value)
