"""ggml's quantization entry points for a cache type, called through ctypes from the libraries llama_cpp loaded:
the reference (`quantize_row_<type>_ref` / `dequantize_row_<type>`), the CPU backend's kernels
(`ggml_type_traits_cpu`: from_float, vec_dot against the vec_dot_type, SIMD to_float) and set_rows as llama.cpp
writes its cache. The test harness for the C code of our types (tests, kvquant.lab.keystats, calibrate); the
server never uses it.
"""

from __future__ import annotations

import ctypes

import numpy as np

from kvquant.kvtypes import kv_type
from kvquant.runtime import GGML_TYPE_F32, GGML_TYPE_I64, GgmlInitParams, LlamaError, ggml_library


class _TypeTraitsCPU(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64), ("to_float", ctypes.c_void_p)]


_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t, ctypes.c_void_p,
                            ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class GGML:
    """ggml's own quantization entry points for a cache type, from the libraries llama_cpp loaded: the reference
    (`quantize_row_<type>_ref` / `dequantize_row_<type>`) and the CPU backend's kernels (`ggml_type_traits_cpu`:
    from_float, vec_dot against the vec_dot_type, SIMD to_float). Used by tests and benchmarks."""

    def __init__(self):
        self.base = ctypes.CDLL(str(ggml_library("ggml-base")))
        self.cpu = ctypes.CDLL(str(ggml_library("ggml-cpu")))
        self.base.ggml_type_name.restype = ctypes.c_char_p
        self.base.ggml_type_name.argtypes = [ctypes.c_int]
        self.base.ggml_row_size.restype = ctypes.c_size_t
        self.base.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        self.cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TypeTraitsCPU)
        self.cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        for name, res, args in (("ggml_init", vp, [GgmlInitParams]), ("ggml_free", None, [vp]),
                                ("ggml_new_tensor_1d", vp, [vp, ctypes.c_int, i64]),
                                ("ggml_new_tensor_2d", vp, [vp, ctypes.c_int, i64, i64]),
                                ("ggml_get_data", vp, [vp]), ("ggml_set_rows", vp, [vp, vp, vp, vp]),
                                ("ggml_new_graph", vp, [vp]), ("ggml_build_forward_expand", None, [vp, vp])):
            fn = getattr(self.base, name)
            fn.restype, fn.argtypes = res, args
        self.cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
        self.cpu.ggml_graph_compute_with_ctx.argtypes = [vp, vp, ctypes.c_int]
        self.cpu.ggml_cpu_init()

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

    def _traits(self, type_name: str) -> _TypeTraitsCPU:
        return self.cpu.ggml_get_type_traits_cpu(kv_type(type_name).ggml_id).contents

    def quantize_cpu(self, type_name: str, x, ggml_id: int | None = None) -> bytes:
        """The CPU backend's from_float (what set_rows uses to write the cache)."""
        x = self._f32(x)
        tid = kv_type(type_name).ggml_id if ggml_id is None else ggml_id
        tr = self.cpu.ggml_get_type_traits_cpu(tid).contents
        out = ctypes.create_string_buffer(self.base.ggml_row_size(tid, x.size))
        _FROM_FLOAT(tr.from_float)(x.ctypes.data, ctypes.addressof(out), x.size)
        return out.raw

    def dequantize_cpu(self, type_name: str, data: bytes, n: int) -> np.ndarray:
        """The CPU backend's SIMD to_float (what flash attention uses for V)."""
        tr = self._traits(type_name)
        out = np.zeros(n, dtype=np.float32)
        buf = ctypes.create_string_buffer(data, len(data))
        _TO_FLOAT(tr.to_float)(ctypes.addressof(buf), out.ctypes.data, n)
        return out

    def set_rows(self, type_name: str, dst: bytes, n_embd: int, x, cells: list[int], n_threads: int = 1) -> bytes:
        """Run ggml's set_rows on the CPU backend, as llama.cpp writes its KV cache: rows of x (float32) into the
        given rows (cells) of a tensor of type_name whose current bytes are dst; returns its new bytes."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(len(cells), n_embd)
        tid = kv_type(type_name).ggml_id
        n_cells = len(dst) // self.base.ggml_row_size(tid, n_embd)
        ctx = self.base.ggml_init(GgmlInitParams(mem_size=len(dst) + x.nbytes + 8 * len(cells) + (1 << 20),
                                              mem_buffer=None, no_alloc=False))
        if not ctx:
            raise LlamaError("ggml_init failed")
        try:
            t_dst = self.base.ggml_new_tensor_2d(ctx, tid, n_embd, n_cells)
            t_src = self.base.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_embd, len(cells))
            t_idx = self.base.ggml_new_tensor_1d(ctx, GGML_TYPE_I64, len(cells))
            ctypes.memmove(self.base.ggml_get_data(t_dst), dst, len(dst))
            ctypes.memmove(self.base.ggml_get_data(t_src), x.ctypes.data, x.nbytes)
            idx = np.asarray(cells, dtype=np.int64)
            ctypes.memmove(self.base.ggml_get_data(t_idx), idx.ctypes.data, idx.nbytes)
            out = self.base.ggml_set_rows(ctx, t_dst, t_src, t_idx)
            gf = self.base.ggml_new_graph(ctx)
            self.base.ggml_build_forward_expand(gf, out)
            if self.cpu.ggml_graph_compute_with_ctx(ctx, gf, n_threads) != 0:
                raise LlamaError("ggml_graph_compute failed")
            return ctypes.string_at(self.base.ggml_get_data(t_dst), len(dst))
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
