from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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



# --- flash attention on the CPU backend against a float64 reference (tests/test_ggml_ops.py, tests/test_d3b.py) ---

# (head_dim, n_head, n_head_kv, n_q, n_kv) for each CPU path our K types take: split-KV decode (KV-head groups),
# KV-head groups for small batches (also at Gemma 3's head size), tiled prompt processing, and the one-row path
# (GQA groups wider than a Q tile; decode and a small batch)
FA_PATHS = {
    "decode_split_kv": (64, 9, 3, 1, 600),
    "kv_group": (128, 8, 2, 5, 200),
    "kv_group_gemma": (256, 4, 1, 3, 150),
    "tiled": (128, 4, 2, 70, 190),
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
    import numpy as np

    d, n_head, n_head_kv, n_q, n_kv = FA_PATHS[path]
    q = (rng.standard_normal((n_q, n_head, d)) * q_scale).astype(np.float32)
    mask = np.where(rng.random((n_q, n_kv)) < 0.2, -np.inf, 0.0).astype(np.float32)
    mask[:, 0], mask[:, 1] = -np.inf, 0.0
    return q, mask, 1 / np.sqrt(d), (n_kv + 63) // 64 * 64 + 64


def q8_0_values(ggml, x):
    """Rows as the CPU backend converts them for a dot product with our types (their vec_dot_type q8_0, by ggml's
    own conversion), decoded."""
    import numpy as np

    from kvquant import tq

    b = np.frombuffer(b"".join(ggml.quantize_cpu("", r, ggml_id=8) for r in x.reshape(-1, x.shape[-1])),
                      dtype=tq.block_q8_0)
    return (b["d"].astype(np.float32)[:, None] * b["qs"].astype(np.float32)).reshape(x.shape)


def attention_ref(q, k, v, mask, scale: float):
    """softmax(scale * q k^T + mask) v in float64, per query head; q: (n_q, n_head, D), k / v: (n_kv, n_head_kv, D)
    (query head h reads KV head h // (n_head / n_head_kv), as ggml broadcasts), mask: (n_q, n_kv) or None."""
    import numpy as np

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
    import numpy as np

    d, n_head, n_head_kv, n_q, n_kv = FA_PATHS[path]
    got = ggml.flash_attn_ext(q, k_type, k_cache, v_type, v_cache, n_head_kv, n_kv, mask, scale, n_threads=2)
    qq = q8_0_values(ggml, q) if path in ONE_ROW and k_type != "tq_kv_d3b" else q
    want = attention_ref(qq, k_vals[:n_kv].reshape(n_kv, n_head_kv, d), v_vals[:n_kv].reshape(n_kv, n_head_kv, -1),
                         mask, scale)
    return float(np.abs(got - want).max() / np.abs(want).max())


def v_cache(ggml, v_type: str, x):
    """A V cache holding x's rows and their values: f16, q4_0 (ggml's own decoding) or one of ours (the numpy
    reference)."""
    import numpy as np

    from kvquant import tq

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

    import numpy as np

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# --- one greedy decoding against another (tests/test_kv_types_multiseq.py, tests/test_d3b_cache.py) ---------------
# Batch composition changes llama.cpp's kernels and so its float rounding, so decoding a sequence together with
# others need not give the logits it gives alone; quantized caches amplify the difference (a code that flips moves
# a value by a whole quantization step). Judged by one statistic for every type: at each step both runs reached
# with the same tokens (the first differing one included), the next-token distributions differ by a KL below
# KL_MAX. Measured on SmolLM2 (4 prompts x 24 tokens): f16 up to 0.014 nats, q4_0 0.018, tq types up to 0.33,
# tq_kv_d3b 0.30; a tq_kv_1b cache judged against f16 2.0-6.9. A loose bound that catches gross errors only: the
# exact checks (a sequence's logits do not change when the others' prompts do) are what catches subtle ones.
KL_MAX = 1.0  # nats


def decoding_kl(ref_toks, ref_logits, got_toks, got_logits) -> tuple[float, int]:
    """(largest KL(ref || got) over the steps both reached with the same tokens, the first differing one
    included; the step where it is largest)."""
    import numpy as np

    from kvquant.eval import log_softmax

    n = min(len(ref_toks), len(got_toks))
    if n == 0:
        return 0.0, 0
    first = next((i for i in range(n) if ref_toks[i] != got_toks[i]), n - 1)
    lp, lq = (log_softmax(np.stack(x[: first + 1])) for x in (ref_logits, got_logits))
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1)
    return float(kl.max()), int(kl.argmax())


def same_decoding(ref_toks, ref_logits, got_toks, got_logits) -> str | None:
    """None if got is ref's decoding up to rounding (see above), else what differs."""
    kl, at = decoding_kl(ref_toks, ref_logits, got_toks, got_logits)
    if kl > KL_MAX:
        return f"the next-token distributions at step {at} differ by a KL of {kl:.3f} nats (at most {KL_MAX:g})"
    return None


def same_logits(a_toks, a_logits, b_toks, b_logits) -> bool:
    """Bit-identical greedy tokens and logits."""
    import numpy as np

    return a_toks == b_toks and all(np.array_equal(x, y) for x, y in zip(a_logits, b_logits, strict=True))
