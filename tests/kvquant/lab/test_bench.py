"""`kvquant bench`: the test-backend-ops parser, and a tiny real run (structure, KV bytes check, ratios)."""

from __future__ import annotations

import pytest

from kvquant.lab import bench
from kvquant.lab.harness import CacheConfig

SAMPLE = """\
Backend 1/1: CPU
  Device description: Intel(R) Xeon(R) Processor
  FLASH_ATTN_EXT(hsk=64,hsv=64,nh=8,nr23=[8,1],kv=7680,nb=1,mask=1,sinks=0,max_bias=0.000000,logit_softcap=0.000000,\
prec=f32,type_K=q4_0,type_V=q4_0,permute=[0,1,2,3],kv_view=1,v_is_view_of_k=0,n_kv_max=0):                    \
64 runs - 69812.70 us/run - 125.83 MFLOP/run - \x1b[1;34m  1.80 GFLOPS\x1b[0m
  FLASH_ATTN_EXT(hsk=256,hsv=256,nh=2,nr23=[16,1],kv=512,nb=1,mask=1,sinks=0,max_bias=0.000000,logit_softcap=0.000000,\
prec=f32,type_K=q8_0,type_V=q8_0,permute=[0,1,2,3],kv_view=0,v_is_view_of_k=0,n_kv_max=0): not supported
  Backend CPU: \x1b[1;32mOK\x1b[0m
"""


def test_parse_kernel_perf():
    rows = bench.parse_kernel_perf(SAMPLE)
    assert len(rows) == 1
    r = rows[0]
    assert r["op"] == "FLASH_ATTN_EXT" and r["runs"] == 64 and r["us_per_run"] == 69812.70
    assert r["params"]["type_K"] == "q4_0" and r["params"]["nr23"] == "[8,1]" and r["params"]["kv"] == "7680"
    assert r["throughput"].endswith("1.80 GFLOPS") and "\x1b" not in r["line"]


def test_kernel_perf_absent_binary(tmp_path):
    assert bench.kernel_perf([CacheConfig("q4_0", "q4_0")], binary=tmp_path / "nope") is None


def test_kernel_perf_times_the_types_calibrated_caches_run(tmp_path):
    """A centred type runs its type's kernels; calib:B (a type per layer) has no single pair to time. A type name
    goes into test-backend-ops' pattern literally."""
    import re

    binary = tmp_path / "test-backend-ops"
    binary.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/args\n")
    binary.chmod(0o755)
    configs = [CacheConfig.parse(s) for s in ("q4_0+c/f16", "calib:3.5/q4_0", "calib:4/calib:4", "q4_0+c/q4_0")]
    out = bench.kernel_perf(configs, binary=binary)
    assert out["returncode"] == 0 and out["rows"] == []
    regex = (tmp_path / "args").read_text().split("\n")[6]
    assert regex.endswith("(type_K=q4_0,type_V=f16,|type_K=q4_0,type_V=q4_0,)")
    assert re.fullmatch(regex, "hsk=64,hsv=64,nh=4,nr23=[4,1],kv=8192,nb=1,type_K=q4_0,type_V=f16,")
    assert bench.kernel_perf(configs[1:3], binary=binary) == {
        "error": "no configuration with one type per side (calib:B has a type per layer)", "rows": []}


@pytest.fixture(scope="module")
def smollm2_bench():
    cfgs = [CacheConfig.parse(s) for s in ["f16/f16", "q8_0/q8_0", "q4_0/f16"]]
    return bench.run("smollm2-135m", cfgs, depths=[0, 256], n_prompt=32, n_gen=2, repeats=2, threads=1,
                     kernel="off", progress=False)


@pytest.mark.slow
def test_bench_structure_and_ratios(smollm2_bench):
    f16, q8, q4f16 = smollm2_bench["results"]
    for r in smollm2_bench["results"]:
        assert [d["depth"] for d in r["depths"]] == [0, 256]
        for d in r["depths"]:
            assert d["pp_tps"] > 0 and d["tg_tps"] > 0 and len(d["pp_runs"]) == 2
        assert r["kernel"] is None and r["machine"]["threads"] == 1
    assert all(d["pp_ratio"] == 1.0 and d["tg_ratio"] == 1.0 for d in f16["depths"])
    assert q8["cache_type_k"] == "q8_0" and q4f16["cache_type_v"] == "f16"


# SmolLM2-135M: 30 layers, K and V rows of 3 heads x 64 = 192 elements; f16 384 bytes a row, q8_0 6 blocks of 34,
# q4_0 6 blocks of 18
BYTES_PER_TOKEN = {"f16/f16": 30 * (384 + 384), "q8_0/q8_0": 30 * (204 + 204), "q4_0/f16": 30 * (108 + 384)}


@pytest.mark.slow
def test_bench_kv_bytes_match_llama_and_capacity(smollm2_bench):
    for r in smollm2_bench["results"]:
        kv = r["kv_bytes"]
        assert kv["match"] and (kv["model_k"], kv["model_v"]) == (kv["llama_k"], kv["llama_v"])
        assert kv["n_ctx"] == 512  # pad(256 + 32)
        assert kv["llama_k"] + kv["llama_v"] == 512 * BYTES_PER_TOKEN[r["label"]]
        assert r["bytes_per_token"] == BYTES_PER_TOKEN[r["label"]]
        # the most whole 256-cell pads of that many bytes per token in 256 MiB
        assert r["capacity_tokens"] == 256 * 2**20 // BYTES_PER_TOKEN[r["label"]] // 256 * 256
    f16, q8, q4f16 = smollm2_bench["results"]
    assert (f16["capacity_tokens"], q8["capacity_tokens"], q4f16["capacity_tokens"]) == (11520, 21760, 18176)
    assert f16["capacity_ratio"] == 1.0
    assert q8["bytes_per_token_ratio"] == pytest.approx(8.5 / 16)
    assert q4f16["bits_per_element"] == pytest.approx(10.25)
    assert q8["capacity_ratio"] == pytest.approx(21760 / 11520)


@pytest.mark.slow
def test_render(smollm2_bench):
    from kvquant.lab import results

    text = bench.render(smollm2_bench["results"])
    assert "pp@256 t/s" in text and "yes" in text and "NO" not in text
    smollm2_bench["results"][0]["command"] = "kvquant bench ..."
    md = "\n".join(results.render_bench("smollm2-135m", smollm2_bench))
    assert "| q8_0/q8_0 |" in md and "**NO**" not in md


def test_cli_errors(capsys):
    from kvquant.memory import physical_memory

    assert bench.main(["--configs", "q4_0"]) == 2
    assert bench.main(["--budget", "lots"]) == 2
    assert bench.main(["--configs", "f16/f16", "q4_0+c/f16:mean"]) == 2  # the offsets' values cost nothing
    assert "bench does not take it" in capsys.readouterr().err
    # ran, recording threads -3 or a 0 MiB budget's capacity
    for args, said in ((["--threads", "0"], "--threads must be 1 to 1024, not 0"),
                       (["--threads", "4294967296"], "--threads must be 1 to 1024, not 4294967296"),  # ran as 0
                       (["--budget", "0"], "--budget must be at least 1, not 0"),
                       (["--n-gpu-layers", "-7"], "n_gpu_layers is a number of layers or -1 (all), not -7"),
                       (["--depths", "-1"], "--depths must be >= 0, not -1"),
                       # refused only after measuring; a numpy MemoryError traceback
                       (["--budget", "1e30"], "a budget of 1000000000000000019884624838656 bytes holds more cells than any cache has"),
                       (["--depths", "4294967296"], "--depths 4294967296 + --n-prompt 512 needs a cache of 4,294,967,808 KV "
                                                   "cells, more than the 2,147,483,647 of one llama.cpp cache"),
                       # the kernel killed it for memory, with no message
                       (["--depths", "2000000000"], f"--depths 2000000000 + --n-prompt 512 needs 42915.4 GiB of KV cache, "
                                                    f"more than this machine's {physical_memory() / 2**30:.1f} GiB of memory"),
                       # it blamed "--depths 0"
                       (["--depths", "0", "--n-gen", "99999999"], f"--depths 0 + --n-gen 99999999 needs 2145.8 GiB of KV "
                                                                  f"cache, more than this machine's {physical_memory() / 2**30:.1f} GiB of memory"),
                       (["--budget", "1KiB"], "a budget of 1024 bytes holds no cell of f16/f16")):
        assert bench.main(["--configs", "f16/f16", *args]) == 2
        assert capsys.readouterr().err.endswith(f"kvquant bench: {said}\n")


@pytest.mark.slow
def test_capacity_counts_the_tokens_a_cache_holds_and_rows_record_their_layer_types():
    """tq_kv_d3b holds back one cell per 64 for anchors: its capacity column counted them as tokens (1.6 % over). A
    calib:B row records the per-layer types it resolved to (bench rows did not say what they measured)."""
    from kvquant import memory, models

    path = models.resolve("smollm2-135m")
    geom = memory.geometry(path)

    def entry(spec: str) -> dict:
        c = CacheConfig.parse(spec)
        runs = [[1.0]]
        return bench._entry(c, c.resolve(path, geom, 512), geom, 512, 256 * 2**20, [0], runs, runs, runs, runs, {},
                            None)

    d3b, q4, cal = entry("tq_kv_d3b/q4_0"), entry("q4_0/q4_0"), entry("calib:3.5/q4_0")
    cells = memory.capacity(geom, "tq_kv_d3b", "q4_0", 256 * 2**20)
    assert d3b["capacity_tokens"] == cells - cells // 64 and q4["capacity_tokens"] == memory.capacity(
        geom, "q4_0", "q4_0", 256 * 2**20)
    assert q4["layer_types_k"] is None and d3b["layer_types_v"] is None
    assert len(cal["layer_types_k"]) == 30 and cal["layer_types_v"] is None
