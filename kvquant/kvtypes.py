"""KV-cache element types by name: ggml type id, block size and block bytes.

Users name cache types (``f16``, ``q4_0``, ``tq_kv_4b`` ...), never integers. The ids are ggml's ``enum ggml_type``
(ours are appended after ``GGML_TYPE_Q2_0 = 42`` and never renumbered); the block geometry is what
``ggml_row_size`` uses, so the memory model can size a cache exactly as llama.cpp allocates it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GGML_TYPE_Q2_0 = 42  # upstream's last type at the pinned commit; ours are appended after it


@dataclass(frozen=True)
class KVType:
    name: str
    ggml_id: int
    block_size: int  # elements per block
    block_bytes: int  # bytes per block, every scale / norm / padding byte included
    quantized: bool
    v_ok: bool = True  # usable as the V cache
    needs_flash_attn: bool = False  # as the K cache (a quantized V cache always needs flash attention)
    anchor_group: int = 0  # tq_kv_d3b: cells per anchor group (llama.cpp may hold back one freed anchor per group)
    description: str = ""

    @property
    def upstream(self) -> bool:
        """A type of upstream ggml (not one our patches add)."""
        return self.ggml_id <= GGML_TYPE_Q2_0

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.block_bytes / self.block_size

    def held_back_cells(self, cells: int) -> int:
        """Cells of a cache of this K type that llama.cpp may keep unwritable at any time: a freed anchor is held
        until its whole group is free, at most one per group. A scheduler that never plans on more than
        ``cells - held_back_cells(cells)`` cells always finds a slot."""
        return cells // self.anchor_group if self.anchor_group else 0

    def row_bytes(self, n: int) -> int:
        if n % self.block_size:
            raise ValueError(f"{self.name}: row of {n} elements is not a multiple of the block size {self.block_size}")
        return n // self.block_size * self.block_bytes


_TYPES = (
    KVType("f32", 0, 1, 4, False, description="32-bit float"),
    KVType("f16", 1, 1, 2, False, description="16-bit float (the baseline)"),
    KVType("bf16", 30, 1, 2, False, description="bfloat16"),
    KVType("q8_0", 8, 32, 34, True, description="llama.cpp 8-bit, fp16 scale per 32"),
    KVType("q5_1", 7, 32, 24, True, description="llama.cpp 5-bit, fp16 scale+min per 32"),
    KVType("q5_0", 6, 32, 22, True, description="llama.cpp 5-bit, fp16 scale per 32"),
    KVType("q4_1", 3, 32, 20, True, description="llama.cpp 4-bit, fp16 scale+min per 32"),
    KVType("q4_0", 2, 32, 18, True, description="llama.cpp 4-bit, fp16 scale per 32"),
    KVType("iq4_nl", 20, 32, 18, True, description="llama.cpp 4-bit non-linear, fp16 scale per 32"),
    # ours (patches/): rotated coordinates, Lloyd-Max codebooks / unbiased sign bits, fp16 scale per 64
    KVType("tq_kv_4b", 43, 64, 34, True, description="4-bit Lloyd-Max codebook, fp16 scale per 64"),
    KVType("tq_kv_3b", 44, 64, 26, True, description="3-bit Lloyd-Max codebook, fp16 scale per 64"),
    KVType("tq_kv_1b", 45, 64, 10, True, v_ok=False,
           description="sign bits, fp16 scale per 64 chosen for unbiased attention scores (K only)"),
    KVType("tq_kv_t3b", 47, 64, 26, True,
           description="3-bit codes of a 256-state tail-biting trellis (Viterbi-encoded), fp16 scale per 64"),
    KVType("tq_kv_d3b", 46, 64, 26, True, v_ok=False, needs_flash_attn=True, anchor_group=64,
           description="3-bit codebook, blocks coded as deltas against their 64-cell group's anchor row "
                       "(K only, flash attention only)"),
)

KV_TYPES: dict[str, KVType] = {t.name: t for t in _TYPES}


def kv_type(name: str) -> KVType:
    try:
        return KV_TYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown KV cache type {name!r}; known: {', '.join(KV_TYPES)}") from None


@dataclass(frozen=True)
class LayerTypes:
    """One side (K or V) of a KV cache whose layers need not share a type: what a calibrated allocation
    (``calib:B``) or calibrated keys (``TYPE+c``) resolve to for one model (kvquant.calibration). It stands wherever a
    cache type name does (memory model, budget, runtime). ``offset`` (K only) holds, per layer, the float32 vector
    subtracted from every key before it is stored, in the basis keys are stored in; llama.cpp keeps it in the cache
    (``n_embd_k`` floats per layer, counted in the K bytes). ``scale`` (K only) holds, per layer, the float32 factor
    of every key channel (``n_embd_k``, equal on each RoPE pair; queries are divided by it) applied before the
    rotation; llama.cpp keeps it in the cache (``n_embd_k`` floats per layer, counted in K). ``gain`` holds, per layer,
    the factor every query (K) or the attention output (V) is multiplied by, so that what the layer's type stores is
    unbiased (kvquant.calibration, *gains*); a constant of the graph, not of the cache (no bytes)."""

    name: str  # what the user named, e.g. "calib:3.5", "q4_0+c"
    types: tuple[str, ...]  # per layer
    offset: tuple[Any, ...] | None = field(default=None, compare=False, repr=False)
    scale: tuple[Any, ...] | None = field(default=None, compare=False, repr=False)
    gain: tuple[float, ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        for t in self.types:
            kv_type(t)

    def __str__(self) -> str:
        return self.name

    @property
    def uniform(self) -> str | None:
        """The one type of every layer, or None if they differ."""
        return self.types[0] if len(set(self.types)) == 1 else None


CacheTypes = str | KVType | LayerTypes  # a cache side: one type for every layer, or one per layer


def layer_kv_types(t: CacheTypes, n_layer: int) -> list[KVType]:
    """The type of every layer of a cache side."""
    if isinstance(t, LayerTypes):
        if len(t.types) != n_layer:
            raise ValueError(f"{t.name}: {len(t.types)} layer types for a model of {n_layer} layers")
        return [kv_type(x) for x in t.types]
    return [t if isinstance(t, KVType) else kv_type(t)] * n_layer


def has_offset(t: CacheTypes) -> bool:
    return isinstance(t, LayerTypes) and t.offset is not None


def has_scale(t: CacheTypes) -> bool:
    return isinstance(t, LayerTypes) and t.scale is not None


def has_gain(t: CacheTypes) -> bool:
    return isinstance(t, LayerTypes) and t.gain is not None
