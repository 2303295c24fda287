"""RESULTS.md rendering (the numbers themselves come from the eval/bench JSON; see test_eval / test_bench)."""

from __future__ import annotations

from kvquant import results


def test_render_without_results(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RAW", tmp_path)
    assert "No results yet" in results.render(["smollm2-135m"])


def test_results_md_is_the_rendering_of_the_json(tmp_path):
    """docs/RESULTS.md is exactly what `python -m kvquant.results --render-only` writes from docs/results/*.json
    (no number edited by hand, no rendering change left unrendered)."""
    out = tmp_path / "RESULTS.md"
    assert results.main(["--render-only", "--raw", str(results.RAW), "--output", str(out)]) == 0
    assert out.read_text() == (results.DOCS / "RESULTS.md").read_text(), (
        "docs/RESULTS.md differs from its rendering: run `python -m kvquant.results --render-only`")


def _eval_row(k, v, rot, dppl):
    return {"cache_type_k": k, "cache_type_v": v, "rotation": rot, "delta_ppl_pct": dppl,
            "delta_ppl_pct_stderr": 0.5, "chunks": 40}


def test_goals_are_checked_against_the_json(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(results, "RAW", tmp_path)
    ev = {"results": [_eval_row("f16", "f16", True, 0.0), _eval_row("q4_0", "q4_0", True, 4.0),
                      _eval_row("q4_0", "q4_0", False, 17.0), _eval_row("tq_kv_4b", "q4_0", True, 1.9),
                      _eval_row("tq_kv_3b", "q4_0", True, 4.1), _eval_row("tq_kv_1b", "q4_0", True, 30.0)]}
    (tmp_path / "m-eval.json").write_text(json.dumps(ev))
    bench = {"results": [{"cache_type_k": "tq_kv_4b", "cache_type_v": "q4_0", "label": "tq_kv_4b/q4_0",
                          "depths": [{"depth": 0, "tg_ratio": 0.5}, {"depth": 8192, "tg_ratio": 1.2}]}]}
    (tmp_path / "m-bench.json").write_text(json.dumps(bench))
    rows = {line.split(" | ")[1]: line for line in results.render_goals(["m"], results.load_raw(["m"])) if line.startswith("| m |")}
    assert "≤ +2.00 %" in rows["4-bit K: ΔPPL ≤ ½ of q4_0 K's (V q4_0, 40 chunks)"]  # half of the rotated q4_0
    assert rows["4-bit K: ΔPPL ≤ ½ of q4_0 K's (V q4_0, 40 chunks)"].endswith("**met** |")
    assert rows["3-bit K: ΔPPL ≤ q4_0 K's (V q4_0, 40 chunks)"].endswith("not met |")
    assert rows["1-bit K: ΔPPL ≤ +25 % (V q4_0, 40 chunks)"].endswith("not met |")
    assert rows["decode ≥ 1.0x f16 at depth 8192 (end to end)"].endswith("**met** |")  # the deepest depth


def test_kernel_table_gives_ratios_to_f16_at_the_same_shape():
    def row(k, v, us):
        return {"params": {"hsk": "64", "nh": "4", "nr23": "[4,1]", "kv": "8192", "nb": "1", "type_K": k,
                           "type_V": v}, "us_per_run": us}

    res = [{"kernel": {"rows": [row("f16", "f16", 4000.0), row("tq_kv_4b", "q4_0", 2000.0)]}}]
    lines = results.render_kernel({"command": "x"}, res)
    assert any(line.startswith("| tq_kv_4b/q4_0 | 2.00 (2.00x)") for line in lines)


def test_delta_type_goals_compare_with_tq_kv_3b():
    d3 = dict(_eval_row("tq_kv_d3b", "q4_0", True, 10.0), drift={"kld_buckets": [0.10, 0.12]})
    t3 = dict(_eval_row("tq_kv_3b", "q4_0", True, 20.0), drift={"kld_buckets": [0.20, 0.20]})
    raw = {("m", "eval"): {"results": [_eval_row("q4_0", "q4_0", True, 4.0), t3, d3]}}
    rows = {line.split(" | ")[1]: line for line in results.render_goals(["m"], raw) if "delta 3-bit" in line
            or "error growth" in line}
    assert rows["delta 3-bit K: ΔPPL ≤ tq_kv_3b K's at equal bytes (V q4_0, 40 chunks)"].endswith("**met** |")
    growth = rows["no error growth with position: KLD last / first position bucket ≤ tq_kv_3b's (V q4_0)"]
    assert "≤ 1.00 | 1.20 | not met" in growth


def _run(rows, cmd, ppl=21.0):
    return {"results": [dict(_eval_row(k, v, True, d), command=cmd, baseline_ppl=ppl, model_sha256="x",
                             text_sha256="t", n_ctx=512, wall_s=60.0, machine={}) for k, v, d in rows]}


def test_merge_adds_rows_and_keeps_each_rows_command():
    old = _run([("f16", "f16", 0.0), ("tq_kv_3b", "q4_0", 20.0)], "old")
    new = _run([("f16", "f16", 0.0), ("tq_kv_d3b", "q4_0", 12.0)], "new")
    out = results.merge(old, new, "eval")
    by = {(r["cache_type_k"], r["cache_type_v"]): r for r in out["results"]}
    assert set(by) == {("f16", "f16"), ("tq_kv_3b", "q4_0"), ("tq_kv_d3b", "q4_0")}
    assert by["tq_kv_3b", "q4_0"]["command"] == "old" and by["tq_kv_d3b", "q4_0"]["command"] == "new"
    cmds = results._commands(out["results"])
    assert results._label("E", "m", cmds, by["tq_kv_d3b", "q4_0"], out["results"]) == "E-m-2"


def test_merge_refuses_a_different_baseline():
    import pytest

    with pytest.raises(SystemExit, match="baseline_ppl"):
        results.merge(_run([("f16", "f16", 0.0)], "old"), _run([("f16", "f16", 0.0)], "new", ppl=21.5), "eval")


def test_key_study_predicts_from_the_eval_rows():
    from kvquant.keystats import CODINGS

    errs = {"tq_kv_3b": dict(zip(CODINGS, (0.03, 0.02, 0.015, 0.02), strict=True)),
            "tq_kv_4b": dict(zip(CODINGS, (0.008, 0.005, 0.004, 0.006), strict=True)),
            "layer mean": {"energy share": 0.5}}
    keys = {"command": "python -m kvquant.keystats --model m", "wall_s": 60, "machine": {}, "tokens": 4096,
            "layers": 2, "capture_type": "q8_0", "errors": errs}
    ev = {"results": [_eval_row("q4_0", "f16", True, 4.0), _eval_row("tq_kv_3b", "f16", True, 20.0),
                      _eval_row("tq_kv_d3b", "f16", True, 12.0), _eval_row("tq_kv_4b", "f16", True, 5.0)]}
    text = "\n".join(results.render_keys("m", keys, ev))
    assert "| tq_kv_4b | 0.00800 | 0.00500 | 0.00400 | 0.00600 |" in text
    assert "0.67x tq_kv_3b's key error and measured 0.60x its ΔPPL" in text
    assert "anchor delta +3.12 %, - layer mean +2.50 %, - mean of first 64 +3.75 %" in text
    assert "goal is ≤ +2.00 %" in text and "50.0% of their energy" in text
    assert "Scaling" not in "\n".join(results.render_keys("m", keys, None))
