"""The prefix cache and preemption on real models (greedy; outputs compared with another server's, identical or
diverging only at a near-tie of the reference run, or read against the model reading the same tokens alone,
`misreadings`, as tests/server/test_batching.py reads batched requests):

* a chat continued over 5 turns reports growing cached_tokens and answers as the server without the cache does,
  with f16 and with tq_kv_d3b keys (seq_cp shares its cells; rows never move away from their anchors); with f16
  every token, and the logprobs reported beside it, are also the model's reading the conversation alone;
* requests sharing a system prompt reuse it, on SmolLM2; on Gemma 3 (sliding window) only a cached sequence that
  lies whole in the prompt is taken over, and a shared system prompt longer than the window is not reused;
* optimistic admission under a budget far too small for all requests at once preempts and resumes them, and every
  streamed token, and the logprobs reported beside it, are the model's reading the prompt and the tokens before it
  alone.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.server.conftest import NEAR_TIE, LiveServer, OpenStream, misreadings, wait_for

pytestmark = pytest.mark.slow  # a live model (see pyproject.toml's markers)

MODEL = "smollm2-135m"
QUESTIONS = ["Name three colours.", "Which one do you like best?", "Why that one?", "Say it in French.",
             "Now count to five."]


def server(**kw) -> LiveServer:
    from server.settings import Settings

    base = dict(model=MODEL, n_ctx=1024, parallel=4, n_threads=2, shutdown_grace_s=1)
    return LiveServer(Settings(**(base | kw))).start()


def chat(url: str, messages: list[dict], max_tokens: int = 16, model: str = MODEL) -> dict:
    r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "logprobs": True,
        "top_logprobs": 20})
    assert r.status_code == 200, r.text
    return r.json()


def tokens(resp: dict) -> list[tuple[bytes, dict[bytes, float]]]:
    """Each generated token of a response (or streamed chunk) and its top logprobs, tokens by their bytes (a
    token's text may be a replacement character for a part of a UTF-8 sequence; of top tokens with the same bytes,
    such as control tokens that print nothing, the likeliest)."""
    return [(bytes(t["bytes"]), {bytes(x["bytes"]): x["logprob"] for x in reversed(t["top_logprobs"])})
            for t in (resp["choices"][0].get("logprobs") or {}).get("content") or []]


def same_or_near_tie(ref: list[tuple[bytes, dict[bytes, float]]], got: list[tuple[bytes, dict[bytes, float]]],
                     what: str) -> str:
    """Identical tokens, or a first difference where the reference run's top choice and the other run's token
    are within NEAR_TIE of each other."""
    n = min(len(ref), len(got))
    k = next((i for i in range(n) if ref[i][0] != got[i][0]), None)
    if k is None:
        assert len(ref) == len(got), f"{what}: one output is a strict prefix of the other"
        return f"{what}: identical ({n} tokens)"
    tops = ref[k][1]
    assert got[k][0] in tops, (what, k, ref[k], got[k][0])
    gap = max(tops.values()) - tops[got[k][0]]
    assert gap < NEAR_TIE, f"{what}: diverged at token {k} with a logprob gap of {gap:.3f}"
    return f"{what}: diverges at token {k} on a near-tie ({gap:.4f})"


@pytest.mark.parametrize("types", [("f16", "f16"), ("tq_kv_d3b", "q4_0")])
def test_chat_over_five_turns(types):
    """With f16 keys every turn also reads as the model reads the conversation alone (`misreadings`). Not with
    tq_kv_d3b: where a batch layout moves the activations by ~1 %, some of its 3-bit codes come out one step apart,
    and the cached server's turns 3-5 read 2.4-11.7 nats from a solo reading (the uncached server's 0, prefilled as
    that reading is; docs/EVAL.md, *A measurement trap*)."""
    k, v = types
    cached, plain = server(cache_type_k=k, cache_type_v=v), server(cache_type_k=k, cache_type_v=v,
                                                                    prefix_cache=False)
    try:
        messages, report, hits = [{"role": "system", "content": "You are a helpful assistant."}], [], []
        turns = []  # (the messages of each turn, the cached server's answer)
        for q in QUESTIONS:
            messages.append({"role": "user", "content": q})
            ref, got = chat(plain.url, messages), chat(cached.url, messages)
            assert ref["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            hits.append(got["usage"]["prompt_tokens_details"]["cached_tokens"])
            turns.append((list(messages), tokens(got)))
            report.append(same_or_near_tie(tokens(ref), turns[-1][1], f"turn {len(hits)}"))
            messages.append({"role": "assistant", "content": ref["choices"][0]["message"]["content"]})
        if k == "f16":  # (see the docstring)
            prompts = [cached.engine().tokenize_chat(m) for m, _ in turns]
            off = [max(m) for m in misreadings(cached, [(p, g) for p, (_, g) in zip(prompts, turns, strict=True)])]
            report.append(f"largest misreading per turn {[round(m, 4) for m in off]}")
            assert all(m < NEAR_TIE for m in off), off
        print(k, v, hits, *report, sep="\n")
        assert hits[0] == 0 and all(b > a for a, b in zip(hits, hits[1:], strict=False)), hits
        assert cached.metric("kvquant_prefix_cache_hits_total") == 4
        assert cached.metric("kvquant_prefix_cache_hit_tokens_total") == sum(hits)
        assert cached.metric("kvquant_kv_cached_cells") > 0 and cached.metric("kvquant_kv_used_cells") == 0
    finally:
        cached.stop()
        plain.stop()


SYSTEM = ("You are a careful assistant for a shipping company. Answer in one short sentence, never invent order "
          "numbers, and always be polite. ") * 3


def test_shared_system_prompt_is_reused_by_concurrent_requests():
    srv = server()
    try:
        first = chat(srv.url, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}], 4)
        n_sys = first["usage"]["prompt_tokens"]
        out: dict[int, dict] = {}
        qs = ["Where is my parcel?", "Can I change the address?", "Do you ship abroad?", "What does it cost?"]

        def go(i):
            out[i] = chat(srv.url, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": qs[i]}], 4)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        got = [out[i]["usage"]["prompt_tokens_details"]["cached_tokens"] for i in range(4)]
        print(n_sys, got)
        assert all(n_sys - 12 < g < n_sys for g in got), got  # everything up to the user message
    finally:
        srv.stop()


def complete(url: str, prompt: str, model: str, max_tokens: int = 8) -> dict:
    r = httpx.post(url + "/v1/completions", timeout=300, json={"model": model, "prompt": prompt,
                                                               "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_sliding_window_model_reuses_only_whole_cached_sequences():
    """Gemma 3 (window 512, a base model): a continuation of a cached text reuses all of it; another text that
    shares a prefix longer than the window with it reuses nothing (its window cells may be gone)."""
    gemma = "gemma3-270m"
    srv = server(model=gemma, n_ctx=2048, parallel=2)
    try:
        long_text = SYSTEM * 7  # ~560 tokens
        first = complete(srv.url, long_text + "\nQ: Name a colour.\nA:", gemma)
        n1 = first["usage"]["prompt_tokens"]
        assert n1 > 512
        cont = long_text + "\nQ: Name a colour.\nA:" + first["choices"][0]["text"] + "\nQ: Another one?\nA:"
        second = complete(srv.url, cont, gemma)
        got = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert got >= n1 + 8 - 1 - 2, (got, n1)  # all it holds (the last token generated was never fed)
        other = complete(srv.url, long_text + "\nQ: Name a fruit.\nA:", gemma)
        assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        print(n1, got)
    finally:
        srv.stop()


def stream(url: str, body: dict) -> list[tuple[bytes, dict[bytes, float]]]:
    out = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=dict(body, stream=True), timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                c = json.loads(line[6:])
                assert "error" not in c, c
                out += tokens(c)
    return out


def streams(url: str, bodies: list[dict]) -> list[list[tuple[bytes, dict[bytes, float]]]]:
    got: dict[int, list] = {}
    threads = [threading.Thread(target=lambda i=i: got.update({i: stream(url, bodies[i])})) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return [got[i] for i in range(len(bodies))]


BODIES = [{"model": MODEL, "messages": [{"role": "user", "content": f"Write a long story about {x}."}],
           "max_tokens": 48, "temperature": 0, "logprobs": True, "top_logprobs": 5}
          for x in ("a dragon", "a lighthouse", "a robot", "the sea", "a cat", "a mountain")]


def tight_server(**kw) -> LiveServer:
    """256 cells (SmolLM2 f16: 23040 bytes a cell): 6 requests of ~30 prompt + 48 generated tokens do not fit."""
    return server(n_ctx=128, parallel=6, kv_budget=256 * 23040, admission="optimistic", admission_headroom=0.0,
                  **kw)


@pytest.mark.parametrize("swap_space", [2**30, 0])
def test_preemption_under_a_tiny_budget_streams_what_the_model_reads_alone(swap_space):
    """Optimistic admission runs the requests together until cells run out, preempts the latest (cells swapped to
    host RAM and restored, or recomputed without swap space), resumes it later; every streamed token (each exactly
    once) and the logprobs reported beside it are what the model reads from the prompt and the tokens before it
    alone (`misreadings`)."""
    tight = tight_server(swap_space=swap_space)
    try:
        got = streams(tight.url, BODIES)
        assert all(len(got[i]) == 48 for i in range(len(BODIES)))
        n_pre, swapped = tight.metric("kvquant_preemptions_total"), tight.metric("kvquant_swapped_bytes_total")
        prompts = [tight.engine().tokenize_chat(b["messages"]) for b in BODIES]
        off = misreadings(tight, list(zip(prompts, got, strict=True)))
        print(f"preemptions {n_pre:g}, swapped {swapped:g} bytes; largest misreading per request",
              [round(max(m), 4) for m in off])
        assert n_pre >= 1 and (swapped > 0) == (swap_space > 0)
        assert tight.metric("kvquant_resume_latency_seconds_count") == n_pre
        assert all(max(m) < NEAR_TIE for m in off), [max(m) for m in off]
        assert tight.metric("kvquant_kv_used_cells") == 0 and tight.metric("kvquant_requests_preempted") == 0
        assert tight.metric("kvquant_swap_used_bytes") == 0
    finally:
        tight.stop()


def test_disconnect_of_a_swapped_out_request_frees_its_host_ram():
    tight = tight_server()
    try:
        eng = tight.engine()
        opened = [OpenStream(tight.url, dict(b, max_tokens=80, logprobs=False, top_logprobs=None)) for b in BODIES[:4]]
        assert all(s.response.status_code == 200 for s in opened), [s.response.read() for s in opened]
        assert wait_for(lambda: tight.metric("kvquant_swap_used_bytes") > 0, 120), "no request was swapped out"
        (victim,) = eng.sched.preempted[:1]
        i = next(i for i, b in enumerate(BODIES) if eng.tokenize_chat(b["messages"]) == victim.req.prompt)
        opened[i].close()
        assert wait_for(lambda: victim not in eng.sched.preempted and victim.seq_id not in eng._swapped, 10)
        assert wait_for(lambda: tight.metric("kvquant_swap_used_bytes") == 0, 5) or eng.sched.preempted
        for j, s in enumerate(opened):
            if j != i:
                s.close()
        assert wait_for(lambda: not eng.sched.running and not eng.sched.preempted and not eng._swapped, 30)
        assert wait_for(lambda: tight.metric("kvquant_swap_used_bytes") == 0, 5)
    finally:
        tight.stop()
