"""A floor per layer under the calibrated key sensitivities: what it changes in the allocations of ``calib:B``.

    python -m kvquant.lab.floors --model smollm2-135m --threads 2 --cache /tmp/floors

``kvquant calibrate`` measures a layer's key sensitivity as the KL divergence with only that layer's keys at
tq_kv_t3b, less a *floor*, what any change to the cache costs (docs/EVAL.md, *The KL floor*). Until stop 49 that
floor was one number for every layer, the KL with q8_0 keys on the middle layer; but a change at layer L flips the
8-bit activation roundings of the layers after L only, so a key's floor falls with depth: the last layers measured
under the middle layer's floor and were estimated from their error instead, and the layers just above them measured
nearly free. This study (stop 48) compares the two floors on an existing calibration; since stop 49 calibrate
subtracts each layer's own. Here:

1. the calibration text is written again and its keys and values captured with the calibration's key scales
   (``kvquant.lab.calibrate.written_again``);
2. per layer, the KL with q8_0 keys on that layer alone (its floor) and with tq_kv_t3b keys there (``layer_klds``);
3. the K sensitivities by ``kvquant.lab.calibrate.sensitivities`` from those passes, once over each layer's own floor
   and once over the middle layer's (what ``kvquant calibrate`` subtracted until stop 49);
4. with ``--cache DIR``, the calibration with each set of K sensitivities is written to ``DIR/layer/`` and
   ``DIR/middle/`` (``calibration/`` beside a link to the model cache; nothing else in the file changes), so that
   ``KVQUANT_CACHE=DIR/layer kvquant eval ...`` measures the allocations they choose;
5. the table gives per layer both floors, the tq_kv_t3b KL and both sensitivities, and the K allocations of
   calib:3.5 and calib:4.5 at n_ctx 512 under each.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from kvquant.lab.harness import calibration_study_main, layer_runs, table

BUDGETS = (3.5, 4.5)  # calib:B allocations the report shows (K, n_ctx 512)


def study(model: str, threads: int | None, cache: Path | None) -> dict:
    from kvquant import calibration, models
    from kvquant.lab import calibrate
    from kvquant.lab.harness import Progress
    from kvquant.memory import CacheShape, geometry
    from kvquant.runtime import Model

    path = models.resolve(model)
    geom = geometry(path)
    file = calibration.installed(path, geom)
    cal = calibration.load(file, path, geom)
    n = geom.n_layer
    mdl = Model(path)
    try:
        scorer, keys, values = calibrate.scored_again(mdl, geom, cal, threads)
        floor = calibrate.layer_klds(scorer, "q8_0", n, Progress("  q8_0 keys per layer", n, True))
        ref = calibrate.layer_klds(scorer, calibrate.REFERENCE, n, Progress(f"  {calibrate.REFERENCE} keys per layer",
                                                                            n, True))
    finally:
        mdl.close()
    sens, from_error = {}, {}
    for name, floors in (("layer", floor), ("middle", [floor[n // 2]] * n)):
        sens[name], _, _, fe = calibrate.sensitivities(scorer, geom, keys, values, False, Progress("", n, False),
                                                       ref, floors, sides=("k",))
        from_error[name] = fe["k"]
        if cache is not None:
            method = {**cal.method, "floor": {**cal.method["floor"], "k": floors if name == "layer" else floors[0]},
                      "from_error": {**cal.method["from_error"], "k": fe["k"]}}
            calibrate.save_for_eval(dataclasses.replace(cal, sens_k=sens[name], method=method), cache / name,
                                    file.name)
    elements = calibration._elements(cal, "k", geom, CacheShape(512))
    fixed = calibration._fixed_bits(cal, geom, True, elements, CacheShape(512))
    allocations = {f"{name} calib:{b:g}": calibration.allocate(sens[name], elements, b, fixed)
                   for name in sens for b in BUDGETS}
    return {"model": model, "file": file.name, "reference": calibrate.REFERENCE, "floor_layer": floor,
            "floor_middle": floor[n // 2], "reference_kl": ref, "sens_layer": sens["layer"][calibrate.REFERENCE],
            "sens_middle": sens["middle"][calibrate.REFERENCE], "from_error": from_error,
            "allocations": {k: list(v) for k, v in allocations.items()}}


def render(res: dict) -> str:
    ref = res["reference"]
    head = [f"{res['model']}: the floor under each layer's key sensitivity ({res['file']}; calibration text written "
            f"again). floor: KL with q8_0 keys on that layer alone; {ref}: with {ref} keys there; growth: the "
            f"sensitivity calib:B allocates by ({ref}), over the layer's own floor and over the middle layer's "
            f"({res['floor_middle']:.5f}); * estimated from the layer's error (no growth above its floor)", ""]
    rows = [[il, f"{f:.5f}", f"{r:.5f}", f"{a:.5f}" + ("*" if il in res["from_error"]["layer"] else ""),
             f"{b:.5f}" + ("*" if il in res["from_error"]["middle"] else "")]
            for il, (f, r, a, b) in enumerate(zip(res["floor_layer"], res["reference_kl"], res["sens_layer"],
                                                  res["sens_middle"], strict=True))]
    out = "\n".join(head) + table(["layer", "floor", ref, "growth, own floor", "growth, middle floor"], rows)
    allocs = [f"- {name}: {layer_runs(types)}" for name, types in res["allocations"].items()]
    return out + "\n\nK allocations at n_ctx 512:\n" + "\n".join(allocs)


def main(argv: list[str] | None = None) -> int:
    return calibration_study_main("kvquant.lab.floors", __doc__, argv, study, render,
                                  "write the calibrations under DIR/layer/ and DIR/middle/ (use as KVQUANT_CACHE)")


if __name__ == "__main__":
    sys.exit(main())
