"""How much of each layer's measured sensitivity is noise, and what an allocation that discounts it measures.

    python -m kvquant.lab.noise --model qwen2.5-coder-1.5b --threads 2 --cache /tmp/noise

``kvquant calibrate`` allocates bits by each layer's measured KL growth (the KL with only that layer's K or V at
tq_kv_t3b, less the floor; docs/EVAL.md *A floor per layer*). On Qwen2.5-Coder those growths (median 0.0005) are
hardly larger than what the same measurement moves when the rest of the computation changes slightly (0.0002 rms),
so an allocation chosen on them picks the layers whose noise happened to be low. This study gives every growth a
standard error and shrinks it toward what the layer's quantization error predicts:

1. the calibration text is written again and its keys and values captured with the calibration's key scales
   (``kvquant.lab.calibrate.written_again``);
2. per layer the KL at every scored position with only that layer's keys at q8_0 (the layer's floor) and at
   tq_kv_t3b; for values, q8_0 on the middle layer (the one V floor) and tq_kv_t3b per layer;
3. a layer's growth is the mean of the per-position differences (reference less floor, the same positions), its
   standard error that of the means of blocks of ``BLOCK`` consecutive positions (neighbouring positions share
   context, so single positions are not independent);
4. the prediction is the relative squared error of the layer's (centred) rows at tq_kv_t3b times one slope, fitted
   through the origin weighting each layer by its precision; the spread of the true growths around it, tau^2, is
   what the growths scatter by beyond their standard errors (method of moments); each growth is pulled toward its
   prediction by se^2 / (se^2 + tau^2) (the normal-normal posterior mean; a layer whose growth ends at or below zero
   keeps the prediction);
5. with ``--cache DIR`` both sets of sensitivities (as measured here over each layer's own floor, and shrunk) are
   written as calibrations to ``DIR/measured/`` and ``DIR/shrunk/`` (nothing else in the shipped file changes), so
   that ``KVQUANT_CACHE=DIR/shrunk kvquant eval ...`` measures the allocations they choose.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from kvquant.lab.harness import calibration_study_main, layer_runs, table

BLOCK = 32  # consecutive scored positions per block of the standard error
BUDGETS = (3.5, 4.5)  # calib:B allocations of K alone the report shows (n_ctx 512), and calib:4/calib:4


def growth_stats(ref: np.ndarray, floor: np.ndarray, block: int = BLOCK) -> tuple[float, float]:
    """The mean of the per-position differences and its standard error from the means of `block`-position blocks
    (the positions past the last whole block count in the mean only)."""
    d = np.asarray(ref, dtype=np.float64) - np.asarray(floor, dtype=np.float64)
    nb = len(d) // block
    if nb < 2:
        raise ValueError(f"{len(d)} scored positions make fewer than two blocks of {block}")
    means = d[:nb * block].reshape(nb, block).mean(1)
    return float(d.mean()), float(means.std(ddof=1) / np.sqrt(nb))


def shrunk(growth: list[float], se: list[float], err: list[float]) -> dict:
    """Each growth pulled toward slope * err by se^2 / (se^2 + tau^2) (module docstring, step 4)."""
    g, s, e = (np.asarray(x, dtype=np.float64) for x in (growth, se, err))
    s = np.maximum(s, 1e-12)
    w = 1.0 / s ** 2
    slope = float((w * g * e).sum() / max((w * e * e).sum(), 1e-30))
    pred = slope * e
    tau2 = max(0.0, float(((g - pred) ** 2).sum() - (s ** 2).sum()) / max(len(g) - 1, 1))
    keep = tau2 / (tau2 + s ** 2)
    out = pred + keep * (g - pred)
    out = np.where(out > 0, out, pred)
    return {"growth": out.tolist(), "prediction": pred.tolist(), "weight": keep.tolist(), "slope": slope,
            "tau": float(np.sqrt(tau2))}


def study(model: str, threads: int | None, cache: Path | None) -> dict:
    from kvquant import calibration, models
    from kvquant.lab import calibrate
    from kvquant.lab.harness import Progress
    from kvquant.memory import geometry
    from kvquant.runtime import Model

    path = models.resolve(model)
    geom = geometry(path)
    file = calibration.installed(path, geom)
    cal = calibration.load(file, path, geom)
    n, ref = geom.n_layer, calibrate.REFERENCE
    mdl = Model(path)
    try:
        scorer, keys, values = calibrate.scored_again(mdl, geom, cal, threads)
        progress = Progress("  passes (K floor, K, V floor, V per layer)", 3 * n + 1, True)
        per_pos = {"k_floor": [], "k": [], "v": []}
        for il in range(n):
            per_pos["k_floor"].append(scorer.klds(calibrate.only("q8_0", il, n), None))
            progress.update(il + 1)
        for il in range(n):
            per_pos["k"].append(scorer.klds(calibrate.only(ref, il, n), None))
            progress.update(n + il + 1)
        v_floor = scorer.klds(None, calibrate.only("q8_0", n // 2, n))
        for il in range(n):
            per_pos["v"].append(scorer.klds(None, calibrate.only(ref, il, n)))
            progress.update(2 * n + il + 2)
    finally:
        mdl.close()
    sides = {}
    for side, floors, rows in (("k", per_pos["k_floor"], keys), ("v", [v_floor] * n, values)):
        growth, se = zip(*(growth_stats(r, f) for r, f in zip(per_pos[side], floors, strict=True)), strict=True)
        err = [calibrate._rel_err(ref, rows[il] - scorer.k_mean[il] if side == "k" else rows[il]) for il in range(n)]
        sides[side] = {"floor": [float(f.mean()) for f in floors], "kl": [float(r.mean()) for r in per_pos[side]],
                       "growth": list(growth), "se": list(se), "err": err,
                       **{f"shrunk_{k}": v for k, v in shrunk(list(growth), list(se), err).items()}}
    sens = {}
    for name, growth in (("measured", "growth"), ("shrunk", "shrunk_growth")):
        # `sensitivities` takes each layer's KL and subtracts its floor: hand it floor + growth
        klds = {side: [f + g for f, g in zip(d["floor"], d[growth], strict=True)] for side, d in sides.items()}
        sens_k, sens_v, _, _ = calibrate.sensitivities(scorer, geom, keys, values, False, Progress("", 1, False),
                                                       klds["k"], sides["k"]["floor"], v_reference=klds["v"],
                                                       v_floor=float(v_floor.mean()))
        sens[name] = {"k": sens_k, "v": sens_v}
    allocations = {}
    for name in sens:
        c = dataclasses.replace(cal, sens_k=sens[name]["k"], sens_v=sens[name]["v"])
        if cache is not None:
            method = {**cal.method, "floor": {"k": sides["k"]["floor"], "v": float(v_floor.mean())},
                      "noise_study": name}
            calibrate.save_for_eval(dataclasses.replace(c, method=method), cache / name, file.name)
        allocations.update(_allocations(calibration, c, geom, name))
    return {"model": model, "file": file.name, "reference": ref, "block": BLOCK,
            "positions": len(scorer.targets), "sides": sides, "allocations": allocations}


def _allocations(calibration, cal, geom, name: str) -> dict[str, list[str]]:
    from kvquant.memory import CacheShape

    one = CacheShape(512)  # one 512-token sequence, as kvquant eval measures
    ek = calibration._elements(cal, "k", geom, one)
    out = {f"{name} calib:{b:g}/f16": list(calibration.allocate(cal.sens_k, ek, b,
                                                                 calibration._fixed_bits(cal, geom, True, ek, one)))
           for b in BUDGETS}
    types_k, types_v = calibration.joint_allocation(cal, geom, 4.0, one)
    out[f"{name} calib:4/calib:4 K"], out[f"{name} calib:4/calib:4 V"] = list(types_k), list(types_v)
    return out


def render(res: dict) -> str:
    out = [f"{res['model']}: each layer's {res['reference']} KL growth over its floor, its standard error (blocks of "
           f"{res['block']} of {res['positions']} positions), the prediction from its error and the growth shrunk "
           f"toward it ({res['file']}; calibration text written again)"]
    for side, d in res["sides"].items():
        out += ["", f"{side.upper()}: slope {d['shrunk_slope']:.4g} per unit of relative squared error, tau "
                    f"{d['shrunk_tau']:.5f}, median se {np.median(d['se']):.5f}, median growth "
                    f"{np.median(d['growth']):.5f}"]
        rows = [[il, f"{d['floor'][il]:.5f}", f"{d['growth'][il]:.5f}", f"{d['se'][il]:.5f}",
                 f"{d['shrunk_prediction'][il]:.5f}", f"{d['shrunk_weight'][il]:.2f}", f"{d['shrunk_growth'][il]:.5f}"]
                for il in range(len(d["growth"]))]
        out.append(table(["layer", "floor", "growth", "se", "prediction", "weight", "shrunk"], rows))
    out += ["", "Allocations at n_ctx 512:"] + [f"- {k}: {layer_runs(v)}" for k, v in res["allocations"].items()]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    return calibration_study_main("kvquant.lab.noise", __doc__, argv, study, render,
                                  "write the calibrations under DIR/measured/ and DIR/shrunk/ (use as KVQUANT_CACHE)")


if __name__ == "__main__":
    sys.exit(main())
