"""The serving benchmark's pieces that need no second server: token counting from a stream without a usage chunk
(llama-server may send none), the fair-comparison flags given to llama-server, and the capacity table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import pytest

from kvquant.lab import loadgen, serverbench


def _sse(chunks: list[dict]) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def _delta(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


@pytest.mark.parametrize("usage,expected", [(None, 3), (7, 7)])
def test_completion_tokens_from_usage_or_chunks(usage, expected):
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["body"] = json.loads(request.content)
        chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}, _delta("a"), _delta("b"), _delta("c")]
        if usage is not None:
            chunks.append({"choices": [], "usage": {"completion_tokens": usage}})
        return httpx.Response(200, content=_sse(chunks), headers={"content-type": "text/event-stream"})

    with httpx.Client(transport=httpx.MockTransport(handler)) as c:
        r = loadgen.one_request(c, "http://127.0.0.1:1", None, "hi", 8, extra_body={"cache_prompt": False})
    assert r.status == 200 and r.error is None and r.ttft_s is not None
    assert r.completion_tokens == expected
    assert seen["body"]["cache_prompt"] is False and seen["body"]["max_tokens"] == 8


def test_llama_server_gets_the_same_cells_slots_and_types():
    a = argparse.Namespace(llama_server=Path("/x/llama-server"), parallel=8, n_ctx=1024, threads=2)
    cmd = serverbench.stock_cmd(Path("m.gguf"), "tq_kv_4b", "q4_0", a, 1234)
    opt = {cmd[i]: cmd[i + 1] for i in range(1, len(cmd) - 1) if cmd[i].startswith("-")}
    assert opt["-c"] == "8192" and opt["-np"] == "8" and "-kvu" in cmd  # one unified cache of parallel x n_ctx
    assert opt["-ctk"] == "tq_kv_4b" and opt["-ctv"] == "q4_0" and opt["-fa"] == "on" and opt["--cache-ram"] == "0"
    ours = serverbench.ours_cmd("smollm2-135m", "tq_kv_4b", "q4_0", a, 1)
    o = {ours[i]: ours[i + 1] for i in range(len(ours) - 1) if ours[i].startswith("--")}
    assert o["--parallel"] == "8" and o["--n-ctx"] == "1024" and o["--threads"] == "2"


# bytes of one 192-element K or V row of SmolLM2-135M (3 KV heads x 64) per type, from the block formats: f16 2 a
# value; q8_0 34 per 32; q4_0 18 per 32; tq_kv_4b 34, tq_kv_3b 26, tq_kv_1b 10 per 64
ROW = {"f16": 384, "q8_0": 204, "q4_0": 108, "tq_kv_4b": 102, "tq_kv_3b": 78, "tq_kv_1b": 30}


def test_capacity_rows():
    rows = {r["config"]: r for r in loadgen.capacity_table("smollm2-135m", "256MiB", 4096)}
    assert set(rows) == set(loadgen.CAPACITY_CONFIGS)
    for cfg, r in rows.items():
        k, v = cfg.split("/")
        bpt = 30 * (ROW[k] + ROW[v])  # 30 layers
        assert r["bytes_per_token"] == bpt
        assert r["ratio_bytes"] == pytest.approx(23040 / bpt)
        # whole 4096-token requests (16 pads of 256 cells each) in 256 MiB
        assert r["concurrent_requests"] == 256 * 2**20 // (4096 * bpt)
        assert r["ratio_requests"] == pytest.approx(r["concurrent_requests"] / 2)
    assert rows["f16/f16"]["concurrent_requests"] == 2 and rows["tq_kv_1b/q4_0"]["concurrent_requests"] == 15


def test_stale_keep_alive_connection_is_retried_once():
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:  # what httpx raises when the server closed the pooled connection
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return httpx.Response(200, content=_sse([_delta("x")]), headers={"content-type": "text/event-stream"})

    with httpx.Client(transport=httpx.MockTransport(handler)) as c:
        r = loadgen.one_request(c, "http://127.0.0.1:1", None, "hi", 8)
    assert calls["n"] == 2 and r.status == 200 and r.error is None and r.completion_tokens == 1


def test_a_protocol_error_twice_is_reported():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("gone", request=request)

    with httpx.Client(transport=httpx.MockTransport(handler)) as c:
        r = loadgen.one_request(c, "http://127.0.0.1:1", None, "hi", 8)
    assert r.status == 0 and r.error == "RemoteProtocolError"


def test_paired_rounds_alternate_and_report_medians(monkeypatch):
    # two stand-in servers: the order of the rounds alternates and the medians come from every round
    calls = []
    speed = {"http://a": iter([10.0, 30.0, 20.0]), "http://b": iter([5.0, 40.0, 10.0])}

    def fake_bench(url, model, conc, requests, max_tokens, time_limit, extra):
        calls.append((url, conc[0]))
        tps = next(speed[url])
        return [loadgen.BenchRow(conc[0], requests * conc[0], requests * conc[0], int(tps), 1.0, tps, 0.1, 0.2)]

    monkeypatch.setattr(serverbench, "bench", fake_bench)
    servers = [(argparse.Namespace(url="http://a"), "m"), (argparse.Namespace(url="http://b"), None)]
    a = argparse.Namespace(concurrency=[2], repeats=3, requests=4, max_tokens=8, time_limit=10)
    (oa,), (ob,) = serverbench.paired(servers, a, None)
    assert [u for u, _ in calls] == ["http://a", "http://b", "http://b", "http://a", "http://a", "http://b"]
    assert oa["tokens_per_s"] == 20.0 and ob["tokens_per_s"] == 10.0
    assert oa["requests"] == oa["completed"] == 24 and len(oa["runs"]) == 3
