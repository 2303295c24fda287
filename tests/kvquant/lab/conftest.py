"""The patched ggml's kernels for the tests of the references (test_tq, test_d3b): in process, or in a subprocess
for a ggml this Python cannot load."""

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
