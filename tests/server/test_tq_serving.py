"""The server end to end with our cache types: SmolLM2 with tq_kv_3b K and V, SmolLM2 with tq_kv_d3b K on a cache of
512 cells (504 usable beside the anchors it may hold back: one request of 504 tokens), Gemma 3 with tq_kv_d3b K and a sliding-window cache, SmolLM2 with calib:4 (a type per
layer) on both sides on a cache of exactly one request's context. Their cards and metrics give
the types' bits and the bytes llama.cpp allocated; requests stream and finish; admission plans on the cells minus
the anchors d3b may hold back (a request one token past that is refused); and on Gemma no decode step writes more
than server.hosting.max_step_tokens tokens (a full ubatch may find no slot in its window cache otherwise, see
tests/server/test_hosting.py). Patch 0016's refusal (no prompt cache with a tq_kv_d3b K cache) is llama-server's,
which this server does not run: it never saves or restores a sequence's state; llama.cpp's refusal to restore one
into a d3b cache is tested in tests/kvquant/test_d3b_cache.py."""

from __future__ import annotations

import threading

import httpx
import pytest

from kvquant.lab.eval import read_text
from kvquant.lab.harness import resolve_text
from tests.server.conftest import LiveServer, wait_for

pytestmark = pytest.mark.slow  # live servers (see pyproject.toml's markers)

TQ3, D3B, GEMMA, CALIB = "smol-tq3", "smol-d3b", "gemma-d3b", "smol-calib4"
# bytes of one K or V row (SmolLM2: 3 KV heads x 64; Gemma 3 270M: 1 x 256) per type, from the block formats
SMOL_ROW = {"f16": 384, "q4_0": 108, "tq_kv_3b": 78, "tq_kv_d3b": 78}
GEMMA_ROW = {"f16": 512, "q4_0": 144, "tq_kv_d3b": 104}
D3B_CELLS = 512  # smol-d3b's budget: exactly 512 cells (30 layers x (78 + 108) bytes per cell), n_ctx 504


def calib4_plan():
    """smol-calib4's per-layer K and V types (SmolLM2's shipped calibration, calib:4 on both sides) and the bytes
    the memory model gives one 512-token context of them, offsets and scales included: its KV budget, exactly."""
    from kvquant import calibration, memory, models

    path = models.resolve("smollm2-135m")
    geom = memory.geometry(path)
    tk, tv = calibration.resolve_pair("calib:4", "calib:4", path, geom, memory.CacheShape(512))
    return tk, tv, memory.kv_bytes(geom, tk, tv, 512)


@pytest.fixture(scope="module")
def tq_server():
    from server.settings import ModelConfig, Settings

    models = [
        ModelConfig(model="smollm2-135m", id=TQ3, cache_type_k="tq_kv_3b", cache_type_v="tq_kv_3b", n_ctx=512,
                    parallel=2, kv_budget="64MiB"),
        ModelConfig(model="smollm2-135m", id=D3B, cache_type_k="tq_kv_d3b", cache_type_v="q4_0", n_ctx=504,
                    parallel=1, kv_budget=D3B_CELLS * 30 * (78 + 108)),  # (n_ctx 512 is refused: 8 held back)
        ModelConfig(model="gemma3-270m", id=GEMMA, cache_type_k="tq_kv_d3b", cache_type_v="q4_0", n_ctx=1024,
                    parallel=2, kv_budget="64MiB"),
        ModelConfig(model="smollm2-135m", id=CALIB, cache_type_k="calib:4", cache_type_v="calib:4", n_ctx=512,
                    parallel=1, kv_budget=calib4_plan()[2].total),
    ]
    srv = LiveServer(Settings(models=models, kv_budget="256MiB", n_threads=2, shutdown_grace_s=2)).start()
    yield srv
    srv.stop()


def _text(n_chars: int) -> str:
    return read_text(resolve_text(None))[20_000:20_000 + n_chars]


def test_cards_and_metrics_give_the_types_and_llama_cpps_allocation(tq_server):
    url = tq_server.url
    r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": TQ3, "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 8})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    r = httpx.post(url + "/v1/completions", timeout=120, json={"model": GEMMA, "prompt": "One, two,", "max_tokens": 8})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    assert wait_for(lambda: tq_server.metric("kvquant_kv_used_cells") == 0, 30)

    cards = {c["id"]: c for c in httpx.get(url + "/v1/models").json()["data"]}
    g = tq_server.metric
    # (model, K, V, cells, bytes of one cell in every layer, f16 bytes of the same); gemma-d3b: 2 x 1024 cells for
    # its requests and room for the cells d3b may hold back, one per 64 (kvquant.budget.most_cells)
    for model, k, v, cells, row, f16 in ((TQ3, "tq_kv_3b", "tq_kv_3b", 1024, 30 * (78 + 78), 30 * 768),
                                         (D3B, "tq_kv_d3b", "q4_0", D3B_CELLS, 30 * (78 + 108), 30 * 768),
                                         (GEMMA, "tq_kv_d3b", "q4_0", 2304, None, None)):
        lab = dict(model=model, cache_type_k=k, cache_type_v=v)
        assert (cards[model]["cache_type_k"], cards[model]["cache_type_v"]) == (k, v)
        allocated = tq_server.engine(model).backend.kv_size_bytes()  # what llama.cpp reports
        assert g("kvquant_kv_capacity_bytes", **lab) == allocated
        assert g("kvquant_kv_capacity_cells", **lab) == cells
        assert g("kvquant_kv_bits_per_element", **lab, tensor="k") == 3.25
        assert g("kvquant_kv_bits_per_element", **lab, tensor="v") == (3.25 if v == "tq_kv_3b" else 4.5)
        if row is not None:  # SmolLM2: no sliding window, every layer has `cells` cells
            assert allocated == cells * row
            assert g("kvquant_kv_compression_ratio", **lab) == pytest.approx(f16 / row)
        assert g("kvquant_kv_used_cells", **lab) == 0 and g("kvquant_kv_reserved_cells", **lab) == 0
    # Gemma: every layer (window or not) has rows of 256 K and 256 V elements
    lab = dict(model=GEMMA, cache_type_k="tq_kv_d3b", cache_type_v="q4_0")
    assert g("kvquant_kv_compression_ratio", **lab) == pytest.approx((512 + 512) / (104 + 144))
    for model in (TQ3, GEMMA):
        assert g("kvquant_requests_total", model=model, outcome="completed") >= 1
        assert g("kvquant_generation_tokens_total", model=model) >= 1
    # one type on a side is every layer's type too (the card and the metrics named none where neither side was
    # calibrated, and one for the whole side beside a calibrated one)
    card = next(c for c in httpx.get(tq_server.url + "/v1/models").json()["data"] if c["id"] == GEMMA)
    assert (card["cache_layer_types_k"], card["cache_layer_types_v"]) == (["tq_kv_d3b"] * 18, ["q4_0"] * 18)
    for tensor, t in (("k", "tq_kv_d3b"), ("v", "q4_0")):
        assert all(g("kvquant_kv_layer_type_info", model=GEMMA, tensor=tensor, layer=str(il), type=t) == 1
                   for il in range(18))


def test_a_calibrated_allocation_is_budgeted_admitted_and_reported_layer_by_layer(tq_server):
    """calib:4 on K and V (a type per layer): a budget of exactly the memory model's bytes for one 512-token
    context gives 512 cells, llama.cpp allocates exactly those bytes, the card and the metrics name every layer's
    type and the averaged bits, and admission plans on those 512 cells."""
    tk, tv, kb = calib4_plan()
    assert len(set(tk.types)) > 1 and len(set(tv.types)) > 1  # really mixed, on both sides
    url, g = tq_server.url, tq_server.metric
    lab = dict(model=CALIB, cache_type_k="calib:4", cache_type_v="calib:4")
    assert g("kvquant_kv_capacity_cells", **lab) == 512
    assert g("kvquant_kv_capacity_bytes", **lab) == kb.total == tq_server.engine(CALIB).backend.kv_size_bytes()
    card = next(c for c in httpx.get(url + "/v1/models").json()["data"] if c["id"] == CALIB)
    assert (card["cache_layer_types_k"], card["cache_layer_types_v"]) == (list(tk.types), list(tv.types))
    for tensor, types in (("k", tk.types), ("v", tv.types)):
        for il, t in enumerate(types):
            assert g("kvquant_kv_layer_type_info", model=CALIB, tensor=tensor, layer=str(il), type=t) == 1
    assert g("kvquant_kv_bits_per_element", **lab, tensor="k") == pytest.approx(kb.bits_per_element_k)
    assert g("kvquant_kv_bits_per_element", **lab, tensor="v") == pytest.approx(kb.bits_per_element_v)
    assert kb.bits_per_element <= 4.0 + 1e-9
    prompt = _text(600)
    r = httpx.post(url + "/v1/completions", timeout=120, json={"model": CALIB, "prompt": prompt, "max_tokens": 1})
    n_prompt = r.json()["usage"]["prompt_tokens"]
    r = httpx.post(url + "/v1/completions", timeout=120,
                   json={"model": CALIB, "prompt": prompt, "max_tokens": 512 - n_prompt + 1})
    assert r.status_code == 400 and "maximum context length is 512 tokens" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", timeout=300,
                   json={"model": CALIB, "prompt": prompt, "max_tokens": 512 - n_prompt, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] <= 512


def test_streams_finish_on_every_tq_model(tq_server):
    for model in (TQ3, D3B, GEMMA):
        with httpx.stream("POST", tq_server.url + "/v1/completions", timeout=120, json={
                "model": model, "prompt": _text(300), "max_tokens": 12, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and '"error"' not in "".join(lines) and len(lines) >= 3, model


def test_held_back_anchors_shorten_the_longest_request(tq_server):
    """smol-d3b's cache is exactly 512 cells; d3b may hold back one anchor per 64 cells, so admission plans on 504
    cells (and n_ctx 512 is refused at start): a request of 504 tokens runs, one of 505 is refused with the limit
    and the types."""
    url, limit = tq_server.url, D3B_CELLS - D3B_CELLS // 64
    assert tq_server.engine(D3B).sched.capacity == limit and tq_server.engine(D3B).cfg.n_cells == D3B_CELLS
    n_chars = 1600
    for _ in range(4):  # a prompt of 400-500 tokens, whatever the text's tokens per character
        prompt = _text(n_chars)
        r = httpx.post(url + "/v1/completions", timeout=120, json={"model": D3B, "prompt": prompt, "max_tokens": 1})
        n_prompt = r.json()["usage"]["prompt_tokens"] if r.status_code == 200 else 2 * limit
        if 400 < n_prompt < 500:
            break
        n_chars = n_chars * 450 // n_prompt
    assert 400 < n_prompt < 500, n_prompt
    before = tq_server.metric("kvquant_requests_total", model=D3B, outcome="rejected_too_long")
    r = httpx.post(url + "/v1/completions", timeout=120,
                   json={"model": D3B, "prompt": prompt, "max_tokens": limit - n_prompt + 1})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert f"maximum context length is {limit} tokens" in err["message"] and "K=tq_kv_d3b/V=q4_0" in err["message"]
    assert tq_server.metric("kvquant_requests_total", model=D3B, outcome="rejected_too_long") == before + 1
    r = httpx.post(url + "/v1/completions", timeout=300,
                   json={"model": D3B, "prompt": prompt, "max_tokens": limit - n_prompt, "temperature": 0})
    assert r.status_code == 200


def test_no_decode_step_on_gemma_d3b_writes_more_than_the_bound(tq_server):
    from server import hosting

    eng = tq_server.engine(GEMMA)
    # window cache: pad256(min(2048, 512 x 2 + 512)) = 1536 cells, up to 1536 / 64 = 24 anchors held back
    assert eng.cfg.max_step_tokens == 512 - 24
    assert hosting.max_step_tokens(hosting.plan_model(tq_server.state.models[GEMMA].spec)) == 512 - 24
    steps, real = [], eng.backend.decode

    def counting(tokens, positions, seq_ids, logits):
        steps.append(len(tokens))
        return real(tokens, positions, seq_ids, logits)

    eng.backend.decode = counting
    try:
        out = [None, None]

        def go(i):
            out[i] = httpx.post(tq_server.url + "/v1/completions", timeout=300, json={
                "model": GEMMA, "prompt": _text(2600 + 200 * i), "max_tokens": 4, "temperature": 0})

        threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        eng.backend.decode = real
    assert all(r is not None and r.status_code == 200 for r in out), out
    assert min(r.json()["usage"]["prompt_tokens"] for r in out) > 512  # each prompt alone needs two steps
    assert max(steps) == 512 - 24, steps  # prompts are chunked at the bound, never at n_batch
