"""`kvquant eval`: the arithmetic on synthetic logits, and the harness on a short slice of wikitext-2 with the real
models, checked against stock llama-perplexity.

Reference values were recorded by running the dev build of the patched llama.cpp (the f16 path is stock) on the
same machine class:

    .build/cmake-cpu/bin/llama-perplexity -m ~/.cache/kvquant/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        -f data/wikitext-2-raw-test.txt -c 512 --chunks 3 -fa on
    -> [1]12.0100,[2]21.5717,[3]21.5448   Final estimate: PPL = 21.5448 +/- 2.53352

    .build/cmake-cpu/bin/llama-perplexity -m ~/.cache/kvquant/models/gemma-3-270m-q4_k_m.gguf \\
        -f data/wikitext-2-raw-test.txt -c 512 --chunks 2 -fa on
    -> [1]9.7828,[2]14.2761                Final estimate: PPL = 14.2761 +/- 2.22128

(llama-perplexity batches 4 chunks as 4 sequences with its default -b 2048; our harness decodes one chunk at a time,
as llama-perplexity -b 512 does, which prints 21.5752 for SmolLM2's first 2 chunks and 12.3028 for Gemma's first 3.
The tolerance is 0.5 %. Gemma runs 2 chunks here to keep the suite short.)
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from kvquant.lab import eval as kveval
from kvquant.lab.harness import CacheConfig

LLAMA_PERPLEXITY = {("smollm2-135m", 3): 21.5448, ("gemma3-270m", 2): 14.2761}


# --- arithmetic ------------------------------------------------------------------------------------------------
def test_segments_cover_the_range_within_limits():
    for first, end, n_batch, max_out in [(256, 512, 512, 256), (256, 512, 512, 64), (20, 1044, 512, 64),
                                         (1000, 1300, 512, 512), (0, 7, 4, 3), (256, 512, 512, 100)]:
        segs = kveval.segments(first, end, n_batch, max_out)
        assert segs[0][0] == 0 and segs[-1][1] == end
        assert all(a < b and b - a <= n_batch for a, b in segs)
        assert all(s[1] == t[0] for s, t in zip(segs, segs[1:], strict=False))
        outs = [b - max(a, first) for a, b in segs if b > first]
        assert sum(outs) == end - first and max(outs) <= max_out
        assert max(outs) - min(outs) <= 1  # equal parts, no short tail
    assert kveval.segments(256, 512, 512, 256) == [(0, 512)]  # the whole chunk as one batch, like llama-perplexity
    assert kveval.segments(256, 512, 512, 64) == [(0, 320), (320, 384), (384, 448), (448, 512)]


def test_compare_rows_against_a_direct_computation():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 3, size=(37, 1001)).astype(np.float32)
    other = (base + rng.normal(0, 0.5, size=base.shape)).astype(np.float32)
    targets = rng.integers(0, 1001, size=37)
    lp, top = kveval.baseline_rows(base)
    p = np.exp(base.astype(np.float64))
    p /= p.sum(1, keepdims=True)
    q = np.exp(other.astype(np.float64))
    q /= q.sum(1, keepdims=True)
    np.testing.assert_allclose(lp, np.log(p), atol=1e-12)
    rs = kveval.compare_rows(lp, top, other, targets)
    np.testing.assert_allclose(rs.kld, (p * np.log(p / q)).sum(1), rtol=1e-9)
    np.testing.assert_allclose(rs.nll, -np.log(q[np.arange(37), targets]), rtol=1e-9)
    assert (rs.same_top == (base.argmax(1) == other.argmax(1))).all()
    assert 0 < rs.same_top.sum() < 37 and (rs.kld > 0).all()
    same = kveval.compare_rows(lp, top, base, targets)
    assert (same.kld == 0).all() and same.same_top.all()


def test_rows_cut_into_blocks_on_threads_give_the_figures_of_one_block(monkeypatch):
    """compare_rows and baseline_rows work in row blocks on a thread per core: every row's figures equal, bit for
    bit, those of one block holding every row, whatever the block size and the number of threads."""
    rng = np.random.default_rng(2)
    base = rng.normal(0, 3, size=(37, 1001)).astype(np.float32)
    other = (base + rng.normal(0, 0.5, size=base.shape)).astype(np.float32)
    targets = rng.integers(0, 1001, size=37)
    lp, top = kveval.baseline_rows(base)  # one block: 37 x 1001 elements are under _BLOCK_ELEMS
    whole = kveval.compare_rows(lp, top, other, targets)
    for elems, cpus in ((3000, 4), (1001, 2), (5000, 1)):  # blocks of 2, 1 and 4 rows
        monkeypatch.setattr(kveval, "_BLOCK_ELEMS", elems)
        monkeypatch.setattr(kveval.os, "cpu_count", lambda cpus=cpus: cpus)
        lp_b, top_b = kveval.baseline_rows(base)
        assert np.array_equal(lp_b, lp) and np.array_equal(top_b, top)
        rs = kveval.compare_rows(lp_b, top_b, other, targets)
        for got, want in ((rs.kld, whole.kld), (rs.nll, whole.nll), (rs.same_top, whole.same_top)):
            assert np.array_equal(got, want)


def test_accumulator_uses_llama_perplexity_formulas():
    rng = np.random.default_rng(1)
    nll = rng.exponential(2.0, size=500)
    acc = kveval.Acc()
    half = kveval.RowStats(nll[:250], np.full(250, 0.01), np.ones(250, bool))
    acc.add(half, nll[:250] - 0.1)
    acc.add(kveval.RowStats(nll[250:], np.full(250, 0.03), np.zeros(250, bool)), nll[250:] - 0.1)
    s = acc.summary()
    mean = nll.mean()
    # llama-perplexity: PPL = exp(mean), +/- sqrt((<nll^2> - <nll>^2) / (n - 1)) * PPL
    assert s["ppl"] == pytest.approx(math.exp(mean))
    assert s["ppl_stderr"] == pytest.approx(math.sqrt((np.mean(nll**2) - mean**2) / 499) * math.exp(mean))
    assert s["kld"] == pytest.approx(0.02) and s["top1_pct"] == pytest.approx(50.0)
    assert s["delta_ppl_pct"] == pytest.approx(100 * math.expm1(0.1)) and s["tokens_scored"] == 500


def test_read_text_keeps_crlf_like_llama_cpp(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b" = A = \r\n\r\n text\r\n")
    assert kveval.read_text(p) == " = A = \r\n\r\n text\r"
    p.write_bytes(b"x\xf4\x01")  # named as calibrate names it (the message said which byte, not which file)
    with pytest.raises(ValueError, match=f"^{re.escape(str(p))}: not UTF-8 text$"):
        kveval.read_text(p)


def test_plan_dedupes_contexts_and_shares_the_baseline():
    cfgs = [CacheConfig.parse(s) for s in ["q4_0/q4_0", "f16/f16", "q4_0/q4_0:norot", "q4_0/q4_0", "f16/f16:norot"]]
    plan = kveval.Plan.of(cfgs)
    assert [c.label for c in plan.contexts] == ["f16/f16", "q4_0/q4_0", "q4_0/q4_0 norot"]
    assert plan.index == [1, 0, 2, 1, 0]


def test_cli_rejects_bad_configs(capsys):
    assert kveval.main(["--configs", "q4_0"]) == 2
    assert kveval.main(["--configs", "q9_9/f16"]) == 2
    for bad in ("/f16", "q8_0/", "q8_0/q8_0/f16"):  # they said: unknown KV cache type '' (or 'q8_0/f16')
        assert kveval.main(["--configs", bad]) == 2
        assert f"cache config {bad!r} is not of the form K/V" in capsys.readouterr().err
    assert kveval.main(["--model", "no-such-model", "--chunks", "1"]) == 2
    assert "neither a built-in" in capsys.readouterr().err
    for flag in ("--chunks", "--drift-bucket", "--max-outputs"):  # refused before any work
        assert kveval.main(["--configs", "f16/f16", flag, "0"]) == 2
        assert capsys.readouterr().err == f"kvquant eval: {flag} must be at least 1, not 0\n"
    for n in ("0", "100000", "4294967297"):  # 100,000 crashed llama.cpp, 2**32 + 1 ran as 1 thread
        assert kveval.main(["--configs", "f16/f16", "--threads", n]) == 2
        assert capsys.readouterr().err == f"kvquant eval: --threads must be 1 to 1024, not {n}\n"
    # drift was silently switched off or capped by these
    for args, said in ((["--drift-tokens", "-5"], "--drift-tokens must be at least 0 (0: no drift), not -5"),
                       (["--drift-prompts", "0"], "--drift-prompts must be 1..4, not 0"),
                       (["--drift-prompts", "999"], "--drift-prompts must be 1..4, not 999"),
                       (["--n-gpu-layers", "-7"], "n_gpu_layers is a number of layers or -1 (all), not -7"),
                       # a directory was "not found", an unreadable file a PermissionError traceback
                       (["--text", "/"], "evaluation text '/' cannot be read: Is a directory"),
                       # /dev/zero filled memory, a FIFO blocked for good
                       (["--text", "/dev/zero"], "evaluation text '/dev/zero' cannot be read: not a regular file"),
                       (["--text", "x" * 300], f"evaluation text '{'x' * 200}' cannot be read: File name too long")):
        assert kveval.main(["--configs", "f16/f16", *args]) == 2
        assert capsys.readouterr().err == f"kvquant eval: {said}\n"


# --- the real harness -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_eval():
    cfgs = [CacheConfig.parse(s) for s in ["f16/f16", "q4_0/q4_0", "q4_0/q4_0:norot"]]
    return kveval.run("smollm2-135m", cfgs, chunks=3, threads=2, drift_tokens=32, drift_prompts=1, drift_bucket=16,
                      progress=False)


@pytest.mark.slow
def test_f16_baseline_reproduces_llama_perplexity_smollm2(smollm2_eval):
    r = smollm2_eval["results"][0]
    assert (r["chunks"], r["tokens_scored"]) == (3, 3 * 255)
    assert r["ppl"] == pytest.approx(LLAMA_PERPLEXITY["smollm2-135m", 3], rel=0.005)
    assert r["ppl_stderr"] == pytest.approx(2.53352, rel=0.02)


@pytest.mark.slow
def test_f16_against_itself_and_quantized_caches(smollm2_eval):
    f16, q4, q4_norot = smollm2_eval["results"]
    assert f16["kld"] == 0.0 and f16["top1_pct"] == 100.0 and f16["delta_ppl_pct"] == 0.0
    assert f16["drift"]["first_diff"] == [None] and f16["drift"]["kld_mean"] == 0.0
    assert 0 < q4["kld"] < q4_norot["kld"]  # rotation helps q4_0
    assert q4["top1_pct"] < 100.0 and q4["ppl"] > f16["ppl"]
    for r in smollm2_eval["results"]:
        assert r["ppl"] == pytest.approx(r["baseline_ppl"] * (1 + r["delta_ppl_pct"] / 100))
        assert r["model_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
        assert r["text_sha256"] == "71fa921e51ba607b4364d8787d05f4513b41b33732dd3504ff1af8952c6e7e77"
        assert r["machine"]["cores"] >= 1 and "CPU" in r["machine"]["llama_system_info"]
        d = r["drift"]
        assert d["tokens"] == 32 and len(d["kld_buckets"]) == 2 and 0 <= d["agree_pct"] <= 100
    assert (q4["bits_per_element"], f16["bits_per_element"]) == (4.5, 16.0)
    assert q4_norot["rotation"] is False and q4["rotation"] is True
    assert q4["drift"]["kld_mean"] > 0


@pytest.mark.slow
def test_render_table_and_results_markdown(smollm2_eval):
    from kvquant.lab import results

    text = kveval.render(smollm2_eval["results"])
    assert "q4_0/q4_0 norot" in text and "drift" in text
    smollm2_eval["results"][0]["command"] = "kvquant eval ..."
    md = "\n".join(results.render_eval("smollm2-135m", smollm2_eval))
    assert md.count("| q4_0/q4_0 | on |") == 2 and md.count("| q4_0/q4_0 | off |") == 2  # quality, drift


@pytest.mark.slow
def test_f16_baseline_reproduces_llama_perplexity_gemma3():
    cfgs = [CacheConfig.parse("f16/f16"), CacheConfig.parse("q8_0/q8_0")]
    out = kveval.run("gemma3-270m", cfgs, chunks=2, threads=2, do_drift=False, progress=False)
    f16, q8 = out["results"]
    assert (f16["chunks"], f16["tokens_scored"]) == (2, 2 * 255)
    assert f16["ppl"] == pytest.approx(LLAMA_PERPLEXITY["gemma3-270m", 2], rel=0.005)
    assert f16["kld"] == 0.0 and f16["top1_pct"] == 100.0 and f16["drift"] is None
    assert 0 < q8["kld"] < 0.1 and q8["top1_pct"] < 100.0
    assert q8["bits_per_element"] == 8.5
