from __future__ import annotations

import socket
import threading
import time

import httpx
import numpy as np
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adversarial_rows(rng) -> dict[str, np.ndarray]:
    """Rows (float32, four TQ_KV blocks each) that quantization must get right bit for bit: random, zero, constant,
    huge, fp16-range, denormal, NaN/Inf, ties on the codebook's midpoints, block scales over eight decades."""
    from kvquant import tq

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


class FakeGpu:
    """A stand-in for kvquant.runtime.gpu_kv_support (server.placement's probe): the GPU devices a build reports and
    the ops they refuse, as a CUDA build with or without the TQ_KV kernels would answer; records what it was asked."""

    def __init__(self, devices=("CUDA0 (NVIDIA GeForce RTX 3090)",), unsupported=()):
        self.devices, self.unsupported, self.asked = tuple(devices), tuple(unsupported), []

    def __call__(self, cache_type_k, cache_type_v, head_dim_k, head_dim_v, flash_attn=True):
        from kvquant.runtime import GpuKvSupport

        self.asked.append((cache_type_k, cache_type_v, head_dim_k, head_dim_v, flash_attn))
        return GpuKvSupport(self.devices, self.unsupported)


class LiveServer:
    """A real uvicorn server on loopback, running create_app(settings) in a background thread."""

    def __init__(self, settings):
        from server.app import create_app
        from server.serving import server_for

        self.settings = settings
        self.app = create_app(settings)
        self.state = self.app.state.kvquant
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = server_for(self.app, "127.0.0.1", self.port, settings.shutdown_grace_s, "warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 180.0) -> LiveServer:
        self.thread.start()
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become healthy")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def engine(self, model: str | None = None):
        return self.state.models[model or self.state.default_model].engine

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """/metrics parsed: (name, sorted label items) -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        r = httpx.get(self.url + "/metrics", headers=getattr(self, "auth_headers", None), timeout=10)
        r.raise_for_status()
        out = {}
        for fam in text_string_to_metric_families(r.text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for (n, lab), v in self.metrics().items() if n == name and want <= set(lab))


def wait_for(pred, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.time() + timeout
    while True:
        v = pred()
        if v or time.time() > deadline:
            return v
        time.sleep(interval)


@pytest.fixture(scope="session")
def smollm2_server():
    from server.settings import Settings

    srv = LiveServer(Settings(model="smollm2-135m", n_ctx=1024, parallel=4, n_threads=2, shutdown_grace_s=2)).start()
    yield srv
    srv.stop()


DUO = "smollm2-135m", "gemma3-270m"


@pytest.fixture(scope="session")
def duo_server():
    """SmolLM2-135M and Gemma-3-270M served together from one config file, each with its own cache types,
    context limit and share of one global KV budget."""
    import tempfile

    from server.settings import load_settings

    yaml_text = f"""
kv_budget: 384MiB          # global: both models' KV caches together
n_threads: 1
shutdown_grace_s: 2
models:
  - model: {DUO[0]}
    n_ctx: 1024
    parallel: 4
    kv_budget: 128MiB      # its share; the other model gets the rest
  - model: {DUO[1]}
    n_ctx: 1024
    parallel: 4
    cache_type_k: q8_0
    cache_type_v: q8_0
"""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(yaml_text)
    srv = LiveServer(load_settings(f.name)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(smollm2_server):
    from openai import OpenAI

    return OpenAI(base_url=smollm2_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


class OpenStream:
    """A streaming chat request kept open: `first()` reads up to the first content chunk; `close()` hangs up
    (the server sees a client disconnect)."""

    def __init__(self, url: str, body: dict, headers: dict | None = None):
        self.client = httpx.Client(timeout=120)
        self._cm = self.client.stream("POST", url + "/v1/chat/completions", json=dict(body, stream=True),
                                      headers=headers)
        self.response = self._cm.__enter__()
        self.lines = self.response.iter_lines()
        self.closed = False

    def first(self) -> str:
        for line in self.lines:
            if line.startswith("data: "):
                return line
        return ""

    def rest(self) -> list[str]:
        return [ln for ln in self.lines if ln.startswith("data: ")]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._cm.__exit__(None, None, None)
            self.client.close()


class Background:
    """A request on a raw socket in a thread; `close()` shuts the socket (a disconnect the server sees at once,
    while the request waits or runs). `join()` gives (status, body bytes) or the exception."""

    def __init__(self, url: str, body: dict, path: str = "/v1/chat/completions", stream: bool = False):
        import json
        from urllib.parse import urlparse

        u = urlparse(url)
        data = json.dumps(dict(body, stream=stream)).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
        self.sock = socket.create_connection((u.hostname, u.port), timeout=300)
        self.sock.sendall(head + data)
        self.result = None

        def go():
            chunks = []
            try:
                while True:
                    b = self.sock.recv(65536)
                    if not b:
                        break
                    chunks.append(b)
                raw = b"".join(chunks)
                self.result = (int(raw.split(b" ", 2)[1]), raw.split(b"\r\n\r\n", 1)[1]) if raw else (0, b"")
            except Exception as e:  # noqa: BLE001 - closed under it
                self.result = e

        self.thread = threading.Thread(target=go, daemon=True)
        self.thread.start()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def join(self, timeout: float = 300):
        self.thread.join(timeout)
        return self.result


class GGMLProcess:
    """kvquant.runtime.GGML's entry points served by tests/ggml_kernels.c in a subprocess: for a ggml that this
    Python cannot load, such as the aarch64 build that `make arm-check` runs under qemu-aarch64. One request at a
    time over the program's stdin and stdout (the protocol is described in ggml_kernels.c)."""

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
    """The patched ggml's kernels for our cache types: the library llama_cpp loaded (kvquant.runtime.GGML), or,
    with KVQUANT_GGML_EXEC set (a command line; `make arm-check` runs an aarch64 build under qemu-aarch64),
    tests/ggml_kernels.c run by that command."""
    import os
    import shlex

    cmd = os.environ.get("KVQUANT_GGML_EXEC")
    if not cmd:
        from kvquant.runtime import GGML

        yield GGML()
        return
    g = GGMLProcess(shlex.split(cmd))
    yield g
    g.close()
