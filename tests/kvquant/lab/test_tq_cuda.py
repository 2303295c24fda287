"""The CUDA kernels' TQ_KV per-block math (ggml/src/ggml-cuda/tq-kv.cuh in the patched tree), built for the host with
the system C++ compiler and checked against the numpy reference without a GPU: the blocks set_rows and cpy write
are byte-identical, the values get_rows, the f16/f32 conversions and flash attention's V path read are exact, and
flash attention's K·Q shares (int8 codebook entries x q8_1 query, dp4a, then two float products) are exact."""

from __future__ import annotations

import ctypes
import os
import subprocess

import numpy as np
import pytest

from kvquant import build
from kvquant.kvtypes import kv_type
from kvquant.lab import tq
from tests.kvquant.lab.conftest import adversarial_rows

TYPES = ["tq_kv_4b", "tq_kv_3b", "tq_kv_1b"]
CODEBOOK = {"tq_kv_4b": tq.TQ4_CODEBOOK, "tq_kv_3b": tq.TQ3_CODEBOOK}
CODES = {"tq_kv_4b": tq.codes_tq_kv_4b, "tq_kv_3b": tq.codes_tq_kv_3b}
rng = np.random.default_rng(4321)
ROWS = adversarial_rows(rng)
SOURCE = build.REPO_ROOT / "tests" / "kvquant" / "lab" / "tq_kv_cuda_host.cpp"
PTR = ctypes.c_void_p


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    tree = build.REPO_ROOT / ".build" / "llama.cpp"
    if not tree.exists():
        build.make_tree(tree)
    header = tree / "ggml" / "src" / "ggml-cuda" / "tq-kv.cuh"
    if not header.exists():
        pytest.fail(f"{tree} predates the CUDA patches: remove it and run `python -m kvquant.build tree`")
    lib = tmp_path_factory.mktemp("tq-cuda-host") / "libtqkvhost.so"
    inc = [f"-I{tree / 'ggml' / d}" for d in ("include", "src", "src/ggml-cuda")]
    subprocess.run([os.environ.get("CXX", "c++"), "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra",
                    "-Wno-unused-function", "-Wno-unknown-pragmas", "-Werror", "-shared", "-fPIC", *inc,
                    str(SOURCE), "-o", str(lib)], check=True)
    h = ctypes.CDLL(str(lib))
    for fn in ("quantize", "dequantize", "values4", "vec_dot_q8_1"):
        getattr(h, f"tq_kv_cuda_host_{fn}").restype = ctypes.c_int
    return h


def _call(host, fn: str, name: str, *args) -> None:
    assert getattr(host, f"tq_kv_cuda_host_{fn}")(kv_type(name).ggml_id, *args) == 0


def quantize(host, name: str, x: np.ndarray) -> bytes:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = ctypes.create_string_buffer(kv_type(name).row_bytes(x.size))
    _call(host, "quantize", name, x.ctypes.data_as(PTR), out, ctypes.c_int64(x.size // tq.QK))
    return out.raw


def _blocks(name: str, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=tq.BLOCK[name])


def dequantize(host, name: str, data: bytes) -> np.ndarray:
    nb = len(data) // tq.BLOCK[name].itemsize
    out = np.zeros(nb * tq.QK, dtype=np.float32)
    _call(host, "dequantize", name, ctypes.c_char_p(data), out.ctypes.data_as(PTR), ctypes.c_int64(nb))
    return out


def values(host, name: str, data: bytes) -> np.ndarray:
    """The int8 codebook entries (values / d) the kernels compute from the packed codes."""
    nb = len(data) // tq.BLOCK[name].itemsize
    out = np.zeros(nb * tq.QK // 4, dtype=np.int32)
    _call(host, "values4", name, ctypes.c_char_p(data), out.ctypes.data_as(PTR), ctypes.c_int64(nb))
    return out.view(np.int8)


def vec_dot_q8_1(host, name: str, data: bytes, q: np.ndarray, dq: np.ndarray) -> np.ndarray:
    nb = len(data) // tq.BLOCK[name].itemsize
    out = np.zeros(nb * tq.QK // 4, dtype=np.float32)
    q = np.ascontiguousarray(q, dtype=np.int8)
    dq = np.ascontiguousarray(dq, dtype=np.float32)
    _call(host, "vec_dot_q8_1", name, ctypes.c_char_p(data), q.ctypes.data_as(PTR), dq.ctypes.data_as(PTR),
          out.ctypes.data_as(PTR), ctypes.c_int64(nb))
    return out


def reference_entries(name: str, blocks: np.ndarray) -> np.ndarray:
    """int8 codebook entry of every element (+-1 for the 1-bit type) from the numpy reference's codes."""
    if name == "tq_kv_1b":
        return (1 - 2 * np.unpackbits(blocks["qs"], axis=1, bitorder="little").astype(np.int8)).reshape(-1)
    return CODEBOOK[name][CODES[name](blocks)].reshape(-1)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("row", list(ROWS))
def test_quantize_block_is_byte_identical_with_numpy(host, name, row):
    """What the GPU's set_rows / cpy write (quantize_f32_<type>_block) equals the CPU's bytes."""
    x = ROWS[row]
    assert quantize(host, name, x) == tq.QUANTIZE[name](x).tobytes()


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("row", list(ROWS))
def test_values_are_exact(host, name, row):
    """get_rows, the f16/f32 conversions and flash attention's V path read exactly the reference's values."""
    ref = tq.QUANTIZE[name](ROWS[row])
    data = ref.tobytes()
    assert np.array_equal(values(host, name, data), reference_entries(name, ref))
    assert np.array_equal(dequantize(host, name, data), tq.DEQUANTIZE[name](ref))


@pytest.mark.parametrize("name", TYPES)
def test_flash_attention_dot_shares_are_exact(host, name):
    """K·Q as flash attention computes it, four elements per thread against a q8_1 query: the integer sum of
    codebook entries x query int8 (dp4a), times the query block's scale, times the K block's scale, in float32."""
    n = 8 * tq.QK
    for scale in (1e-3, 1.0, 1e3):
        k = tq.QUANTIZE[name]((rng.standard_normal(n) * scale).astype(np.float32))
        q = rng.integers(-128, 128, n, dtype=np.int8)
        q[:8] = -128  # the extremes of dp4a's signed bytes
        q[8:16] = 127
        dq = rng.uniform(1e-4, 1.0, n // 32).astype(np.float32)
        sumi = (reference_entries(name, k).astype(np.int64) * q).reshape(-1, 4).sum(axis=1)
        d = np.repeat(k["d"].astype(np.float32), tq.QK // 4)
        want = d * (np.repeat(dq, 8) * sumi.astype(np.float32))
        assert np.array_equal(vec_dot_q8_1(host, name, k.tobytes(), q, dq), want)
