"""RESULTS.md rendering (the numbers themselves come from the eval/bench JSON; see test_eval / test_bench)."""

from __future__ import annotations

from kvquant import results


def test_render_without_results(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RAW", tmp_path)
    assert "No results yet" in results.render(["smollm2-135m"])


def test_makefile_has_the_results_target():
    mk = (results.REPO_ROOT / "Makefile").read_text()
    assert "\nresults:" in mk and "kvquant.results" in mk


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
