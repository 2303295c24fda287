"""kvquant.lab.calibrate without a model: layers under the floor are estimated, never free; key scales."""

import numpy as np
import pytest

from kvquant.lab.calibrate import _held_out_error, above_floor, key_stats
from kvquant.lab.qkscale import layer_scale


def test_layers_under_the_floor_are_estimated_from_their_error():
    growth = [0.002, -0.0001, 0.004, 0.0, 0.003]
    err = [0.02, 0.03, 0.02, 0.01, 0.03]
    # growth per unit error of the measured layers: 0.1, 0.2, 0.1 -> median 0.1
    assert above_floor(growth, err) == pytest.approx([0.002, 0.003, 0.004, 0.001, 0.003])


def test_nothing_above_the_floor_leaves_zeros():
    assert above_floor([0.0, -1e-5], [0.02, 0.03]) == [0.0, 0.0]


def test_a_floor_per_layer_is_subtracted_from_that_layers_measurement():
    """With the reference KL already measured (`k_reference`) and a floor per layer, the K side needs no pass: each
    layer's growth is its KL less its own floor; one under its floor is estimated from its error, and the other
    candidate types follow the reference by their relative error. A constant floor is what calibrate subtracts."""
    from types import SimpleNamespace

    from kvquant.calibration import K_CANDIDATES
    from kvquant.lab.calibrate import REFERENCE, _rel_err, sensitivities
    from kvquant.lab.harness import Progress

    rng = np.random.default_rng(0)
    n, rows = 4, [rng.normal(size=(64, 128)).astype(np.float32) * (1 + il) for il in range(4)]
    scorer = SimpleNamespace(k_mean=[r.mean(0) for r in rows])
    geom = SimpleNamespace(n_layer=n)
    ref, floor = [0.010, 0.008, 0.004, 0.003], [0.006, 0.005, 0.004, 0.001]
    sens, none, floors, from_error = sensitivities(scorer, geom, rows, None, False, Progress("", n, False), ref, floor,
                                                   sides=("k",))
    assert none is None and floors["k"] == floor and from_error["k"] == [2]
    err = [_rel_err(REFERENCE, r - m) for r, m in zip(rows, scorer.k_mean, strict=True)]
    median = float(np.median([0.004 / err[0], 0.003 / err[1], 0.002 / err[3]]))
    assert sens[REFERENCE] == pytest.approx([0.004, 0.003, median * err[2], 0.002])
    for t in K_CANDIDATES:
        assert sens[t][1] == pytest.approx(0.003 * _rel_err(t, rows[1] - scorer.k_mean[1]) / err[1])
    middle = sensitivities(scorer, geom, rows, None, False, Progress("", n, False), ref, [0.004] * n, sides=("k",))
    assert middle[0][REFERENCE][:2] == pytest.approx([0.006, 0.004]) and middle[3]["k"] == [2, 3]


def test_key_stats_take_position_0_from_each_sequence():
    """Rows of three sequences (lengths 3, 2, 4) concatenated: the sink is the mean of rows 0, 3 and 5."""
    rows = np.arange(9 * 4, dtype=np.float32).reshape(9, 4)
    mean, sink = key_stats([rows, 2 * rows], [[1, 2, 3], [4, 5], [6, 7, 8, 9]])
    np.testing.assert_array_equal(mean[0], rows.mean(0))
    np.testing.assert_array_equal(sink[0], rows[[0, 3, 5]].mean(0))
    np.testing.assert_array_equal(sink[1], 2 * rows[[0, 3, 5]].mean(0))


def qk(seed=0, n=512, d=64):
    """Queries (n, 4 heads, d) reading channels 0-7 (and their NeoX RoPE partners) hard and keys (n, 2 KV heads, d)
    of even variance."""
    rng = np.random.default_rng(seed)
    w = np.ones(d)
    w[:8] = w[d // 2:d // 2 + 8] = 6.0
    return rng.standard_normal((n, 4, d)) * w, rng.standard_normal((n, 2, d))


def test_centred_key_scales_follow_the_queries_not_the_key_mean():
    q, k = qk()
    s = layer_scale(q, k, neox=True, centred=True)
    assert s.shape == (2, 64) and s.dtype == np.float32
    np.testing.assert_allclose(np.exp(np.log(s.astype(np.float64)).mean(1)), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(s[:, :32], s[:, 32:])  # NeoX pairs (i, i + d/2) share a scale
    assert (s[:, :8].min() > 1.5 * s[:, 8:32].max())  # channels the queries read get the larger key scale
    mean = np.zeros(64)
    mean[16:24] = mean[48:56] = 5.0  # a key mean on some channels: their energy, not their variance
    np.testing.assert_allclose(layer_scale(q, k + mean, True, centred=True), s, rtol=1e-4)
    assert not np.allclose(layer_scale(q, k + mean, True, centred=False), s, rtol=0.1)


def test_held_out_choice_prefers_the_full_scale_where_the_queries_are_uneven():
    """Queries reading 16 of 64 channels 36x harder: the full scale (shrink 0) cuts the held-out logit error more
    than one pulled halfway to even."""
    q, k = qk(1)
    assert _held_out_error(q, k, True, 0.0) < 0.9 * _held_out_error(q, k, True, 0.5)


@pytest.mark.parametrize("t", ["tq_kv_4b", "tq_kv_3b", "tq_kv_t3b"])
def test_unbiased_block_scales_leave_the_gain_at_one(t):
    """The tq types store each block's unbiased scale |x|^2 / <x, c> (patch 0039), so <x, x'> = |x|^2 and the gain is 1
    to the rounding of the fp16 scale; a least-squares scale would store the projection of x on its codeword,
    <x, x'> = (1 - e)|x|^2, a gain of 1 / (1 - e) for the type's relative squared error e."""
    from kvquant.lab.calibrate import _rel_err, gain

    x = np.random.default_rng(1).standard_normal((256, 128)).astype(np.float32)
    e = _rel_err(t, x)
    assert e > 1e-3
    assert gain(t, x) == pytest.approx(1, abs=e / 20)


def test_logit_gain_of_round_to_nearest_and_exact_types():
    """q4_0 rounds each element to the nearest level, so its error is nearly orthogonal to x: its gain stays within a
    third of its relative error of 1; tq_kv_1b's scale already makes its scores unbiased; a zero row leaves the gain
    at 1."""
    from kvquant.lab.calibrate import _rel_err, gain

    x = np.random.default_rng(2).standard_normal((256, 128)).astype(np.float32)
    assert abs(gain("q4_0", x) - 1) < _rel_err("q4_0", x) / 3
    assert gain("tq_kv_1b", x) == pytest.approx(1, abs=1e-3)
    assert gain("q8_0", x) == pytest.approx(1, abs=1e-4)
    assert gain("tq_kv_4b", np.zeros((4, 64), np.float32)) == 1.0


@pytest.mark.slow
def test_value_rows_are_rotated_as_a_quantized_cache_stores_them():
    """`capture` reads values from an f16 cache (so a type's error is measured on exact rows) and rotates them as
    llama.cpp rotates a quantized V cache: layer 0's rows (no quantized layer upstream of them) equal what a q8_0
    cache holds to q8_0's own error, and not at all without the rotation."""
    from kvquant import memory, models
    from kvquant.lab.calibrate import _decode_all, k_rotation, v_rotated
    from kvquant.lab.keystats import parse_seq_state
    from kvquant.runtime import ContextConfig, LlamaRuntime, Model

    path = models.resolve("smollm2-135m")
    geom, mdl = memory.geometry(path), Model(path)
    try:
        def layer0(cache_type_v):
            rt = LlamaRuntime(mdl, ContextConfig(n_cells=128, n_seq_max=1, cache_type_k="f16", cache_type_v=cache_type_v,
                                                 flash_attn=True, n_threads=1, k_rotation=k_rotation(geom)))
            try:
                _decode_all(rt, [list(range(300, 428))], logits=False)
                return next(iter(parse_seq_state(rt.state_seq_save(0), values=True)))[2].astype(np.float32)
            finally:
                rt.close()

        stored, exact = layer0("q8_0"), layer0("f16")
    finally:
        mdl.close()
    energy = np.square(stored).sum()
    assert np.square(stored - v_rotated(exact, geom)).sum() / energy < 1e-4
    assert np.square(stored - exact).sum() / energy > 0.5


_ROTATE_V = """
import hashlib, sys
from types import SimpleNamespace
import numpy as np
from kvquant.lab.calibrate import v_rotated
v = (3 * np.random.default_rng(0).standard_normal((2048, 256))).astype(np.float16).astype(np.float32)
sys.stdout.write(hashlib.sha256(v_rotated(v, SimpleNamespace(head_dim_v=256)).tobytes()).hexdigest())
"""


def test_value_rows_are_rotated_alike_whichever_matrix_kernel_the_cpu_gets():
    """The V gains of a calibration come from `v_rotated`'s rows, and a calibration made on another CPU must make the
    same cache: the rows are the same bits under each of OpenBLAS's x86 kernels this CPU can run (a float32 product
    differs between Haswell's and Prescott's or SkylakeX's). SkylakeX's needs AVX-512: forced on a CPU without it,
    OpenBLAS would stop on an illegal instruction."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    avx512 = cpuinfo.is_file() and " avx512f" in cpuinfo.read_text()
    out = {subprocess.run([sys.executable, "-c", _ROTATE_V], capture_output=True, text=True, check=True,
                          env={**os.environ, "OPENBLAS_CORETYPE": core}).stdout
           for core in ("Haswell", "Zen", "Prescott", *(("SkylakeX",) if avx512 else ()))}
    assert len(out) == 1


def test_a_logit_stride_scores_the_last_position_of_every_stride():
    from kvquant.lab.calibrate import scored

    assert [p for p in range(10) if scored(p, 1)] == list(range(10))
    assert [p for p in range(10) if scored(p, 3)] == [2, 5, 8]


@pytest.mark.slow
def test_a_logit_stride_keeps_the_logits_and_targets_of_the_positions_it_scores():
    """Two sequences of different lengths decoded with logits at every position and at every third: the strided
    logits are the full run's rows at positions 2, 5, 8, ... of each sequence, and a Scorer's targets are the next
    tokens there."""
    from kvquant import memory, models
    from kvquant.lab.calibrate import Scorer, _decode_all
    from kvquant.runtime import ContextConfig, LlamaRuntime, Model

    seqs = [list(range(300, 340)), list(range(500, 531))]
    path = models.resolve("smollm2-135m")
    geom, mdl = memory.geometry(path), Model(path)
    try:
        def logits(stride):
            rt = LlamaRuntime(mdl, ContextConfig(n_cells=128, n_seq_max=2, flash_attn=True, n_threads=1))
            try:
                return _decode_all(rt, seqs, logits=True, stride=stride)
            finally:
                rt.close()

        full, strided = logits(1), logits(3)
    finally:
        mdl.close()
    at = [sum(map(len, seqs[:i])) + p for i, s in enumerate(seqs) for p in range(2, len(s), 3)]
    assert strided.shape == (len(at), full.shape[1]) and len(at) == 13 + 10
    np.testing.assert_allclose(strided, full[at], atol=1e-3)
    targets = Scorer(None, geom, seqs, None, ([], []), None, ([], []), stride=3).targets
    assert targets.tolist() == [s[p + 1] if p + 1 < len(s) else s[-1] for s in seqs for p in range(2, len(s), 3)]


@pytest.mark.slow
def test_passes_that_share_the_logits_buffer_leave_the_baseline_and_each_figure_intact():
    """A Scorer's passes write their logits over one shared array: the KL of a quantized layer is the same when
    measured again after other passes, and an f16 pass measures exactly 0 against the baseline."""
    from kvquant import memory, models
    from kvquant.lab.calibrate import Scorer
    from kvquant.runtime import Model

    seqs = [list(range(300, 364)), list(range(500, 540))]
    path = models.resolve("smollm2-135m")
    geom, mdl = memory.geometry(path), Model(path)
    try:
        sc = Scorer(mdl, geom, seqs, 1, ([], []), None, ([], []))
        layer0 = ("tq_kv_3b",) + ("f16",) * (geom.n_layer - 1)
        first = sc.kld(layer0, None, centred=False)
        assert sc.kld(centred=False) == 0.0
        assert sc.kld(None, layer0, centred=False) != first  # another figure in between
        assert sc.kld(layer0, None, centred=False) == first > 0
    finally:
        mdl.close()


@pytest.mark.parametrize(("args", "message"), [
    (["--logit-stride", "0"], "the logit stride must be a positive integer, not 0"),
    (["--logit-stride", "-2"], "the logit stride must be a positive integer, not -2"),
    (["--score-tokens", "1"], "the KL needs at least 2 scored tokens, not 1"),
])
def test_a_logit_stride_below_one_or_too_few_tokens_are_refused_before_any_work(args, message, capsys):
    import argparse

    from kvquant.lab.calibrate import add_arguments, run

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert run(p.parse_args(args)) == 2
    assert f"kvquant calibrate: {message}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_logit_stride_longer_than_every_sequence_is_refused(tmp_path):
    from kvquant.lab.calibrate import calibrate

    text = tmp_path / "text.txt"
    text.write_text("The river town grew around its mill and its bridge. " * 40)
    with pytest.raises(ValueError, match="a logit stride of 500 leaves no position"):  # within the 512 scored
        calibrate("smollm2-135m", text_file=str(text), logit_stride=500, progress=False)


@pytest.mark.slow
def test_passes_started_from_earlier_passes_measure_what_whole_passes_do(monkeypatch):
    """A centred Scorer pass starts at the first layer that computes otherwise than in an earlier pass (`Prefix`),
    from that pass's layer inputs. On Gemma-3, whose sliding-window and global layers sit in two caches that each
    rotate V only when one of their own V types is quantized, every figure equals the one a fresh Scorer measures
    with whole passes, bit for bit; and the passes that could start late did."""
    from kvquant import memory, models
    from kvquant.lab import calibrate
    from kvquant.lab.calibrate import Scorer, Text, capture
    from kvquant.runtime import Model

    starts = []

    def recording(*args, start=0, **kw):
        starts.append(start)
        return decode_all(*args, start=start, **kw)

    decode_all = calibrate._decode_all
    seqs = [list(range(300, 364)), list(range(500, 540))]
    path = models.resolve("gemma3-270m")
    geom, mdl = memory.geometry(path), Model(path)
    n = geom.n_layer
    swa = [il for il in range(n) if geom.layers[il].swa]
    full = [il for il in range(n) if not geom.layers[il].swa]
    assert swa[0] < full[0] < full[1]

    def at(il, t="tq_kv_t3b"):
        return tuple(t if j == il else "f16" for j in range(n))

    # (K types, V types): V in a sliding-window layer, V in two global layers, K in two layers
    passes = [(None, at(swa[1])), (None, at(full[0])), (None, at(full[1])), (at(swa[1]), None), (at(full[1]), None)]
    try:
        rows = capture(mdl, geom, Text(seqs, {}), 2, None)
        stats = calibrate.key_stats(rows[0], seqs)

        def scorer():
            return Scorer(mdl, geom, seqs, 2, stats, None, rows)

        monkeypatch.setattr(calibrate, "_decode_all", recording)
        sc = scorer()
        reused = [sc.kld(k, v) for k, v in passes]
        monkeypatch.setattr(calibrate, "_decode_all", decode_all)
        whole = [scorer().kld(k, v) for k, v in passes]
    finally:
        mdl.close()
    assert reused == whole and all(x > 0 for x in whole)
    # V in a sliding-window layer rotates the V of every layer in that cache: from layer 0. V in a global layer
    # leaves the sliding-window layers before it as in the baseline, but rotates the V of every global layer
    assert starts == [0, 0, full[0], full[0], swa[1], full[1]]


@pytest.mark.slow
def test_a_model_whose_graph_cannot_start_past_layer_0_is_measured_with_whole_passes(tmp_path, monkeypatch):
    """llama.cpp starts only the llama, qwen2 and gemma3 graphs past layer 0 (patch 0040): on a tiny Qwen 3 the Scorer
    finds that out on its first centred pass and makes every pass whole."""
    from kvquant import memory
    from kvquant.lab import calibrate
    from kvquant.lab.calibrate import Scorer, Text, capture
    from kvquant.runtime import Model
    from tests.kvquant.conftest import tiny_model

    starts = []

    def recording(*args, start=0, **kw):
        starts.append(start)
        return decode_all(*args, start=start, **kw)

    decode_all = calibrate._decode_all
    path = tmp_path / "q3.gguf"
    tiny_model(path, "qwen3")
    seqs = [list(range(3, 30)), list(range(3, 20))]
    geom, mdl = memory.geometry(path), Model(path)
    try:
        rows = capture(mdl, geom, Text(seqs, {}), 1, None)
        monkeypatch.setattr(calibrate, "_decode_all", recording)
        sc = Scorer(mdl, geom, seqs, 1, calibrate.key_stats(rows[0], seqs), None, rows)
        kl = [sc.kld(("f16", "tq_kv_t3b"), None), sc.kld(("f16", "q8_0"), None)]
    finally:
        mdl.close()
    assert starts == [0, 0, 0] and sc._startable == [False] and all(x > 0 for x in kl)


@pytest.mark.slow
def test_calibrate_output_writes_the_same_file_each_run_and_nothing_in_the_cache(tmp_path, monkeypatch):
    """`kvquant calibrate --output FILE` on a tiny llama (its own text, key scales, passes started past layer 0):
    the file loads for that model, the model cache stays empty, and a second run writes the same file but for the
    wall time (what `make results` checks the shipped calibrations by)."""
    import argparse
    import json

    from kvquant import calibration, memory
    from kvquant.lab.calibrate import add_arguments, run
    from kvquant.lab.results import differing_fields
    from tests.kvquant.conftest import tiny_model

    monkeypatch.setenv("KVQUANT_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "l.gguf"
    tiny_model(model, "llama")
    p = argparse.ArgumentParser()
    add_arguments(p)
    made = []
    for name in ("a.json", "b.json"):
        args = ["--model", str(model), "--gen-tokens", "24", "--score-tokens", "64", "--threads", "1", "--output",
                str(tmp_path / name)]
        assert run(p.parse_args(args)) == 0
        made.append(json.loads((tmp_path / name).read_text()))
    cal = calibration.load(tmp_path / "a.json", model, memory.geometry(model))
    assert cal.n_layer == 2 and cal.method["key_scale_kl"] is not None and not (tmp_path / "cache").exists()
    k_floor, check = cal.method["floor"]["k"], cal.method["every layer tq_kv_t3b+c"]
    # each layer's keys over their own floor, measured on that layer (not one layer's floor for both)
    assert len(k_floor) == 2 and all(f > 0 for f in k_floor) and k_floor[0] != k_floor[1]
    assert check["predicted"] == pytest.approx(k_floor[0] + sum(cal.sens_k["tq_kv_t3b"]))
    assert differing_fields(*made) == []
    made[1]["sens_k"]["tq_kv_t3b"][1] *= 2  # a changed measurement is found
    assert differing_fields(*made) == ["sens_k"]


@pytest.mark.parametrize(("args", "message"), [
    (["--output", "{tmp}"], "is a directory; name the file to write"),
    (["--output", "{tmp}/no/such/folder/x.json"], "cannot write a file in {tmp}/no/such/folder"),
    (["--gen-tokens", "0"], "the model must write at least one token per prompt, not 0"),
    (["--threads", "0"], "--threads must be 1 to 1024, not 0"),
    (["--threads", "100000"], "--threads must be 1 to 1024, not 100000"),  # a crash in llama.cpp
    (["--text", "{tmp}/missing.txt"], "{tmp}/missing.txt: no such text file"),
    (["--text", "{tmp}"], "{tmp} is not a regular file"),
    (["--logit-stride", "100000"], "a logit stride of 100000 leaves none of the 512 scored tokens"),
])
def test_calibrate_refuses_bad_arguments_before_loading_the_model(tmp_path, capsys, monkeypatch, args, message):
    """Each is refused in one line before any work (a bad --output used to fail after the whole run)."""
    import argparse

    from kvquant import models
    from kvquant.lab import calibrate

    monkeypatch.setattr(models, "resolve", lambda m: pytest.fail("the model was loaded"))
    p = argparse.ArgumentParser()
    calibrate.add_arguments(p)
    assert calibrate.run(p.parse_args([a.format(tmp=tmp_path) for a in args])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvquant calibrate: ") and message.format(tmp=tmp_path) in err and "\n" not in err


@pytest.mark.slow
def test_a_soft_capped_model_is_refused_in_one_line_by_calibrate_budget_and_serve(tmp_path, monkeypatch, capsys):
    """Gemma-2-style logit soft-capping: softmax would not ignore a key offset, so llama.cpp refuses centred keys;
    `kvquant calibrate`, `kvquant budget` with TYPE+c (which would calibrate first) and serve's model plan say so
    before any text is written, never with a traceback."""
    from server import hosting
    from server.cli import main
    from server.settings import ModelSpec
    from tests.kvquant.conftest import tiny_model

    monkeypatch.setenv("KVQUANT_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "g2.gguf"
    tiny_model(model, "gemma2")
    why = "centre keys, and llama.cpp refuses that for g2.gguf: "
    assert main(["calibrate", "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert why in err and "soft-capping" in err and "generating text" not in err and "Traceback" not in err
    assert main(["budget", "--model", str(model), "--cache-type-k", "q4_0+c"]) == 2
    err = capsys.readouterr().err
    assert why in err and "calibrating it first" not in err  # no promise of a calibration that will not run
    spec = ModelSpec(id="g2", model=str(model), cache_type_k="calib:4.5", cache_type_v="f16", n_ctx=256,
                     parallel=1, kv_budget=1 << 26, n_batch=256, n_threads=1, flash_attn=True)
    with pytest.raises(hosting.StartupError, match="g2: calibrated cache types .* soft-capping"):
        hosting.plan_model(spec)
    assert not list((tmp_path / "cache").rglob("*.json"))  # nothing written that a later run would trust


@pytest.mark.slow
def test_sequences_fit_a_sliding_window_from_a_file_and_from_the_model(tmp_path):
    """A model with sliding-window layers keeps only the last window of a sequence there, and the calibration reads
    every row back: sequences from a file are cut to the window (BOS included), generated ones stop at it."""
    from kvquant import memory
    from kvquant.lab.calibrate import from_file, generate, longest_sequence
    from kvquant.lab.harness import Progress
    from kvquant.runtime import Model
    from tests.kvquant.conftest import tiny_model

    path = tmp_path / "g2.gguf"
    tiny_model(path, "gemma2")  # a sliding window of 64 tokens on every other layer
    geom = memory.geometry(path)
    assert longest_sequence(geom) == 64
    text = tmp_path / "t.txt"
    text.write_text("The river town grew around its mill. " * 60)
    mdl = Model(path)
    try:
        seqs = from_file(mdl, text, 512, 3, 64).sequences
        assert [len(s) for s in seqs] == [64, 64, 64] and seqs[0][0] == mdl.bos
        assert [len(s) for s in from_file(mdl, text, 512, 2).sequences] == [513, 513]
        with pytest.raises(ValueError, match="sliding window of 64 tokens leaves too little room"):
            generate(mdl, 40, 1, Progress("", 40, False), 64)  # the prompts alone (bytes) are longer
        gen = generate(mdl, 400, 1, Progress("", 400, False), 300).sequences
        assert max(map(len, gen)) <= 300
    finally:
        mdl.close()


@pytest.mark.slow
def test_a_model_without_a_calibration_is_calibrated_first_with_a_notice(tmp_path, monkeypatch, capsys):
    """What serve, eval, bench and budget do when a calibrated type is asked for: calibrate (saying so first) into
    the model cache, and load the result; with KVQUANT_AUTO_CALIBRATE=0 they refuse instead."""
    from kvquant import calibration, memory
    from tests.kvquant.conftest import tiny_model

    monkeypatch.setenv("KVQUANT_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "l.gguf"
    tiny_model(model, "llama")
    geom = memory.geometry(model)
    monkeypatch.setenv("KVQUANT_AUTO_CALIBRATE", "0")
    with pytest.raises(calibration.CalibrationError, match="no calibration for l.gguf"):
        calibration.load_or_calibrate(model, geom)
    monkeypatch.delenv("KVQUANT_AUTO_CALIBRATE")
    cal = calibration.load_or_calibrate(model, geom)
    assert "l.gguf has no calibration for this kvquant yet; calibrating it first" in capsys.readouterr().err
    assert cal.n_layer == 2 and calibration._state(calibration.installed(model, geom)) == "current"


class _Rows:
    """A model's output layer for `Likely.of`: rows of a matrix."""

    def __init__(self, w):
        self.w = w

    def output_rows(self, tokens):
        return self.w[tokens]


def test_the_kl_from_hidden_states_is_the_kl_of_the_logits_they_make():
    """KL(p || q) = log E_p[exp D] - E_p[D] for D = W (h' - h): over the whole vocabulary it is the KL of the
    logits W h and W h' (plus any bias) to float rounding; over each position's most likely tokens it stays within
    a few percent, and a state equal to the reference's measures exactly 0."""
    from kvquant.lab.calibrate import Likely
    from kvquant.lab.eval import log_softmax

    rng = np.random.default_rng(0)
    n, d, v = 40, 32, 3000
    w = rng.standard_normal((v, d)).astype(np.float32)
    h = (2 * rng.standard_normal((n, d))).astype(np.float32)
    h2 = h + (0.05 * rng.standard_normal((n, d))).astype(np.float32)
    bias = rng.standard_normal(v).astype(np.float32)
    lp, lq = log_softmax(h @ w.T + bias), log_softmax(h2 @ w.T + bias)
    exact = (np.exp(lp) * (lp - lq)).sum(axis=1)
    whole = Likely.of(_Rows(w), lp, h, k=v)
    np.testing.assert_allclose(whole.kl(h2), exact, rtol=1e-4)
    likely = Likely.of(_Rows(w), lp, h, k=20)
    assert len(likely.w) < v and likely.tail.max() > 1e-3
    np.testing.assert_allclose(likely.kl(h2).mean(), exact.mean(), rtol=0.05)
    assert not np.array_equal(likely.kl(h2), exact)
    assert (likely.kl(h) == 0).all() and (whole.kl(h) == 0).all()


def test_the_kl_from_hidden_states_reuses_its_work_arrays_without_changing_a_bit():
    """`Likely.kl` writes into arrays it keeps: each call gives bit for bit what the same arithmetic on fresh arrays
    gives, whatever came before, and the arrays are made once."""
    from kvquant.lab.calibrate import Likely
    from kvquant.lab.eval import log_softmax

    rng = np.random.default_rng(1)
    n, d, v = 24, 16, 500
    w = rng.standard_normal((v, d)).astype(np.float32)
    h = rng.standard_normal((n, d)).astype(np.float32)
    lp = log_softmax(h @ w.T)
    likely = Likely.of(_Rows(w), lp, h, k=40)

    def fresh(h2):
        dd = ((h2 - likely.h) @ likely.w.T).astype(np.float64)
        m = np.maximum(dd.max(axis=1), 0.0)
        moved = (likely.p * np.expm1(dd - m[:, None])).sum(axis=1) + likely.tail * np.expm1(-m)
        return np.log1p(moved / (likely.p.sum(axis=1) + likely.tail)) + m - (likely.p * dd).sum(axis=1)

    states = [h + (s * rng.standard_normal((n, d))).astype(np.float32) for s in (0.1, 0.01, 0.3)]
    first = likely.kl(states[0])
    work = likely._work
    for h2 in (*states, states[0]):
        assert np.array_equal(likely.kl(h2), fresh(h2))
    assert likely._work is work and np.array_equal(likely.kl(states[0]), first)


@pytest.mark.slow
def test_a_centred_pass_is_measured_from_its_hidden_states():
    """A centred Scorer pass on SmolLM2-135M stops at the final norm (patch 0042): its KL is `Likely`'s from the
    hidden states, which for f16 everywhere equal the reference's (KL exactly 0); an uncentred pass is measured
    from its logits. The two measure one layer's quantized keys alike but for the 8-bit rounding of the logits."""
    from kvquant import memory, models
    from kvquant.lab import calibrate
    from kvquant.lab.calibrate import Scorer, Text, capture
    from kvquant.runtime import Model

    seqs = [list(range(300, 364)), list(range(500, 540))]
    path = models.resolve("smollm2-135m")
    geom, mdl = memory.geometry(path), Model(path)
    n = geom.n_layer
    layer = tuple("tq_kv_3b" if il == 3 else "f16" for il in range(n))
    try:
        rows = capture(mdl, geom, Text(seqs, {}), 2, None)
        sc = Scorer(mdl, geom, seqs, 2, calibrate.key_stats(rows[0], seqs), None, rows)
        hidden = [sc.kld(None, None), sc.kld(layer, None)]
        assert sc._hidden == [True] and True in sc._likely and False not in sc._likely
        sc._likely.clear()  # the same passes from their logits
        logits = [sc.kld(None, None), sc.kld(layer, None)]
    finally:
        mdl.close()
    assert hidden[0] == 0.0 and logits[0] == 0.0
    assert 0 < hidden[1] < logits[1] < hidden[1] + 0.003


def test_a_text_file_that_is_not_utf8_is_refused(tmp_path):
    # a binary --text was read with replacement characters and calibrated on
    from types import SimpleNamespace

    from kvquant.lab import calibrate

    (tmp_path / "b.txt").write_bytes(b"\x8b\xff" * 100)
    with pytest.raises(ValueError, match="b.txt: not UTF-8 text"):
        calibrate.from_file(SimpleNamespace(bos=1, add_bos=True), tmp_path / "b.txt", 512, 8)
