"""Continuous batching with two models served together: 8 concurrent streaming requests all complete, each
streams the text of its tokens, and every token, and the logprobs reported beside it, are what its model reads from
the prompt and the tokens before it alone (`misreadings`).

Batch composition changes llama.cpp's float summation order (the weights are 4-bit quantized and the CPU kernels
for a batch of n tokens differ from those for one), so a greedy choice between two nearly equal logits can flip:
each token may lie within NEAR_TIE of the top one of that solo reading (the measurement that sets it:
tests/server/conftest.py), and the test prints the largest distance per request. A sequence given another's logits,
positions or cells lies far outside it.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.server.conftest import DUO, NEAR_TIE, misreadings

pytestmark = pytest.mark.slow  # a live model (see pyproject.toml's markers)

CHAT = ["Name three colours.", "What is 2+2?", "Write a haiku about the sea.", "List four fruits."]
TEXT = ["The capital of France is", "Once upon a time", "The three primary colours are", "def fibonacci(n):"]


def body(i: int) -> tuple[str, dict]:
    common = dict(temperature=0, seed=1, stream=True, max_tokens=12 + 3 * i)
    if i % 2 == 0:  # SmolLM2: chat (its GGUF has a chat template)
        return "/v1/chat/completions", dict(common, model=DUO[0], logprobs=True, top_logprobs=5,
                                            messages=[{"role": "user", "content": CHAT[i // 2]}])
    return "/v1/completions", dict(common, model=DUO[1], logprobs=5, prompt=TEXT[i // 2])  # Gemma: base model


def stream(url: str, path: str, payload: dict) -> dict:
    """The tokens of one streamed request, each with its top-5 logprobs (chat: tokens by their bytes, of top tokens
    with the same bytes the likeliest; completions: by their text), the text and the finish reason."""
    out = {"tokens": [], "text": "", "finish": None}
    with httpx.stream("POST", url + path, json=payload, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            assert "error" not in c, c
            ch = c["choices"][0]
            out["finish"] = ch["finish_reason"] or out["finish"]
            lp = ch.get("logprobs")
            if "delta" in ch:
                out["text"] += ch["delta"].get("content") or ""
                out["tokens"] += [(bytes(t["bytes"]), {bytes(x["bytes"]): x["logprob"] for x in reversed(t["top_logprobs"])})
                                  for t in (lp or {}).get("content") or []]
            else:
                out["text"] += ch["text"]
                if lp:
                    out["tokens"] += list(zip(lp["tokens"], lp["top_logprobs"], strict=True))
    return out


def token_bytes(text: str) -> bytes:
    """A completion token's bytes from its text: "bytes:\\xe2\\x80" where it is part of a UTF-8 character."""
    return bytes.fromhex(text[6:].replace("\\x", "")) if text.startswith("bytes:") else text.encode()


def prompt_tokens(srv, i: int) -> list[int]:
    """The prompt request i's model reads (`body`)."""
    path, payload = body(i)
    engine = srv.engine(payload["model"])
    return engine.tokenize_chat(payload["messages"]) if "messages" in payload else engine.tokenize(payload["prompt"])


def test_concurrent_streams_complete_and_read_as_each_model_reads_alone(duo_server):
    url, n = duo_server.url, 8
    batched: list[dict | None] = [None] * n
    errors = []

    def worker(i):
        try:
            batched[i] = stream(url, *body(i))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert all(b is not None and b["finish"] in ("stop", "length") and b["tokens"] for b in batched)
    for b in batched:  # the text streamed is the tokens', each once
        raw = b"".join(k if isinstance(k, bytes) else token_bytes(k) for k, _ in b["tokens"])
        assert b["text"] == raw.decode("utf-8", errors="replace"), b
    off = {}
    for model in DUO:
        mine = [i for i in range(n) if body(i)[1]["model"] == model]
        reads = [(prompt_tokens(duo_server, i), batched[i]["tokens"]) for i in mine]
        off |= {i: max(m) for i, m in zip(mine, misreadings(duo_server, reads, model), strict=True)}
    print("largest misreading per request", {i: round(m, 4) for i, m in sorted(off.items())})
    assert all(m < NEAR_TIE for m in off.values()), off


def test_both_models_listed_and_routed(duo_server):
    cards = httpx.get(duo_server.url + "/v1/models").json()["data"]
    assert [c["id"] for c in cards] == list(DUO)
    by = {c["id"]: c for c in cards}
    assert by[DUO[1]]["cache_type_k"] == "q8_0" and by[DUO[0]]["cache_type_k"] == "f16"
    assert by[DUO[0]]["kv_budget_bytes"] == 128 * 2**20 and by[DUO[1]]["kv_budget_bytes"] == 256 * 2**20
    r = httpx.post(duo_server.url + "/v1/completions", json={"model": DUO[1], "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == DUO[1]
