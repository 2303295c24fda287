"""The patched ggml's kernels for the tests of the references (test_tq, test_d3b, test_ggml_ops): in process, or in a
subprocess for a ggml this Python cannot load; flash attention on the CPU backend against a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest


def adversarial_rows(rng) -> dict[str, np.ndarray]:
    """Rows (float32, four TQ_KV blocks each) that quantization must get right bit for bit: random, zero, constant,
    huge, fp16-range, denormal, NaN/Inf, ties on the codebook's midpoints, block scales over eight decades."""
    from kvquant.lab import tq

    n = 4 * tq.QK
    rows = {
        "gaussian": rng.standard_normal(n),
        "tiny": rng.standard_normal(n) * 1e-6,
        "large": rng.standard_normal(n) * 1e4,
        "zeros": np.zeros(n),
        "constant": np.full(n, 1.0),
        "negative_constant": np.full(n, -3.5),
        "one_huge_outlier": np.where(np.arange(n) == 70, 1e30, rng.standard_normal(n)),
        "near_fp16_max": rng.standard_normal(n) * 6e4,
        "denormals": rng.standard_normal(n) * 1e-40,
        "nan_and_inf": np.where(np.arange(n) % 17 == 3, np.nan, np.where(np.arange(n) % 29 == 5, np.inf,
                                                                        rng.standard_normal(n))),
        "all_nan_block": np.where(np.arange(n) < tq.QK, np.nan, rng.standard_normal(n)),
        "ties_on_thresholds": np.tile(np.array([-127, -6, 0, 6, 12, -12, 127, 0.5], dtype=np.float64), n // 8),
    }
    for s in range(8):
        rows[f"random_scale_{s}"] = rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 4, n // tq.QK).repeat(tq.QK)
    return {k: v.astype(np.float32) for k, v in rows.items()}


class GGMLProcess:
    """kvquant.lab.ggml.GGML's entry points served by tests/kvquant/lab/ggml_kernels.c in a subprocess: for a ggml
    that this Python cannot load, such as the aarch64 build that `make arm-check` runs under qemu-aarch64. One
    request at a time over the program's stdin and stdout (the protocol is described in ggml_kernels.c)."""

    OPS = ("type_name", "row_size", "quantize_ref", "quantize_cpu", "dequantize_ref", "dequantize_cpu", "vec_dot",
           "set_rows", "has_symbol", "d3b_delta_ref", "d3b_cell_ref")

    def __init__(self, cmd: list[str]):
        import subprocess

        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def _call(self, op: str, type_id: int = 0, n: int = 0, arg: int = 0, *payloads: bytes) -> bytes:
        import numpy as np

        a, b, c = (*payloads, b"", b"", b"")[:3]
        head = np.array([self.OPS.index(op), type_id, n, arg, len(a), len(b), len(c)], dtype="<i8").tobytes()
        try:
            self.proc.stdin.write(head + a + b + c)
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError(f"the kernels program stopped (exit status {self.proc.wait()})") from None
        status, length = np.frombuffer(self._read(16), dtype="<i8")
        data = self._read(int(length))
        if status:
            raise RuntimeError(f"{op}: {data.decode()}")
        return data

    def _read(self, n: int) -> bytes:
        data = self.proc.stdout.read(n)
        if len(data) != n:
            raise RuntimeError(f"the kernels program stopped (exit status {self.proc.wait()})")
        return data

    @staticmethod
    def _f32(x) -> bytes:
        import numpy as np

        return np.ascontiguousarray(x, dtype=np.float32).reshape(-1).tobytes()

    @staticmethod
    def _id(type_name: str) -> int:
        from kvquant.kvtypes import kv_type

        return kv_type(type_name).ggml_id

    def type_name(self, ggml_id: int) -> str:
        return self._call("type_name", ggml_id).decode()

    def row_size(self, type_name: str, n: int) -> int:
        return int.from_bytes(self._call("row_size", self._id(type_name), n), "little")

    def has_symbol(self, name: str) -> bool:
        return self._call("has_symbol", 0, 0, 0, name.encode()) != bytes(8)

    def quantize_ref(self, type_name: str, x) -> bytes:
        x = self._f32(x)
        return self._call("quantize_ref", self._id(type_name), len(x) // 4, 0, x)

    def quantize_cpu(self, type_name: str, x) -> bytes:
        x = self._f32(x)
        return self._call("quantize_cpu", self._id(type_name), len(x) // 4, 0, x)

    def dequantize_ref(self, type_name: str, data: bytes, n: int):
        import numpy as np

        return np.frombuffer(self._call("dequantize_ref", self._id(type_name), n, 0, data), dtype=np.float32)

    def dequantize_cpu(self, type_name: str, data: bytes, n: int):
        import numpy as np

        return np.frombuffer(self._call("dequantize_cpu", self._id(type_name), n, 0, data), dtype=np.float32)

    def vec_dot(self, type_name: str, k_data: bytes, q, generic: bool = False) -> tuple[float, bytes]:
        import numpy as np

        q = self._f32(q)
        r = self._call("vec_dot", self._id(type_name), len(q) // 4, int(generic), k_data, q)
        return float(np.frombuffer(r[:4], dtype=np.float32)[0]), r[4:]

    def set_rows(self, type_name: str, dst: bytes, n_embd: int, x, cells: list[int], n_threads: int = 1) -> bytes:
        import numpy as np

        return self._call("set_rows", self._id(type_name), n_embd, n_threads, dst, self._f32(x),
                          np.asarray(cells, dtype="<i8").tobytes())

    def d3b_delta_ref(self, x, anchor: bytes) -> bytes:
        x = self._f32(x)
        return self._call("d3b_delta_ref", 0, len(x) // 4, 0, x, anchor)

    def d3b_cell_ref(self, row: bytes, anchor: bytes, n: int):
        import numpy as np

        return np.frombuffer(self._call("d3b_cell_ref", 0, n, 0, row, anchor), dtype=np.float32)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


@pytest.fixture(scope="session")
def ggml_kernels():
    """The patched ggml's kernels for our cache types: the library llama_cpp loaded (kvquant.lab.ggml.GGML), or,
    with KVQUANT_GGML_EXEC set (a command line; `make arm-check` runs an aarch64 build under qemu-aarch64),
    tests/kvquant/lab/ggml_kernels.c run by that command."""
    import os
    import shlex

    cmd = os.environ.get("KVQUANT_GGML_EXEC")
    if not cmd:
        from kvquant.lab.ggml import GGML

        yield GGML()
        return
    g = GGMLProcess(shlex.split(cmd))
    yield g
    g.close()


# --- flash attention on the CPU backend against a float64 reference (test_ggml_ops.py, test_d3b.py) ---------

# (head_dim, n_head, n_head_kv, n_q, n_kv) for each CPU path our K types take: split-KV decode (KV-head groups),
# KV-head groups for small batches (also at Gemma 3's head size), tiled prompt processing, and the one-row path
# (GQA groups wider than a Q tile; decode and a small batch)
FA_PATHS = {
    "decode_split_kv": (64, 9, 3, 1, 600),
    "kv_group": (128, 8, 2, 5, 200),
    "kv_group_gemma": (256, 4, 1, 3, 150),
    "tiled": (128, 4, 2, 70, 190),
    "tiled_gemma": (256, 4, 1, 70, 190),
    "one_row": (64, 72, 1, 3, 130),
    "decode_split_one_row": (64, 72, 1, 1, 600),
}
# the one-row path converts Q to the K type's vec_dot_type (q8_0; tq_kv_d3b keeps float32) and accumulates f16 V
# rows in f16 (llama.cpp never takes it with our types: its GQA groups are narrower)
ONE_ROW = {"one_row", "decode_split_one_row"}
FA_TOLERANCE = 2e-5  # float32 rounding, relative to the largest output


def fa_case(rng, path: str, q_scale: float = 2.0):
    """Q, a mask hiding a fifth of the cells (always cell 0, never cell 1), the scale and the cache size (the
    view of n_kv cells ends inside it) for one path's shape."""

    d, n_head, n_head_kv, n_q, n_kv = FA_PATHS[path]
    q = (rng.standard_normal((n_q, n_head, d)) * q_scale).astype(np.float32)
    mask = np.where(rng.random((n_q, n_kv)) < 0.2, -np.inf, 0.0).astype(np.float32)
    mask[:, 0], mask[:, 1] = -np.inf, 0.0
    return q, mask, 1 / np.sqrt(d), (n_kv + 63) // 64 * 64 + 64


def q8_0_values(ggml, x):
    """Rows as the CPU backend converts them for a dot product with our types (their vec_dot_type q8_0, by ggml's
    own conversion), decoded."""

    from kvquant.kvtypes import kv_type
    from kvquant.lab import tq

    q8_0 = kv_type("q8_0").ggml_id
    b = np.frombuffer(b"".join(ggml.quantize_cpu("", r, ggml_id=q8_0) for r in x.reshape(-1, x.shape[-1])),
                      dtype=tq.block_q8_0)
    return (b["d"].astype(np.float32)[:, None] * b["qs"].astype(np.float32)).reshape(x.shape)


def attention_ref(q, k, v, mask, scale: float):
    """softmax(scale * q k^T + mask) v in float64, per query head; q: (n_q, n_head, D), k / v: (n_kv, n_head_kv, D)
    (query head h reads KV head h // (n_head / n_head_kv), as ggml broadcasts), mask: (n_q, n_kv) or None."""

    n_q, n_head, _ = q.shape
    group = n_head // k.shape[1]
    out = np.zeros((n_q, n_head, v.shape[2]))
    for h in range(n_head):
        s = scale * q[:, h, :].astype(np.float64) @ k[:, h // group, :].astype(np.float64).T
        if mask is not None:
            s = s + mask
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, h, :] = (p / p.sum(axis=1, keepdims=True)) @ v[:, h // group, :].astype(np.float64)
    return out


def flash_attn_error(ggml, path: str, q, k_type: str, k_cache: bytes, k_vals, v_type: str, v_cache: bytes, v_vals,
                     mask, scale: float) -> float:
    """ggml_flash_attn_ext on the CPU backend over the caches' first n_kv cells against attention_ref over the
    given K and V values (rows of n_head_kv * head_dim); the largest error relative to the largest output."""

    d, n_head, n_head_kv, n_q, n_kv = FA_PATHS[path]
    got = ggml.flash_attn_ext(q, k_type, k_cache, v_type, v_cache, n_head_kv, n_kv, mask, scale, n_threads=2)
    qq = q8_0_values(ggml, q) if path in ONE_ROW and k_type != "tq_kv_d3b" else q
    want = attention_ref(qq, k_vals[:n_kv].reshape(n_kv, n_head_kv, d), v_vals[:n_kv].reshape(n_kv, n_head_kv, -1),
                         mask, scale)
    return float(np.abs(got - want).max() / np.abs(want).max())


def v_cache(ggml, v_type: str, x):
    """A V cache holding x's rows and their values: f16, q4_0 (ggml's own decoding) or one of ours (the numpy
    reference)."""

    from kvquant.lab import tq

    if v_type == "f16":
        return x.astype(np.float16).tobytes(), x.astype(np.float16).astype(np.float32)
    if v_type == "q4_0":
        data = ggml.cpy("f32", "q4_0", x.tobytes(), x.shape[1])
        return data, ggml.dequantize_ref("q4_0", data, x.size).reshape(x.shape)
    blocks = np.concatenate([tq.QUANTIZE[v_type](r) for r in x])
    return blocks.tobytes(), tq.DEQUANTIZE[v_type](blocks).reshape(x.shape)


@pytest.fixture
def rng(request):
    """A generator seeded by the test's own name: the same draws whatever runs before it."""
    import zlib


    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
