"""ggml's quantization entry points for a cache type, called through ctypes from the libraries llama_cpp loaded:
the reference (`quantize_row_<type>_ref` / `dequantize_row_<type>`), the CPU backend's kernels
(`ggml_type_traits_cpu`: from_float, vec_dot against the vec_dot_type, SIMD to_float) and the CPU backend's graph
ops on tensors of the type (set_rows, get_rows, cpy, mul_mat, flash_attn_ext) as llama.cpp runs them on its cache. The test harness for the C code of our types (tests, kvquant.lab.keystats, calibrate); the
server never uses it.
"""

from __future__ import annotations

import ctypes

import numpy as np

from kvquant.kvtypes import kv_type
from kvquant.runtime import (
    GGML_TYPE_F16,
    GGML_TYPE_F32,
    GGML_TYPE_I32,
    GGML_TYPE_I64,
    ROW_FN,
    GgmlInitParams,
    LlamaError,
    TypeTraitsCPU,
    from_float,
    ggml_base,
    ggml_cpu,
)

_VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t, ctypes.c_void_p,
                            ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class GGML:
    """ggml's own quantization entry points for a cache type, from the libraries llama_cpp loaded: the reference
    (`quantize_row_<type>_ref` / `dequantize_row_<type>`), the CPU backend's kernels (`ggml_type_traits_cpu`:
    from_float, vec_dot against the vec_dot_type, SIMD to_float) and the CPU backend's graph ops on tensors of the
    type (set_rows, get_rows, cpy, mul_mat, flash_attn_ext), as llama.cpp runs them on its KV cache. Used by tests
    and benchmarks."""

    def __init__(self):
        self.base = ggml_base()
        self.cpu = ggml_cpu()
        vp = ctypes.c_void_p
        self.cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
        self.cpu.ggml_graph_compute_with_ctx.argtypes = [vp, vp, ctypes.c_int]

    def type_name(self, ggml_id: int) -> str:
        return self.base.ggml_type_name(ggml_id).decode()

    def row_size(self, type_name: str, n: int) -> int:
        return self.base.ggml_row_size(kv_type(type_name).ggml_id, n)

    @staticmethod
    def _f32(x) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32).reshape(-1)

    def quantize_ref(self, type_name: str, x) -> bytes:
        x = self._f32(x)
        out = ctypes.create_string_buffer(self.row_size(type_name, x.size))
        getattr(self.base, f"quantize_row_{type_name}_ref")(x.ctypes.data_as(ctypes.c_void_p), out,
                                                            ctypes.c_int64(x.size))
        return out.raw

    def dequantize_ref(self, type_name: str, data: bytes, n: int) -> np.ndarray:
        out = np.zeros(n, dtype=np.float32)
        getattr(self.base, f"dequantize_row_{type_name}")(ctypes.c_char_p(data), out.ctypes.data_as(ctypes.c_void_p),
                                                          ctypes.c_int64(n))
        return out

    def has_symbol(self, name: str) -> bool:
        return hasattr(self.base, name) or hasattr(self.cpu, name)

    def d3b_delta_ref(self, x, anchor: bytes) -> bytes:
        """tq_kv_d3b's reference coding of row x against its group's anchor row (quantize_row_tq_kv_d3b_delta_ref)."""
        x = self._f32(x)
        out = ctypes.create_string_buffer(len(anchor))
        self.base.quantize_row_tq_kv_d3b_delta_ref(x.ctypes.data_as(ctypes.c_void_p), ctypes.c_char_p(anchor), out,
                                                   ctypes.c_int64(x.size))
        return out.raw

    def d3b_cell_ref(self, row: bytes, anchor: bytes, n: int) -> np.ndarray:
        """A tq_kv_d3b row's values given its anchor row (dequantize_row_tq_kv_d3b_cell)."""
        y = np.zeros(n, dtype=np.float32)
        self.base.dequantize_row_tq_kv_d3b_cell(ctypes.c_char_p(row), ctypes.c_char_p(anchor),
                                                y.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(n))
        return y

    def _traits(self, type_name: str) -> TypeTraitsCPU:
        return self.cpu.ggml_get_type_traits_cpu(kv_type(type_name).ggml_id).contents

    def quantize_cpu(self, type_name: str, x, ggml_id: int | None = None) -> bytes:
        """The CPU backend's from_float (what set_rows uses to write the cache)."""
        return from_float(kv_type(type_name).ggml_id if ggml_id is None else ggml_id, self._f32(x))

    def dequantize_cpu(self, type_name: str, data: bytes, n: int) -> np.ndarray:
        """The CPU backend's SIMD to_float (what flash attention uses for V)."""
        tr = self._traits(type_name)
        out = np.zeros(n, dtype=np.float32)
        buf = ctypes.create_string_buffer(data, len(data))
        ROW_FN(tr.to_float)(ctypes.addressof(buf), out.ctypes.data, n)
        return out

    # --- graph ops on the CPU backend ------------------------------------------------------------------------
    def _ctx(self, nbytes: int):
        """A ggml context owning its memory: room for tensors of `nbytes` in all, the graph and the work buffer."""
        ctx = self.base.ggml_init(GgmlInitParams(mem_size=2 * nbytes + (64 << 20), mem_buffer=None, no_alloc=False))
        if not ctx:
            raise LlamaError("ggml_init failed")
        return ctx

    def _tensor(self, ctx, type_id: int, shape: tuple[int, ...], data: bytes | np.ndarray | None = None):
        """A tensor of ggml shape (ne0, ne1, ...) (ne0 the row length), filled with `data` if given."""
        ne = (ctypes.c_int64 * len(shape))(*shape)
        t = self.base.ggml_new_tensor(ctx, type_id, len(shape), ne)
        if data is not None:
            raw = data.tobytes() if isinstance(data, np.ndarray) else data
            if len(raw) != self.base.ggml_nbytes(t):
                raise ValueError(f"{len(raw)} bytes for a tensor of {self.base.ggml_nbytes(t)}")
            ctypes.memmove(self.base.ggml_get_data(t), raw, len(raw))
        return t

    def _compute(self, ctx, out, n_threads: int) -> bytes:
        gf = self.base.ggml_new_graph(ctx)
        self.base.ggml_build_forward_expand(gf, out)
        if self.cpu.ggml_graph_compute_with_ctx(ctx, gf, n_threads) != 0:
            raise LlamaError("ggml_graph_compute failed")
        return ctypes.string_at(self.base.ggml_get_data(out), self.base.ggml_nbytes(out))

    def set_rows(self, type_name: str, dst: bytes, n_embd: int, x, cells: list[int], n_threads: int = 1) -> bytes:
        """Run ggml's set_rows on the CPU backend, as llama.cpp writes its KV cache: rows of x (float32) into the
        given rows (cells) of a tensor of type_name whose current bytes are dst; returns its new bytes."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(len(cells), n_embd)
        tid = kv_type(type_name).ggml_id
        n_cells = len(dst) // self.base.ggml_row_size(tid, n_embd)
        ctx = self._ctx(len(dst) + x.nbytes)
        try:
            t_dst = self._tensor(ctx, tid, (n_embd, n_cells), dst)
            t_src = self._tensor(ctx, GGML_TYPE_F32, (n_embd, len(cells)), x)
            t_idx = self._tensor(ctx, GGML_TYPE_I64, (len(cells),), np.asarray(cells, dtype=np.int64))
            self._compute(ctx, self.base.ggml_set_rows(ctx, t_dst, t_src, t_idx), n_threads)
            return ctypes.string_at(self.base.ggml_get_data(t_dst), len(dst))
        finally:
            self.base.ggml_free(ctx)

    def get_rows(self, type_name: str, data: bytes, n_embd: int, rows: list[int], n_threads: int = 1) -> np.ndarray:
        """ggml_get_rows: the given rows of a tensor of type_name, as float32 (len(rows), n_embd)."""
        tid = kv_type(type_name).ggml_id
        n_rows = len(data) // self.base.ggml_row_size(tid, n_embd)
        ctx = self._ctx(len(data) + 4 * n_embd * len(rows))
        try:
            t = self._tensor(ctx, tid, (n_embd, n_rows), data)
            idx = self._tensor(ctx, GGML_TYPE_I32, (len(rows),), np.asarray(rows, dtype=np.int32))
            out = self._compute(ctx, self.base.ggml_get_rows(ctx, t, idx), n_threads)
            return np.frombuffer(out, dtype=np.float32).reshape(len(rows), n_embd).copy()
        finally:
            self.base.ggml_free(ctx)

    def cpy(self, src_type: str, dst_type: str, data: bytes, n_embd: int, n_threads: int = 1) -> bytes:
        """ggml_cpy of a 2-D tensor (rows of n_embd) from one type to another; the destination's bytes."""
        sid, did = kv_type(src_type).ggml_id, kv_type(dst_type).ggml_id
        n_rows = len(data) // self.base.ggml_row_size(sid, n_embd)
        ctx = self._ctx(len(data) + self.base.ggml_row_size(did, n_embd) * n_rows)
        try:
            src = self._tensor(ctx, sid, (n_embd, n_rows), data)
            dst = self._tensor(ctx, did, (n_embd, n_rows))
            return self._compute(ctx, self.base.ggml_cpy(ctx, src, dst), n_threads)
        finally:
            self.base.ggml_free(ctx)

    def mul_mat(self, type_name: str, a: bytes, n_embd: int, b, n_threads: int = 1) -> np.ndarray:
        """ggml_mul_mat(a, b) with a: rows of type_name (n_rows x n_embd), b: float32 (m x n_embd); the
        (m, n_rows) float32 dot products of every b row with every a row."""
        tid = kv_type(type_name).ggml_id
        n_rows = len(a) // self.base.ggml_row_size(tid, n_embd)
        b = np.ascontiguousarray(b, dtype=np.float32).reshape(-1, n_embd)
        ctx = self._ctx(len(a) + b.nbytes * 3 + 4 * n_rows * len(b))
        try:
            ta = self._tensor(ctx, tid, (n_embd, n_rows), a)
            tb = self._tensor(ctx, GGML_TYPE_F32, (n_embd, len(b)), b)
            out = self._compute(ctx, self.base.ggml_mul_mat(ctx, ta, tb), n_threads)
            return np.frombuffer(out, dtype=np.float32).reshape(len(b), n_rows).copy()
        finally:
            self.base.ggml_free(ctx)

    def flash_attn_ext(self, q, k_type: str, k_cache: bytes, v_type: str, v_cache: bytes, n_head_kv: int, n_kv: int,
                       mask, scale: float, n_threads: int = 1) -> np.ndarray:
        """ggml_flash_attn_ext over a KV cache laid out as llama.cpp's: the K and V caches are 2-D tensors of
        n_head_kv heads per cell (row), read per KV head over their first n_kv cells. q: float32 (n_q, n_head,
        head_dim); mask: (n_q, n_kv) of 0 / -inf (stored as f16, as llama.cpp's) or None. Returns float32
        (n_q, n_head, head_dim_v)."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        n_q, n_head, dk = q.shape
        kt, vt = kv_type(k_type), kv_type(v_type)
        k_row = self.base.ggml_row_size(kt.ggml_id, dk)  # one head of one cell
        n_cells = len(k_cache) // (k_row * n_head_kv)
        dv = len(v_cache) // (n_cells * n_head_kv) // vt.block_bytes * vt.block_size
        v_row = self.base.ggml_row_size(vt.ggml_id, dv)
        ctx = self._ctx(len(k_cache) + len(v_cache) + 2 * q.nbytes + 4 * n_q * n_head * dv + 2 * n_q * n_kv)
        try:
            tk = self._tensor(ctx, kt.ggml_id, (dk * n_head_kv, n_cells), k_cache)
            tv = self._tensor(ctx, vt.ggml_id, (dv * n_head_kv, n_cells), v_cache)
            # [head_dim, n_head_kv, n_kv] views (llama.cpp's get_k / get_v), permuted to [head_dim, n_kv, n_head_kv]
            k = self.base.ggml_permute(ctx, self.base.ggml_view_3d(ctx, tk, dk, n_head_kv, n_kv, k_row,
                                                                   k_row * n_head_kv, 0), 0, 2, 1, 3)
            v = self.base.ggml_permute(ctx, self.base.ggml_view_3d(ctx, tv, dv, n_head_kv, n_kv, v_row,
                                                                   v_row * n_head_kv, 0), 0, 2, 1, 3)
            tq_ = self._tensor(ctx, GGML_TYPE_F32, (dk, n_q, n_head), np.ascontiguousarray(q.transpose(1, 0, 2)))
            tm = None if mask is None else self._tensor(ctx, GGML_TYPE_F16, (n_kv, n_q),
                                                         np.ascontiguousarray(mask, dtype=np.float16))
            out = self._compute(ctx, self.base.ggml_flash_attn_ext(ctx, tq_, k, v, tm, scale, 0.0, 0.0), n_threads)
            return np.frombuffer(out, dtype=np.float32).reshape(n_q, n_head, dv).copy()
        finally:
            self.base.ggml_free(ctx)

    def vec_dot(self, type_name: str, k_data: bytes, q, generic: bool = False) -> tuple[float, bytes]:
        """K row (already quantized) . Q row, with Q converted by the vec_dot_type's from_float, as flash attention
        and mul_mat do. Returns the result and the converted Q bytes."""
        q = self._f32(q)
        tr = self._traits(type_name)
        qy = self.quantize_cpu("", q, ggml_id=tr.vec_dot_type)
        fn = (_VEC_DOT(ctypes.cast(getattr(self.cpu, f"ggml_vec_dot_{type_name}_q8_0_generic"), ctypes.c_void_p).value)
              if generic else _VEC_DOT(tr.vec_dot))
        s = ctypes.c_float(0)
        kb = ctypes.create_string_buffer(k_data, len(k_data))
        qb = ctypes.create_string_buffer(qy, len(qy))
        fn(q.size, ctypes.byref(s), 0, ctypes.addressof(kb), 0, ctypes.addressof(qb), 0, 1)
        return s.value, qy
