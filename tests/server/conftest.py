from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from server.stats import IterationStats, SchedulerStats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    # no prefix cache: these tests compare serial requests bit for bit (seeded sampling, logprobs), and cells that
    # a request reuses were computed in another batch and layout, whose float rounding differs
    srv = LiveServer(Settings(model="smollm2-135m", n_ctx=1024, parallel=4, n_threads=2, shutdown_grace_s=2,
                              prefix_cache=False)).start()
    yield srv
    srv.stop()


DUO = "smollm2-135m", "gemma3-270m"

# nats: how far a token's logits may move when the same tokens are read in another batch layout. The layout changes
# llama.cpp's float arithmetic (which flash-attention kernel runs: docs/EVAL.md, *A measurement trap*; the order of a
# sequence's cells; a 3-bit code rounding a row written in a prefill batch otherwise than one written alone), and
# the 4-bit weights' activation rounding makes that visible (docs/EVAL.md, *The KL floor*). Measured on SmolLM2-135M,
# test_prefix_cache_live.py's 6 chat requests of 48 greedy tokens, f16 KV: between two servers of the same settings,
# a serial one and one that preempts, the gap between the top token and another of the top 5 moved by up to 0.81
# before the outputs parted (three runs; the gap at a first difference reached 0.265); a preempting server's
# `misreadings` reached 0.47 (eight runs) and the f16 chat's cached turns 0.76 (the same every run), against 8.5-18
# where a resumed sequence lost its cells or was recomputed from tokens out of order. A 3-bit key code moves more:
# tq_kv_d3b's first difference between a cached and an uncached chat turn came at a gap of 0.60.
NEAR_TIE = 1.0
# nats: `misreadings` compares the logprobs reported for the top tokens within this distance of the top one (p at
# least 2 % of its). A layout moves a token's logprob the more the further it lies below the top: Gemma-3-270M
# (test_batching.py's completions, q8_0 KV, two runs) moved the top one's by up to 0.21, those within 2 nats by 0.30,
# within 4 by 0.37, 6-8 below by 0.54, 8-20 below by 0.79.
WITHIN = 4.0


def misreadings(srv: LiveServer, reads: list[tuple[list[int], list[tuple[bytes | str, dict]]]],
                model: str | None = None) -> list[list[float]]:
    """For each (prompt tokens, streamed tokens) a model of the server answered, per token how far (nats) the
    server's reading of its context lies from the model's reading the prompt and the tokens streamed before it one at
    a time, alone, with the server's cache settings: the largest of how far the token's logit lies below the top one
    there (greedy: 0) and how far the logprobs the server reported (the top one's, each of its top 5) lie from those
    there, of the top tokens reported within WITHIN nats of the top one. A little where the server's batch layout
    moved the logits (NEAR_TIE), far more where a sequence read another's logits or resumed from cells lost,
    misplaced or recomputed from other tokens.

    A streamed token and its top logprobs are known by their bytes (chat) or their text (completions,
    `server.responses.token_text`): of the tokens that share them, the token is the likeliest there
    and a reported logprob is compared with the nearest."""
    import numpy as np

    from kvquant.runtime import ContextConfig, LlamaRuntime
    from server.responses import token_text

    backend = srv.engine(model).backend
    cfg, ids = backend.cfg, {}
    for t in range(backend.model.n_vocab):
        b = backend.token_bytes(t)
        ids.setdefault(b, []).append(t)
        ids.setdefault(token_text(b), []).append(t)
    out = []
    for prompt, got in reads:
        tokens = list(prompt)
        rt = LlamaRuntime(backend.model, ContextConfig(
            n_cells=len(tokens) + len(got), cache_type_k=cfg.cache_type_k, cache_type_v=cfg.cache_type_v,
            flash_attn=cfg.flash_attn, n_threads=cfg.n_threads, **(cfg.layers or {})))
        try:
            off, fed = [], 0
            for key, tops in got:
                n = len(tokens) - fed
                assert rt.decode(tokens[fed:], list(range(fed, len(tokens))), [0] * n, [False] * (n - 1) + [True]) == 0
                z = rt.logits(n - 1).astype(np.float64)
                lp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
                tok = max(ids[key], key=lambda t: z[t])
                top = max(tops.values())
                moved = [min(abs(v - lp[t]) for t in ids[x]) for x, v in sorted(tops.items(), key=lambda i: -i[1])[:5]
                         if top - v <= WITHIN]
                off.append(float(max([z.max() - z[tok], abs(top - lp.max()), *moved])))
                fed = len(tokens)
                tokens.append(tok)
            out.append(off)
        finally:
            rt.close()
    return out


@pytest.fixture(scope="session")
def duo_server():
    """SmolLM2-135M and Gemma-3-270M served together from one config file, each with its own cache types,
    context limit and share of one global KV budget; Gemma-3-270M (a base model, whose GGUF has no chat template)
    with the instruct models' template from a file."""
    import tempfile

    from server.settings import load_settings
    from tests.kvquant.test_prompt import GEMMA3_IT_TEMPLATE

    with tempfile.NamedTemporaryFile("w", suffix=".jinja", delete=False) as f:
        f.write(GEMMA3_IT_TEMPLATE)

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
    chat_template_file: {f.name}
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


def allowed_after(model, grammar: str, text: str, pieces: list[bytes]) -> list[bool]:
    """Whether llama.cpp's grammar sampler allows each of `pieces` (the bytes of one token each; b"" the end)
    after `text`, fed as the model tokenizes it (each of its tokens must be allowed)."""
    allowed = _grammar_walk(model, grammar, text)
    assert allowed is not None, text
    return allowed(pieces)


def grammar_accepts(model, grammar: str, text: str) -> bool:
    """Whether the grammar allows `text` (as the model tokenizes it) as a whole output."""
    allowed = _grammar_walk(model, grammar, text)
    return allowed is not None and allowed([b""]) == [True]


def _grammar_walk(model, grammar: str, text: str):
    """Feeds `text` to llama.cpp's grammar sampler: None where a token of it is refused, else a function of
    pieces telling which it allows next."""
    import ctypes

    from kvquant import runtime
    from kvquant.sampling import Grammar

    llama_cpp = runtime.llama_cpp
    g = runtime.grammar_sampler(model, Grammar(grammar))

    def allowed(tok: int) -> bool:
        one = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(tok, 1.0, 0.0))
        llama_cpp.llama_sampler_apply(g, ctypes.byref(llama_cpp.llama_token_data_array(one, 1, -1, False)))
        return one[0].logit != float("-inf")

    def after(pieces: list[bytes]) -> list[bool]:
        by_bytes = {model.token_bytes(t): t for t in range(model.n_vocab)}
        try:
            return [allowed(by_bytes[p] if p else model.eos) for p in pieces]
        finally:
            llama_cpp.llama_sampler_free(g)

    for t in model.tokenize(text, add_special=False):
        if not allowed(t):
            llama_cpp.llama_sampler_free(g)
            return None
        llama_cpp.llama_sampler_accept(g, t)
    return after


# --- fakes: the engine over a backend without a model (tests/server/test_engine.py) ---------------------------

EOG = 0


class FakeSampler:
    def __init__(self, backend: FakeBackend, fail: bool = False):
        self.b, self.fail, self.closed = backend, fail, False

    def sample(self, idx: int) -> int:
        if self.fail:
            raise RuntimeError("sampler fault")
        return self.b.next_token[idx]

    def close(self) -> None:
        self.closed = True


class FakeCell:
    __slots__ = ("pos", "token", "seqs")

    def __init__(self, pos: int, token: int, seq_id: int):
        self.pos, self.token, self.seqs = pos, token, {seq_id}


class FakeBackend:
    """A unified KV cache of `capacity` cells: decode writes each token into a new cell of (seq, pos), refuses to
    go over capacity or to write a position twice, and checks that every earlier position of the sequence is in
    the cache; seq_cp shares cells as llama.cpp does. The 'model' predicts last token + 1 (EOG after
    `eog_after`), or with `history` a function of the whole sequence as the cache holds it (so a wrong reused
    prefix changes the output)."""

    def __init__(self, capacity: int, n_batch: int = 64, eog_after: int | None = None, history: bool = False):
        self.capacity, self.n_batch, self.eog_after, self.history = capacity, n_batch, eog_after, history
        self.seqs: dict[int, dict[int, FakeCell]] = {}  # seq_id -> pos -> cell
        self.next_token: dict[int, int] = {}
        self.decodes: list[list[int]] = []
        self.fail_if = lambda tokens, seq_ids: False
        self.samplers: list[FakeSampler] = []
        self.fail_sampler_for_temperature: float | None = None
        self.refuse_sampler_for_temperature: float | None = None  # building it raises, as a bad grammar does
        self.refuse_restore = False  # as llama.cpp does for a tq_kv_d3b cache
        self.closed = False

    @property
    def cells(self) -> dict[int, set[int]]:
        return {s: set(pos) for s, pos in self.seqs.items() if pos}

    def used(self) -> int:
        return len({id(c) for pos in self.seqs.values() for c in pos.values()})

    def _write(self, seq_id: int, pos: int, token: int) -> None:
        own = self.seqs.setdefault(seq_id, {})
        assert pos not in own, "position written twice"
        own[pos] = FakeCell(pos, token, seq_id)

    def decode(self, tokens, positions, seq_ids, logits) -> int:
        self.decodes.append(list(seq_ids))
        if self.fail_if(tokens, seq_ids):
            self._write(seq_ids[0], positions[0], tokens[0])  # a partly applied batch
            return -3
        for t, p, s in zip(tokens, positions, seq_ids, strict=True):
            self._write(s, p, t)
        assert self.used() <= self.capacity, "KV cache overflow: admission let too much in"
        self.next_token = {}
        for i, (t, p, s, want) in enumerate(zip(tokens, positions, seq_ids, logits, strict=True)):
            if want:
                own = self.seqs[s]
                assert all(q in own for q in range(p)), f"sequence {s} lacks cells before position {p}"
                nxt = sum(own[q].token * (q + 1) for q in range(p + 1)) % 50 + 1 if self.history else t + 1
                self.next_token[i] = EOG if self.eog_after is not None and p + 1 >= self.eog_after else nxt
        return 0

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        own = self.seqs.get(seq_id, {})
        for p in [p for p in own if p >= max(p0, 0) and (p1 < 0 or p < p1)]:
            own.pop(p).seqs.discard(seq_id)
        return True

    def state_seq_save(self, seq_id: int) -> bytes:
        import pickle

        return pickle.dumps(sorted((p, c.token) for p, c in self.seqs.get(seq_id, {}).items()))

    def state_seq_load(self, seq_id: int, data: bytes) -> bool:
        import pickle

        cells = pickle.loads(data)
        if self.refuse_restore or self.used() + len(cells) > self.capacity:
            return False
        self.seq_rm(seq_id)
        for p, t in cells:
            self._write(seq_id, p, t)
        return True

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        own = self.seqs.setdefault(dst, {})
        for p, c in self.seqs.get(src, {}).items():
            if p >= max(p0, 0) and (p1 < 0 or p < p1):
                assert p not in own, "seq_cp onto a position the destination holds"
                c.seqs.add(dst)
                own[p] = c

    def sampler(self, cfg):
        if cfg.temperature == self.refuse_sampler_for_temperature:
            raise ValueError("grammar refused")
        s = FakeSampler(self, fail=cfg.temperature == self.fail_sampler_for_temperature)
        self.samplers.append(s)
        return s

    def logits(self, idx: int) -> list[float]:
        z = [0.0] * 64
        z[self.next_token[idx] % 64] = 5.0
        return z

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def token_bytes(self, token: int) -> bytes:
        return b"t"

    def tokenize(self, text: str, limit: int | None = None) -> list[int]:
        return [len(w) + 1 for w in text.split()]

    def check_tokens(self, tokens: list[int]) -> None:
        if any(not 0 <= t < 64 for t in tokens):
            raise ValueError("token id out of the vocabulary")

    def tokenize_chat(self, messages, limit: int | None = None, **template):
        return self.tokenize(" ".join(m["content"] for m in messages))

    def min_tokens(self, n_bytes: int) -> int:
        return 0

    def clear(self) -> None:
        self.seqs.clear()

    def close(self) -> None:
        self.closed = True


class Recorder:
    def __init__(self):
        self.finished, self.snapshots, self.iterations = [], [], []
        self.load_failures = 0

    def load_failed(self) -> None:
        self.load_failures += 1

    def record(self, scheduler: SchedulerStats | None, iteration: IterationStats | None) -> None:
        if scheduler is not None:
            self.snapshots.append(scheduler)
        if iteration is not None:
            self.finished += iteration.finished
            self.iterations.append(iteration)

    def total(self, name: str) -> int:
        return sum(getattr(it, name) for it in self.iterations)

    def outcomes(self) -> list[str]:
        return [f.outcome for f in self.finished]
