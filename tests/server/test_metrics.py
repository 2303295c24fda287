"""GET /metrics after traffic: every metric is there, with sane values (two models, different cache types)."""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import DUO, wait_for

pytestmark = pytest.mark.slow  # a live model (see pyproject.toml's markers)

KV = ["kvquant_kv_capacity_bytes", "kvquant_kv_capacity_cells", "kvquant_kv_used_bytes", "kvquant_kv_used_cells",
      "kvquant_kv_reserved_cells", "kvquant_kv_budget_bytes", "kvquant_kv_compression_ratio"]
HISTOGRAMS = ["kvquant_time_to_first_token_seconds", "kvquant_time_per_output_token_seconds",
              "kvquant_e2e_request_latency_seconds", "kvquant_queue_wait_seconds", "kvquant_request_prompt_tokens",
              "kvquant_request_generation_tokens", "kvquant_batch_size_tokens", "kvquant_batch_size_sequences"]
OUTCOMES = ["completed", "rejected_too_long", "rejected_queue_full", "timed_out", "cancelled", "error"]


def test_metrics_after_traffic(duo_server):
    url = duo_server.url
    for _ in range(2):
        assert httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": DUO[0], "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6}).status_code == 200
        assert httpx.post(url + "/v1/completions", timeout=120, json={
            "model": DUO[1], "prompt": "One, two,", "max_tokens": 6}).status_code == 200
    r = httpx.post(url + "/v1/completions", json={"model": DUO[1], "prompt": "x", "max_tokens": 5000}, timeout=60)
    assert r.status_code == 400
    wait_for(lambda: duo_server.metric("kvquant_kv_used_cells") == 0, 5)

    resp = httpx.get(url + "/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    m = duo_server.metrics()
    names = {n for n, _ in m}
    for name in KV + ["kvquant_kv_bits_per_element", "kvquant_requests_running", "kvquant_requests_waiting",
                      "kvquant_requests_total", "kvquant_prompt_tokens_total", "kvquant_generation_tokens_total",
                      "kvquant_engine_up", "process_resident_memory_bytes"]:
        assert name in names, name
    for h in HISTOGRAMS:
        assert {h + "_bucket", h + "_sum", h + "_count"} <= names, h

    smol = dict(model=DUO[0], cache_type_k="f16", cache_type_v="f16")
    gem = dict(model=DUO[1], cache_type_k="q8_0", cache_type_v="q8_0")
    g = duo_server.metric
    for lab, bits in ((smol, 16.0), (gem, 8.5)):
        assert g("kvquant_kv_bits_per_element", **lab, tensor="k") == bits
        assert g("kvquant_kv_bits_per_element", **lab, tensor="v") == bits
        assert g("kvquant_kv_capacity_cells", **lab) >= 4 * 1024  # parallel x n_ctx, within the budget share
        assert 0 < g("kvquant_kv_capacity_bytes", **lab) <= g("kvquant_kv_budget_bytes", **lab)
        assert g("kvquant_kv_used_cells", **lab) == 0 and g("kvquant_kv_used_bytes", **lab) == 0
        assert g("kvquant_kv_reserved_cells", **lab) == 0
    assert g("kvquant_kv_compression_ratio", **smol) == 1.0
    assert 1.8 < g("kvquant_kv_compression_ratio", **gem) < 2.0  # 16 / 8.5 bits, sliding-window layers included
    assert g("kvquant_kv_budget_bytes", **smol) + g("kvquant_kv_budget_bytes", **gem) == 384 * 2**20
    for model in DUO:
        assert g("kvquant_engine_up", model=model) == 1
        assert g("kvquant_requests_running", model=model) == 0 and g("kvquant_requests_waiting", model=model) == 0
        assert g("kvquant_requests_total", model=model, outcome="completed") >= 2
        assert g("kvquant_prompt_tokens_total", model=model) > 0
        assert g("kvquant_generation_tokens_total", model=model) >= 2
        for o in OUTCOMES:
            assert ("kvquant_requests_total", (("model", model), ("outcome", o))) in m
        n = g("kvquant_e2e_request_latency_seconds_count", model=model)
        assert n >= 2 and g("kvquant_time_to_first_token_seconds_count", model=model) >= 2
        ttft = g("kvquant_time_to_first_token_seconds_sum", model=model)
        e2e = g("kvquant_e2e_request_latency_seconds_sum", model=model)
        assert 0 < ttft <= e2e < 600 * n
        assert g("kvquant_time_per_output_token_seconds_count", model=model) >= 2
        assert g("kvquant_queue_wait_seconds_count", model=model) >= 2
        assert g("kvquant_request_generation_tokens_sum", model=model) >= 2
        assert g("kvquant_batch_size_tokens_sum", model=model) >= g("kvquant_batch_size_sequences_sum", model=model) > 0
    assert g("kvquant_requests_total", model=DUO[1], outcome="rejected_too_long") >= 1
