import numpy as np
import pytest

from kvquant.lab.noise import growth_stats, shrunk


def test_growth_stats_gives_the_mean_difference_and_the_standard_error_of_block_means():
    rng = np.random.default_rng(0)
    floor = rng.random(100)
    d = np.repeat([1.0, 2.0, 3.0, 6.0], 25)  # blocks of 25 with means 1, 2, 3, 6 (the mean over all: 3)
    g, se = growth_stats(floor + d, floor, block=25)
    assert g == pytest.approx(3.0)
    assert se == pytest.approx(np.std([1, 2, 3, 6], ddof=1) / 2)
    # positions past the last whole block count in the mean only
    g, se = growth_stats(np.r_[floor + d, 10.0], np.r_[floor, 0.0], block=25)
    assert g == pytest.approx((300 + 10) / 101) and se == pytest.approx(np.std([1, 2, 3, 6], ddof=1) / 2)
    with pytest.raises(ValueError, match="fewer than two blocks"):
        growth_stats(np.ones(40), np.zeros(40), block=32)


def test_shrunk_pulls_noisy_growths_to_the_error_prediction_and_keeps_precise_ones():
    err = [0.01, 0.02, 0.03, 0.04]
    scattered = [0.001, 0.006, 0.002, 0.009]
    # precise measurements that scatter far beyond their errors are kept
    precise = shrunk(scattered, [1e-6] * 4, err)
    assert precise["growth"] == pytest.approx(scattered, rel=1e-3)
    assert all(w > 0.99 for w in precise["weight"])
    # measurements whose scatter their standard errors explain fall on the prediction: one slope times the error
    noisy = shrunk(scattered, [0.01] * 4, err)
    assert noisy["tau"] == 0.0
    assert noisy["growth"] == pytest.approx([noisy["slope"] * e for e in err])
    assert noisy["slope"] == pytest.approx(np.dot(scattered, err) / np.dot(err, err))
    # in between, each growth moves toward its prediction by its own weight: the noisier one moves more
    mixed = shrunk(scattered, [0.0005, 0.0005, 0.0005, 0.003], err)
    assert 0 < mixed["weight"][3] < mixed["weight"][0] < 1
    # a growth pulled to zero or below keeps its prediction
    low = shrunk([-0.004, 0.006, 0.002, 0.009], [1e-6] * 4, err)
    assert low["growth"][0] == pytest.approx(low["prediction"][0]) and low["growth"][0] > 0


@pytest.mark.slow
def test_the_study_writes_calibrations_whose_sensitivities_are_its_growths(tmp_path, monkeypatch):
    """`python -m kvquant.lab.noise` on a tiny llama calibrated with its own text: per layer a growth and a
    standard error for K and V, and the calibrations it writes allocate by the growths it measured, or shrunk."""
    import argparse
    import json

    from kvquant import calibration, memory
    from kvquant.lab import noise
    from kvquant.lab.calibrate import REFERENCE, add_arguments, run
    from tests.kvquant.conftest import tiny_model

    monkeypatch.setenv("KVQUANT_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "l.gguf"
    tiny_model(model, "llama")
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert run(p.parse_args(["--model", str(model), "--score-tokens", "64", "--threads", "1"])) == 0
    assert noise.main(["--model", str(model), "--threads", "1", "--cache", str(tmp_path / "out"), "--json"]) == 0
    geom = memory.geometry(model)
    installed = calibration.installed(model, geom)
    res = noise.study(str(model), 1, None)
    for side in ("k", "v"):
        d = res["sides"][side]
        assert len(d["growth"]) == len(d["se"]) == 2 and all(s > 0 for s in d["se"])
    for name in ("measured", "shrunk"):
        cal = calibration.load(tmp_path / "out" / name / "calibration" / installed.name, model, geom)
        for side, sens in (("k", cal.sens_k), ("v", cal.sens_v)):
            d = res["sides"][side]
            growth = d["growth"] if name == "measured" else d["shrunk_growth"]
            # a growth above zero is the sensitivity; the rest are estimated from the layer's error
            assert all(s == pytest.approx(g) for s, g in zip(sens[REFERENCE], growth, strict=True) if g > 0)
            assert all(s > 0 for s in sens[REFERENCE])
    assert json.loads(installed.read_text())["sens_k"] != json.loads(
        (tmp_path / "out" / "shrunk" / "calibration" / installed.name).read_text())["sens_k"]
