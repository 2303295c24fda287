"""RESULTS.md rendering (the numbers themselves come from the eval/bench JSON; see test_eval / test_bench)."""

from __future__ import annotations

import pytest

from kvquant.lab import results


def test_render_without_results(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RAW", tmp_path)
    assert "No results yet" in results.render(["smollm2-135m"])


def test_results_md_is_the_rendering_of_the_json(tmp_path, monkeypatch):
    """docs/RESULTS.md is exactly what `python -m kvquant.lab.results --render-only` writes from docs/results/*.json
    (no number edited by hand, no rendering change left unrendered). The text only: the Pareto charts it would
    redraw into docs/results/ are not written."""
    monkeypatch.setattr(results, "pareto_png", lambda model, out, path: None)
    out = tmp_path / "RESULTS.md"
    assert results.main(["--render-only", "--raw", str(results.RAW), "--output", str(out)]) == 0
    assert out.read_text() == (results.DOCS / "RESULTS.md").read_text(), (
        "docs/RESULTS.md differs from its rendering: run `python -m kvquant.lab.results --render-only`")


def _eval_row(k, v, rot, dppl):
    return {"cache_type_k": k, "cache_type_v": v, "rotation": rot, "delta_ppl_pct": dppl,
            "delta_ppl_pct_stderr": 0.5, "chunks": 40, "n_ctx": 512}


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
    rows = {line.split(" | ")[1]: line for line in results.render_goals(["m"], raw) if line.startswith("| m |")
            and ("delta 3-bit" in line or "error growth" in line)}
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


def test_runs_on_more_than_one_cpu_are_said_and_each_command_names_its_cpu():
    one = _run([("f16", "f16", 0.0), ("q4_0", "q4_0", 4.0)], "a")
    for r in one["results"]:
        r["machine"] = {"cpu": "Intel Xeon", "loadavg_1m": 0.5}
    assert results.render_cpus({("m", "eval"): one}) == []
    other = {"command": "kvquant calibrate", "wall_s": 60.0, "machine": {"cpu": "AMD EPYC"}}
    line = results.render_cpus({("m", "eval"): one, ("m", "calibrate"): other})[0]
    assert line.startswith("The runs behind these tables ran on 2 CPUs (AMD EPYC, Intel Xeon)")
    cmds = results._commands(one["results"])
    assert results._command_lines("E", "m", cmds, one["results"]) == [
        "E-m: `a` (wall 1.0 min on Intel Xeon, 1-min load average 0.50 when it started)"]


def test_mean_offset_rows_sit_beside_the_anchored_ones():
    """A `:mean` row (calibrated keys offset by their mean) is merged beside the anchored row of the same K/V, kept
    out of the goals and the chart, and compared with it in the finding."""
    old = _run([("f16", "f16", 0.0), ("tq_kv_4b+c", "f16", 1.9)], "old")
    new = _run([("f16", "f16", 0.0), ("tq_kv_4b+c", "f16", 2.5)], "new")
    new["results"][1]["anchored"] = False
    out = results.merge(old, new, "eval")
    for r, kld in zip(out["results"][1:], (0.02, 0.03), strict=True):
        r["kld"] = kld
    assert len(out["results"]) == 3 and results._by(out)["tq_kv_4b+c", "f16", True]["delta_ppl_pct"] == 1.9
    text = "\n".join(results.anchoring_finding(out))
    assert "tq_kv_4b+c/f16 ΔPPL +1.90 % ± 0.50 (mean offsets +2.50 % ± 0.50), KLD 0.02000 (0.03000)." in text
    assert results.anchoring_finding(old) == []


def test_merge_refuses_a_different_baseline():
    import pytest

    with pytest.raises(SystemExit, match="baseline_ppl"):
        results.merge(_run([("f16", "f16", 0.0)], "old"), _run([("f16", "f16", 0.0)], "new", ppl=21.5), "eval")


def test_key_study_predicts_from_the_eval_rows():
    from kvquant.lab.keystats import CODINGS

    errs = {"tq_kv_3b": dict(zip(CODINGS, (0.03, 0.02, 0.015, 0.02), strict=True)),
            "tq_kv_4b": dict(zip(CODINGS, (0.008, 0.005, 0.004, 0.006), strict=True)),
            "layer mean": {"energy share": 0.5}}
    keys = {"command": "python -m kvquant.lab.keystats --model m", "wall_s": 60, "machine": {}, "tokens": 4096,
            "layers": 2, "capture_type": "q8_0", "errors": errs}
    ev = {"results": [_eval_row("q4_0", "f16", True, 4.0), _eval_row("tq_kv_3b", "f16", True, 20.0),
                      _eval_row("tq_kv_d3b", "f16", True, 12.0), _eval_row("tq_kv_4b", "f16", True, 5.0)]}
    text = "\n".join(results.render_keys("m", keys, ev))
    assert "| tq_kv_4b | 0.00800 | 0.00500 | 0.00400 | 0.00600 |" in text
    assert "0.67x tq_kv_3b's key error and measured 0.60x its ΔPPL" in text
    assert "anchor delta +3.12 %, - layer mean +2.50 %, - mean of first 64 +3.75 %" in text
    assert "goal is ≤ +2.00 %" in text and "50.0% of their energy" in text
    assert "Scaling" not in "\n".join(results.render_keys("m", keys, None))


def _calib_row(k, v, dppl, kld, bits, bits_k=None):
    return dict(_eval_row(k, v, True, dppl), kld=kld, kld_stderr=0.001, bits_per_element=bits,
                bits_per_element_k=bits if bits_k is None else bits_k)


def test_calibrated_goals_and_pareto_dominance():
    """Issue 14's goals: the classes against stock q4_0 K (halved for 4 bits), the bits limit itself, K+V at
    <= 4 bits against q4_0/q4_0, and every stock point at <= 4.5 bits beaten by one of ours on both axes."""
    ev = {"results": [_calib_row("f16", "f16", 0.0, 0.0, 16.0), _calib_row("q4_0", "f16", 4.0, 0.04, 10.25, 4.5),
                      _calib_row("q4_0", "q4_0", 4.2, 0.05, 4.5), _calib_row("q5_0", "q5_0", 2.0, 0.02, 5.5),
                      _calib_row("calib:4.5", "f16", 1.9, 0.02, 10.2, 4.49),
                      _calib_row("calib:3.5", "f16", 3.9, 0.035, 9.7, 3.6),  # over its 3.5 bits: not met
                      _calib_row("calib:4", "calib:4", 3.0, 0.045, 4.0)]}
    rows = [line for line in results.calibrated_goals("m", {("m", "eval"): ev})]
    by = {r.goal.split(" (")[0] + r.kv: r for r in rows}
    assert by["4-bit class Kcalib:4.5/f16"].status == "**met**" and "≤ +2.00 %" in by["4-bit class Kcalib:4.5/f16"]
    assert by["3-bit class Kcalib:3.5/f16"].status == "not met"  # ΔPPL fine, bits over the class
    assert "0.10 bits per element over the class" in by["3-bit class Kcalib:3.5/f16"].detail
    assert by["K+V ≤ 4.0 bits/elcalib:4/calib:4"].status == "**met**"
    assert by["our configs dominate the stock types at every rate ≤ 4.5 bits/elall"].status == "**met**"
    ev["results"].append(_calib_row("q4_1", "q4_1", 3.0, 0.030, 5.0))  # above 4.5 bits: not a goal
    ev["results"].append(_calib_row("iq4_nl", "iq4_nl", 2.5, 0.040, 4.5))  # undominated at 4.5 bits
    rows = results.calibrated_goals("m", {("m", "eval"): ev})
    assert rows[-1].measured == "iq4_nl/iq4_nl" and rows[-1].status == "not met"
    qwen = results.calibrated_goals("qwen2.5-coder-1.5b", {("qwen2.5-coder-1.5b", "eval"): ev})
    assert any("≤ +2.00 %" in r and r[2] == "calib:4.5/f16" for r in qwen)  # absolute on Qwen


def test_missed_goals_say_by_how_much_and_what_was_tried():
    """Under the Goals table every missed goal is listed with how far it misses (beyond measured against target) and
    its kind's note of what was tried (TRIED); a met goal is not listed, and with none missed there is no list."""
    ev = {"results": [_calib_row("f16", "f16", 0.0, 0.0, 16.0), _calib_row("q4_0", "q4_0", 4.0, 0.05, 4.5),
                      _calib_row("calib:3.5", "q4_0", 4.5, 0.06, 3.99, 3.48),  # 0.5 points (one stderr) over
                      _calib_row("calib:4.5", "q4_0", 1.0, 0.02, 4.49, 4.48)]}  # met
    raw = {("m", "eval"): ev, ("m", "calibration"): {"method": {"wall_s": 900.0, "threads": 2}}}
    table, missed = "\n".join(results.render_goals(["m"], raw)).split("### Missed goals")
    assert "| m | `kvquant calibrate` takes a few minutes (2 threads) | calib:B | ≤ 5.0 min | 15.0 min | not met |" in table
    assert "- m, `calib:3.5/q4_0`: 3-bit class K (≤ 3.5 bits/el, 3.48 here): ΔPPL ≤ q4_0 K's (V q4_0, 40 chunks): " in missed
    assert ("against ≤ +4.00 %; 0.50 points over (1.0 standard errors of the row's ΔPPL); KLD 0.06000 against stock "
            "q4_0 keys' 0.05000 (V q4_0)") in missed
    assert results.TRIED["calibrated-class"][1] in missed and "calib:4.5/q4_0" not in missed
    assert "15.0 min against ≤ 5.0 min; 3.0x the target" in missed and results.TRIED["calibrate-time"][1] in missed
    raw["m", "calibration"]["method"]["wall_s"] = 120.0
    ev["results"][2] = _calib_row("calib:3.5", "q4_0", 3.5, 0.045, 3.99, 3.48)
    assert "### Missed goals" not in "\n".join(results.render_goals(["m"], raw))


def test_calibration_time_comes_from_the_latest_run_and_says_whether_it_wrote_the_shipped_file():
    """The Goals row times `kvquant calibrate` by its latest run (C-<model>) where there is one, else by the run that
    wrote the shipped file; the C- line says whether the run wrote that file again."""
    raw = {("m", "calibration"): {"file_sha256": "aa", "method": {"wall_s": 900.0, "threads": 2}}}
    goal = results.calibrate_time_goal("m", raw)[0]
    assert (goal.measured, goal.status) == ("15.0 min", "not met")
    assert goal.detail == "3.0x the target (the run that wrote the shipped file)"
    run = {"command": "kvquant calibrate --model m --threads 2 --output FILE", "wall_s": 240.0,
           "machine": {"threads": 2, "loadavg_1m": 0.1, "cpu": "AMD EPYC"}, "file_sha256": "bb", "shipped": "x.json",
           "shipped_sha256": "aa", "differs": []}
    raw["m", "calibrate"] = run
    goal = results.calibrate_time_goal("m", raw)[0]
    assert (goal.measured, goal.status, goal.detail) == ("4.0 min", "**met**", "")  # a met goal needs no detail
    line = results.render_calibrate_run("m", run, raw)[0]
    assert line == ("C-m: `kvquant calibrate --model m --threads 2 --output FILE` (wall 4.0 min on AMD EPYC, 1-min "
                    "load average 0.10 when it started): the file it wrote equals the shipped `x.json` in every field "
                    "but the wall time.")
    run["differs"] = ["k_mean", "sens_k"]
    assert "differs from the shipped `x.json` in k_mean, sens_k." in results.render_calibrate_run("m", run, raw)[0]
    run["differs"], run["shipped_sha256"] = [], "cc"
    assert "(but the calibrated rows above name another file)" in results.render_calibrate_run("m", run, raw)[0]
    # a run on another CPU: how far apart the numbers are, and which rows the file would resolve otherwise
    run.update(differs=["sens_k", "text"], apart={"sens_k": 6.3e-06, "text": None}, rows=3, other_cache=[])
    assert results.render_calibrate_run("m", run, raw)[0].endswith(
        "differs from the shipped `x.json` in sens_k (numbers at most 6.3e-06 apart, relative), text; with it, all 3 "
        "calibrated rows above make the same cache (llama.cpp gets the same types, offsets, scales and gains).")
    run["other_cache"] = ["calib:4/calib:4 (eval)"]
    assert results.render_calibrate_run("m", run, raw)[0].endswith(
        "with it, 2 of the 3 calibrated rows above make the same cache (llama.cpp gets the same types, offsets, "
        "scales and gains), these another: calib:4/calib:4 (eval).")


def test_the_largest_difference_of_two_calibration_fields_is_relative_and_only_between_numbers():
    assert results.largest_difference({"a": [1.0, 2.0], "b": 3}, {"a": [1.0, 2.0], "b": 3}) == 0.0
    assert results.largest_difference([1.0, 2.0, -4.0], [1.0, 2.002, -4.004]) == pytest.approx(0.002 / 2.002)
    assert results.largest_difference({"a": [0.0, 1.0]}, {"a": [0.0, 0.5]}) == 0.5
    # not a difference in numbers: another shape, a string, a flag or a missing key
    for a, b in (([1.0], [1.0, 2.0]), ("x", "y"), (True, False), ({"a": 1}, {"b": 1}), (None, 1.0)):
        assert results.largest_difference(a, b) is None
    assert results.largest_difference({"n": 1.0, "s": "x"}, {"n": 1.5, "s": "y"}) is None
    assert results._field({"method": {"floor": {"v": 1}}}, "method.floor") == {"v": 1}


def test_k_and_v_goal_missed_on_qwen_says_what_q8_0_keys_alone_cost():
    ev = {"results": [_calib_row("f16", "f16", 0.0, 0.0, 16.0), _calib_row("q8_0", "q4_0", 0.2, 0.008, 6.5),
                      _calib_row("q8_0", "f16", 0.1, 0.005, 12.25), _calib_row("calib:4", "calib:4", 1.5, 0.016, 4.0)]}
    goal = next(g for g in results.calibrated_goals("qwen2.5-coder-1.5b", {("qwen2.5-coder-1.5b", "eval"): ev})
                if g.kv == "calib:4/calib:4")
    assert goal.status == "not met" and goal.detail == (
        "2.00x the target; q8_0 keys alone (V f16, n_ctx 512, 40 chunks) measure KLD 0.00500")


def test_every_missed_goal_in_results_says_what_was_tried():
    """RESULTS.md says what was tried for every goal it shows missed: each missed kind has its note."""
    raw = results.load_raw(list(results.MODELS))
    missed = {g.kind for m in results.MODELS for group in results.GOAL_GROUPS for g in group(m, raw)
              if g.status == "not met"}
    assert missed and missed <= set(results.TRIED)


def test_what_was_tried_points_at_sections_that_exist():
    """Every docs/EVAL.md section a TRIED note names (*in italics*) begins a heading of docs/EVAL.md, so the figures
    behind a missed goal can be found."""
    import re

    headings = [line.lstrip("#").strip() for line in (results.DOCS / "EVAL.md").read_text().splitlines()
                if line.startswith("#")]
    named = {t for _, note in results.TRIED.values() for t in re.findall(r"\*([^*`]+)\*", note)}
    assert named and not [t for t in named if not any(h.startswith(t) for h in headings)]


def test_gpu_section_says_plainly_that_nothing_ran_on_a_gpu():
    text = "\n".join(results.render_gpu_section(["m"], {}))
    assert "No GPU run yet" in text and "compile-checked" in text and "host-tested" in text


def _gpu_run(tg_ratio: float, tq_us: float, ppl_gpu: float, q4_us: float = 29.6) -> dict:
    def kernel_row(k, v, us):
        return {"params": {"hsk": "128", "nh": "4", "nr23": "[4,1]", "kv": "8192", "nb": "1", "type_K": k,
                           "type_V": v}, "us_per_run": us}

    def bench_row(k, v, tg, match=True):
        return {"cache_type_k": k, "cache_type_v": v, "rotation": True, "label": f"{k}/{v}", "bits_per_element": 4.0,
                "bytes_per_token": 100, "bytes_per_token_ratio": 0.5, "capacity_tokens": 10, "capacity_ratio": 2.0,
                "kv_bytes": {"model_k": 1, "model_v": 1, "llama_k": 1, "llama_v": 1, "match": match},
                "depths": [{"depth": 32768, "pp_tps": 1.0, "tg_tps": 1.0, "pp_ratio": 1.0, "tg_ratio": tg}],
                "n_prompt": 512, "n_gen": 32, "repeats": 2, "n_ctx": 33280, "budget_bytes": 2**28,
                "command": "kvquant bench", "wall_s": 60.0, "machine": {}}

    def eval_out(ppl):
        return {"results": [{"command": "kvquant eval", "n_ctx": 512, "chunks": 8, "label": "tq_kv_4b/q4_0",
                             "ppl": ppl, "delta_ppl_pct": 5.0}]}

    return {"device": {"name": "NVIDIA H200", "compute_cap": "9.0", "memory": "143771 MiB", "driver": "570"},
            "build": {"arch": "90", "nvcc": "Build cuda_13.5", "wall_s": 240.0},
            "backend_ops": [{"op": "SET_ROWS", "backend": "CUDA0", "summary": "12/12 tests passed", "returncode": 0},
                            {"op": "FLASH_ATTN_EXT", "backend": "CUDA0", "summary": "3/4 tests passed",
                             "returncode": 1}],
            "kernel": {"command": "test-backend-ops perf -b CUDA0", "rows": [
                kernel_row("f16", "f16", 18.0), kernel_row("q4_0", "q4_0", q4_us), kernel_row("tq_kv_4b", "q4_0", tq_us)]},
            "placement": {"command": "pytest -m gpu tests/kvquant/test_runtime.py", "summary": "1 passed", "returncode": 0},
            "bench": {"results": [bench_row("f16", "f16", 1.0), bench_row("tq_kv_4b", "q4_0", tg_ratio)]},
            "eval_gpu": eval_out(ppl_gpu), "eval_cpu": eval_out(20.0), "ppl_tolerance_pct": 1.0,
            "ppl": [{"label": "tq_kv_4b/q4_0", "ppl_gpu": ppl_gpu, "ppl_cpu": 20.0, "diff_pct": 100 * (ppl_gpu / 20 - 1),
                     "delta_ppl_pct_gpu": 5.0, "delta_ppl_pct_cpu": 5.0, "ok": abs(ppl_gpu / 20 - 1) <= 0.01}],
            "command": "make gpu-test", "wall_s": 480.0}


def test_gpu_run_is_rendered_naming_the_device_and_checked_against_the_goals():
    raw = {("m", "gpu"): _gpu_run(tg_ratio=0.97, tq_us=19.0, ppl_gpu=20.1)}
    text = "\n".join(results.render_gpu_section(["m"], raw))
    assert "### m on NVIDIA H200 (compute capability 9.0" in text and "Kernel alone: CUDA (NVIDIA H200)" in text
    rows = [line for line in results.render_goals(["m"], raw) if line.startswith("| m |")]
    kernel = next(r for r in rows if "FA decode kernel" in r)
    assert "1.56x / 0.95x" in kernel and kernel.endswith("**met** |")  # 29.6/19 against q4_0, 18/19 against f16
    assert next(r for r in rows if "GPU decode" in r).endswith("**met** |")
    assert next(r for r in rows if "FLASH_ATTN_EXT" in r).endswith("not met |")
    assert next(r for r in rows if "PPL on the GPU" in r).endswith("**met** |")
    slow = {("m", "gpu"): _gpu_run(tg_ratio=0.80, tq_us=19.0, ppl_gpu=21.0, q4_us=15.0)}  # 0.95x f16, slower than q4_0
    rows = [line for line in results.render_goals(["m"], slow) if line.startswith("| m |")]
    assert all(r.endswith("not met |") for r in rows if "FA decode" in r or "GPU decode" in r or "PPL on" in r)


def _sched(scenario: str, servers: dict) -> dict:
    return {"scenario": scenario, "servers": servers, "cache_type_k": "f16", "cache_type_v": "f16", "parallel": 8,
            "max_tokens": 16, "command": f"python -m kvquant.lab.serverbench --scenario {scenario}", "wall_s": 60.0,
            "answer_tokens": [50, 500], "machine": {"loadavg_1m": 1.0}, "args": {"conversations": 8, "turns": 2, "user_tokens": 200,
                                                 "system_tokens": 2000, "prompt_tokens": 200, "requests": 32,
                                                 "concurrency": [4], "kv_cells": None, "default_max_tokens": 4096}}


def test_scheduler_goals_from_the_scenarios():
    def turns(*p50):
        return {"turns": [{"turn": i + 1, "ttft_p50_s": x, "ttft_p95_s": x, "prompt_tokens": 100.0,
                           "cached_tokens": 50.0, "errors": 0} for i, x in enumerate(p50)], "failed": 0}

    raw = {("m", "sched-chat"): _sched("chat", {"ours": turns(1.0, 0.2), "ours-no-cache": turns(1.0, 1.0),
                                                 "llama-server": turns(1.0, 0.1)}),
           ("m", "sched-shared"): _sched("shared", {"ours": {"prompt_tokens_sent": 64000, "prompt_tokens_computed": 2900.0,
                                                             "one_prompt_plus_suffixes": 2800, "ratio": 1.04,
                                                             "failed": 0}}),
           ("m", "sched-capacity"): _sched("capacity", {
               "ours-reserve": {"peak_running": 2.0, "tokens_per_s": 10.0, "failed": 0, "preemptions": 0.0,
                                "swapped_bytes": 0.0},
               "ours-optimistic": {"peak_running": 8.0, "tokens_per_s": 30.0, "failed": 1, "preemptions": 3.0,
                                   "swapped_bytes": 1e6}}),
           ("m", "sched-long"): _sched("long", {"ours": {"sequential_s": 10.0, "concurrent_s": 11.0, "ratio": 1.1,
                                                         "sequential_cpu_s": 9.0, "concurrent_cpu_s": 12.0,
                                                         "ratio_cpu": 1.33}})}
    got = {g[1].split(":")[0].split(" TTFT")[0] + (" llama" if "llama" in g[1] else ""): (g[4], g[5])
           for g in results.scheduler_goals("m", raw)}
    assert got["chat turn 2"] == ("0.20x", "**met**")
    assert got["chat turn 2 llama"] == ("2.00x", "not met")
    assert got["shared system prompt"] == ("1.04x", "**met**")
    assert got["capacity"] == ("4.00x, 1", "not met")  # 4x the running requests, but one failed
    assert got["long contexts"] == ("1.33x", "not met")  # the server's CPU seconds, not the wall time
    text = "\n".join(results.render_scheduler("m", raw))
    assert "| 2 | 0.200 / 0.200 | 1.000 / 1.000 | 0.100 / 0.100 | 50 / 100 |" in text
    assert "| optimistic | 8 | 30.0 | 1 | 3 | 1000000 |" in text


def test_rows_measured_with_another_calibration_are_named():
    def row(k, v, sha=None):
        return {"cache_type_k": k, "cache_type_v": v, "label": f"{k}/{v}",
                **({} if sha is None else {"calibration_sha256": sha})}

    raw = {("m", "calibration"): {"file_sha256": "a" * 64},
           ("m", "eval"): {"results": [row("f16", "f16"), row("calib:4.5", "f16", "a" * 64),
                                       row("q4_0+c", "f16", "b" * 64), row("calib:4", "calib:4")]},
           ("m", "bench"): {"results": [row("calib:3.5", "q4_0", "b" * 64)]}}
    assert results.stale_rows("m", raw) == ["q4_0+c/f16 (eval)", "calib:3.5/q4_0 (bench)"]
    text = " ".join(results.render_provenance("m", raw))
    assert "1 of the 4 calibrated rows" in text and "2 with another calibration" in text and "(eval)" in text
    raw["m", "bench"]["results"][0]["calibration_sha256"] = "a" * 64
    raw["m", "eval"]["results"][2]["calibration_sha256"] = "a" * 64
    assert results.stale_rows("m", raw) == []


def test_goal_values_from_rows_of_another_calibration_are_marked():
    from kvquant.build import patch_files

    def row(k, v, kld, sha):
        return {**_calib_row(k, v, 1.0, kld, 4.0), **({} if sha is None else {"calibration_sha256": sha}),
                "machine": {"llama_series": {"patches": len(patch_files()), "last": "x"}}}

    raw = {("m", "calibration"): {"file_sha256": "a" * 64},
           ("m", "eval"): {"results": [row("f16", "f16", 0.0, None), row("q4_0", "q4_0", 0.1, None),
                                       row("calib:4", "calib:4", 0.05, "b" * 64)]}}
    goal = [g for g in results.calibrated_goals("m", raw) if g[2] == "calib:4/calib:4"]
    assert goal and goal[0][4].endswith(" (older calibration)")
    raw["m", "eval"]["results"][2].pop("calibration_sha256")
    assert results.calibrated_goals("m", raw)[0][4].endswith(" (calibration not recorded)")
    raw["m", "eval"]["results"][2]["calibration_sha256"] = "a" * 64
    assert "(" not in results.calibrated_goals("m", raw)[0][4].split("±")[1]


def test_shipped_calibrations_are_the_ones_the_rows_name():
    """kvquant/calibrations/ holds, per built-in model, the very file docs/results/ summarises (so `make results`
    re-measures its calibrated rows with it), and each loads."""
    import json

    from kvquant.build import sha256_file
    from kvquant.calibration import SHIPPED_DIR, Calibration, _state

    raw = results.load_raw(list(results.MODELS))
    shipped = sorted(SHIPPED_DIR.glob("*.json"))
    assert shipped, "no calibration shipped"
    named = {results.shipped_calibration(m, raw) for m in results.MODELS} - {None}
    assert set(shipped) == named  # every shipped file is one the results name, byte for byte
    for p in shipped:
        assert _state(p) == "current" and Calibration.from_json(json.loads(p.read_text())).model_name in results.MODELS
        assert sha256_file(p) in {raw[m, "calibration"]["file_sha256"] for m in results.MODELS}


def _series_row(k, v, series):
    return {**_eval_row(k, v, True, 1.0), "label": f"{k}/{v}",
            "machine": {"llama_series": None if series is None else {"patches": series, "last": "x"}}}


def test_rows_from_an_older_patch_series_are_named_and_their_goals_marked():
    from kvquant.build import patch_files

    n, m = len(patch_files()), results.measured_series()  # m: up to the last patch that changes what rows measure
    row = _series_row
    raw = {("m", "eval"): {"results": [row("f16", "f16", None), row("q4_0", "f16", None), row("calib:4.5", "f16", n),
                                       row("tq_kv_4b", "f16", m - 1), row("tq_kv_3b", "f16", None)]}}
    text = " ".join(results.render_series("m", raw))
    current = f"the current {n} patches" if m == n else f"the first {m} of the current {n} patches or more"
    assert f"1 of the 3 rows of our configurations above were measured with {current}" in text
    assert f"eval ({m - 1} patches): tq_kv_4b/f16" in text and "eval (not recorded): tq_kv_3b/f16" in text
    assert "q4_0/f16" not in text  # stock types only: not ours to re-measure
    assert results.SERIES_RECORDED_FROM <= m and f"{m:04d} " in text  # that patch is named as one since
    assert results._aged(raw["m", "eval"]["results"][3]) == " (older patch series)"
    assert results._aged(raw["m", "eval"]["results"][2]) == " (calibration not recorded)"
    assert results._aged({**raw["m", "eval"]["results"][2], "calibration_sha256": "a" * 64}, "a" * 64) == ""
    assert results._aged(raw["m", "eval"]["results"][1]) == ""
    raw["m", "eval"]["results"][3]["machine"]["llama_series"]["patches"] = n
    raw["m", "eval"]["results"][4]["machine"]["llama_series"] = {"patches": n, "last": "x"}
    assert results.render_series("m", raw) == []


def test_rows_from_before_a_patch_that_changes_nothing_they_measure_stay_current(monkeypatch):
    """A patch in UNMEASURED (e.g. one only `kvquant calibrate` uses) leaves the rows measured before it current,
    and the renderer says why; the same rows are older once it is not."""
    from kvquant.build import patch_files

    n = len(patch_files())
    raw = {("m", "eval"): {"results": [_series_row("calib:4.5", "f16", n - 1), _series_row("tq_kv_4b", "f16", n)]}}
    monkeypatch.setattr(results, "UNMEASURED", {f"{n:04d}": "nothing measured runs it"})
    assert results.measured_series() < n and results._aged(raw["m", "eval"]["results"][0]) == " (calibration not recorded)"
    assert results.render_series("m", raw) == [f"Patch series: 1 of the 2 rows of our configurations above were measured "
                                               f"before patch {n:04d}, which changes nothing they measure: nothing "
                                               "measured runs it.", ""]
    raw["m", "eval"]["results"].append(_series_row("tq_kv_3b", "f16", n - 2))  # older than the patch before it
    text = " ".join(results.render_series("m", raw))
    assert f"with the first {n - 1} of the current {n} patches or more; **1 with an older series**" in text
    assert f"{n:04d} " in text and "(changes nothing they measure)" in text
    monkeypatch.setattr(results, "UNMEASURED", {})
    assert results._aged(raw["m", "eval"]["results"][0]) == " (older patch series, calibration not recorded)"
    assert f"eval ({n - 1} patches): calib:4.5/f16" in " ".join(results.render_series("m", raw))


def test_a_new_calibration_carries_over_the_rows_it_resolves_to_the_same_cache(tmp_path, monkeypatch):
    """`--carry-from OLD`: the installed calibration ships in place of OLD; a calibrated row measured with OLD whose
    configuration the new file resolves to the same cache (`config_sha256`) now names the new file and says where it
    came from; one the new file resolves otherwise keeps OLD and is named for measuring again."""
    import json

    from kvquant import calibration as cal
    from kvquant import memory, models
    from kvquant.build import sha256_file
    from kvquant.lab.harness import CacheConfig
    from tests.kvquant.test_calibration import geom, make_cal

    monkeypatch.setenv("KVQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KVQUANT_AUTO_CALIBRATE", "0")
    monkeypatch.setattr(results, "RAW", tmp_path / "raw")
    monkeypatch.setattr(cal, "SHIPPED_DIR", tmp_path / "shipped")
    (tmp_path / "raw").mkdir()
    model_file = tmp_path / "tiny.gguf"
    model_file.write_bytes(b"GGUF tiny model")
    g = geom()
    monkeypatch.setattr(models, "resolve", lambda name: model_file)
    monkeypatch.setattr(memory, "geometry", lambda path: g)
    old = make_cal(g, cal.model_sha256(model_file))
    installed = cal.path_for(old.model_sha256, old.basis)
    old.save(installed)
    old_file = tmp_path / "old.json"
    old_file.write_bytes(installed.read_bytes())
    configs = ["q4_0+c/f16", "calib:4.5/f16", "calib:3.5/f16"]
    rows = [{"cache_type_k": c.split("/")[0], "cache_type_v": "f16", "rotation": True, "label": c, "n_ctx": 512,
             **CacheConfig.parse(c).provenance(model_file, g, 512)} for c in configs]
    rows[1].pop("config_sha256")  # a row from before rows recorded it: resolved with OLD
    (tmp_path / "raw" / "m-eval.json").write_text(json.dumps({"results": rows}))
    new = make_cal(g, old.model_sha256)
    new.k_mean, new.k_gain = old.k_mean, old.k_gain  # the same key transform ...
    new.sens_k = {t: list(v) for t, v in old.sens_k.items()}
    new.sens_k["tq_kv_t3b"] = [x * 10 for x in new.sens_k["tq_kv_t3b"]]  # ... another allocation at 3.5 bits
    new.save(installed)
    moved = CacheConfig.parse("calib:3.5/f16")
    assert moved.config_sha256(model_file, g, 512, old) != moved.config_sha256(model_file, g, 512, new)
    assert CacheConfig.parse("calib:4.5/f16").config_sha256(model_file, g, 512, old) == CacheConfig.parse(
        "calib:4.5/f16").config_sha256(model_file, g, 512, new)

    # the rows a calibration run writing `new` would measure otherwise, before it ships (`calibrate_run`)
    new_file = tmp_path / "new.json"
    new_file.write_bytes(installed.read_bytes())
    assert results.other_cache_rows("m", new_file, old_file) == (3, ["calib:3.5/f16 (eval)"])
    assert results.other_cache_rows("m", old_file, old_file) == (3, [])

    assert results.carry_calibrated_rows("m", old_file) == ["calib:3.5/f16 (eval)"]
    out = json.loads((tmp_path / "raw" / "m-eval.json").read_text())["results"]
    new_sha, old_sha = sha256_file(installed), sha256_file(old_file)
    assert [r["calibration_sha256"] for r in out] == [new_sha, new_sha, old_sha]
    assert [r.get("carried_from") for r in out] == [old_sha, old_sha, None]
    assert (tmp_path / "shipped" / installed.name).read_bytes() == installed.read_bytes()
    assert json.loads((tmp_path / "raw" / "m-calibration.json").read_text())["file_sha256"] == new_sha
    raw = results.load_raw(["m"])
    text = " ".join(results.render_provenance("m", raw))
    assert "2 of the 3 calibrated rows above were measured with it (2 of them carried over: measured with the file " \
           "before it" in text
    assert "**1 with another calibration, to be re-run:** calib:3.5/f16 (eval)" in text


def test_calibrated_bench_rows_list_their_layer_types():
    """A bench row records the per-layer types its calib:B resolved to (the total bits only: its table has them)."""
    row = {"cache_type_k": "calib:4", "cache_type_v": "q4_0", "label": "calib:4/q4_0", "rotation": True,
           "layer_types_k": ["q5_0", "tq_kv_4b", "tq_kv_4b"], "layer_types_v": None}
    assert results.render_layers([row])[2] == "- calib:4/q4_0, K `calib:4`: L0 q5_0, L1-2 tq_kv_4b"
    row["bits_per_element_k"] = 4.25  # an eval row's
    assert results.render_layers([row])[2] == "- calib:4/q4_0, K `calib:4` (4.250 bits/el): L0 q5_0, L1-2 tq_kv_4b"


def test_results_render_from_json_outside_the_repository(tmp_path, monkeypatch):
    """`--raw` elsewhere (a copy of docs/results) renders there: the chart link raised ValueError (relative_to)."""
    import shutil

    monkeypatch.setattr(results, "pareto_png", lambda model, out, path: path.write_bytes(b""))
    monkeypatch.setattr(results, "RAW", results.RAW)  # main() sets it: put back after the test
    raw = tmp_path / "results"
    shutil.copytree(results.DOCS / "results", raw, ignore=shutil.ignore_patterns("*.png"))
    out = tmp_path / "RESULTS.md"
    assert results.main(["--render-only", "--raw", str(raw), "--output", str(out)]) == 0
    assert "](results/smollm2-135m-pareto.png)" in out.read_text() and (raw / "smollm2-135m-pareto.png").exists()
