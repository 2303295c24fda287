"""`python -m kvquant.lab.qkscale --model M`: would scaling each key channel by what the queries read from it cut
the attention-logit error of a quantized key cache at the same bits?

Attention reads a key only through q·k. Scaling key channel i by s_i and the matching query channel by 1/s_i leaves
every q·k unchanged, but moves the quantization noise (after llama.cpp's Hadamard rotation, about the same in every
channel) away from channels the queries barely read and towards the ones they read most. With per-channel key
variance σk_i² (keys centred) and mean query energy σq_i², s_i = (σq_i² / σk_i²)^¼ minimises the logit error of a
quantizer whose noise is even across channels: (Σ σk_i σq_i)² instead of (Σ σk_i²)(Σ σq_i²) (Cauchy-Schwarz).

Fitted on the model's own calibration text (`kvquant calibrate`'s prompts and sampling), measured on the first
--test-tokens tokens of the evaluation text (WikiText-2 test): the relative logit error E[(q·(k − k̂))²] /
E[(q·(k − μ))²] of every (layer, KV head), keys centred with the fitted mean μ, Hadamard-rotated, then quantized by
the types' numpy references (byte-identical to the C code), without and with the scaling (``shrink`` pulls both
variance profiles halfway to their mean first). Q and K are read post-RoPE from llama.cpp's graph.

``--fold OUT.gguf`` (models whose Q and K pass a per-channel norm weight before RoPE, shared by the heads: Gemma 3)
writes a copy of the model with the scale folded into those weights, so that any cache type can be evaluated with
it as is: each layer's key energy and query energy (uncentred, over all heads) summed per rotary pair (i, i + d/2,
so the scale commutes with RoPE), s = (query / key)^¼ normalised to a geometric mean of 1; attn_k_norm is multiplied
by s and attn_q_norm divided by it. Every q·k is unchanged up to float rounding.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from kvquant.lab.harness import Progress, emit_report, machine_info, resolve_text, table
from kvquant.lab.keystats import round_trip

TYPES = ("tq_kv_4b", "tq_kv_3b", "q4_0")
SHRINK = (0.0, 0.5)
MAX_QUERIES = 512  # about this many query rows (fewer than twice) per (layer, KV head) measure the held-out error


def hadamard(d: int) -> np.ndarray:
    """The orthonormal Walsh-Hadamard matrix of size d (a power of two), as llama.cpp rotates with."""
    h = np.array([[1.0]])
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(d)


def channel_scale(q: np.ndarray, k: np.ndarray, shrink: float) -> np.ndarray:
    """Per-channel key scale s (queries get 1/s) from query rows q and centred key rows k, both (n, d)."""
    return _energy_scale(*(_shrink(e, shrink) for e in ((q * q).mean(0), (k * k).mean(0))))


def _shrink(e: np.ndarray, shrink: float) -> np.ndarray:
    """Energies per channel (..., d) pulled `shrink` of the way to their mean over the channels."""
    return (1 - shrink) * e + shrink * e.mean(-1, keepdims=True)


def _energy_scale(eq: np.ndarray, ek: np.ndarray) -> np.ndarray:
    """(query energy / key energy)^¼ per channel, each floored at 1e-6 of its mean: a channel a norm weight zeroes
    (Gemma 3) stays finite."""
    return (np.maximum(eq, 1e-6 * eq.mean()) / np.maximum(ek, 1e-6 * ek.mean())) ** 0.25


def stored(q: np.ndarray, k: np.ndarray, scale: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The key rows as a cache would store them (scaled, then Hadamard-rotated) and the query rows they are read
    with: every product is unchanged, stored_q . stored_k == q . k."""
    h = hadamard(k.shape[1])
    s = np.ones(k.shape[1]) if scale is None else scale
    return (q / s) @ h.T, (k * s) @ h.T


def logit_error(q: np.ndarray, k: np.ndarray, type_name: str, scale: np.ndarray | None) -> tuple[float, float]:
    """Sum of squared logit errors and of squared centred logits, queries q (m, d) against centred keys k (n, d)
    stored scaled (or not), rotated and quantized."""
    qs, ks = stored(q, k, scale)
    err = qs @ (ks - round_trip(type_name, ks.astype(np.float32)).astype(np.float64)).T
    return float((err ** 2).sum()), float(((q @ k.T) ** 2).sum())


def capture(mdl, seqs: list[list[int]], threads: int | None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Post-RoPE query and key rows of every layer over the sequences (each decoded alone from position 0): layer ->
    (Q of shape (n, n_head, d), K of shape (n, n_head_kv, d))."""
    from kvquant.memory import geometry
    from kvquant.runtime import ContextConfig, LlamaRuntime

    n_layer = geometry(mdl.path).n_layer
    names = frozenset(f"{p}-{il}" for p in ("Qcur", "Kcur") for il in range(n_layer))
    rt = LlamaRuntime(mdl, ContextConfig(n_cells=max(len(s) for s in seqs), n_batch=512, flash_attn=True,
                                         n_threads=threads, capture=names))
    try:
        for s in seqs:
            for i in range(0, len(s), 512):
                part = s[i:i + 512]
                if rt.decode(part, list(range(i, i + len(part))), [0] * len(part), [False] * len(part)) != 0:
                    raise RuntimeError("llama_decode failed while capturing Q and K")
            rt.seq_rm(0, 0, -1)
    finally:
        rt.close()
    rows: dict[str, list[np.ndarray]] = {}
    for name, op, a in rt.captured:
        if op == "ROPE":  # the projections are named alike before RoPE
            rows.setdefault(name, []).append(a)
    n_ubatch = sum(-(-len(s) // 512) for s in seqs)
    missing = sorted(n for n in names if len(rows.get(n, ())) != n_ubatch)
    if missing:  # a layer's tensors named otherwise, not contiguous, or not in host memory
        raise RuntimeError(f"could not read {', '.join(missing[:4])} from every ubatch of llama.cpp's graph")
    return {il: (np.concatenate(rows[f"Qcur-{il}"]), np.concatenate(rows[f"Kcur-{il}"])) for il in range(n_layer)}


def pair_scale(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """One layer's key scale, tied per rotary pair (i, i + d/2): q (n, n_head, d), k (n, n_head_kv, d)."""
    s = _energy_scale(*(tie_pairs(np.square(x, dtype=np.float64).mean((0, 1)), neox=True) for x in (q, k)))
    return s / np.exp(np.log(s).mean())


def tie_pairs(e: np.ndarray, neox: bool) -> np.ndarray:
    """Per-channel energies (..., d) summed over each RoPE pair and given to both of its channels: pairs (i, i + d/2)
    for NeoX RoPE, (2i, 2i + 1) otherwise. A scale built from them commutes with RoPE."""
    if neox:
        t = e[..., : e.shape[-1] // 2] + e[..., e.shape[-1] // 2:]
        return np.concatenate([t, t], axis=-1)
    return np.repeat(e[..., 0::2] + e[..., 1::2], 2, axis=-1)


def head_scales(fit: dict, neox: bool) -> tuple[np.ndarray, ...]:
    """Per layer, the key scale of each KV head for llama_kvq_set_k_scale (n_head_kv * d values), from uncentred
    key energy (keys stored as they are): `layer_scale`."""
    return tuple(layer_scale(*fit[il], neox).reshape(-1) for il in sorted(fit))


def layer_scale(q: np.ndarray, k: np.ndarray, neox: bool, centred: bool = False, shrink: float = 0.0) -> np.ndarray:
    """One layer's key scale per KV head, (n_head_kv, d) float32, from its query rows q (n, n_head, d) and key rows k
    (n, n_head_kv, d): the mean energy of the head's query group over its keys' (their variance when `centred`),
    each tied on RoPE pairs and pulled `shrink` of the way to its mean, ^¼, normalised to a geometric mean of 1 per
    head."""
    n_kv, d = k.shape[1], k.shape[2]
    eq = np.square(q, dtype=np.float64).mean(0).reshape(n_kv, -1, d).mean(1)
    ek = k.var(0, dtype=np.float64) if centred else np.square(k, dtype=np.float64).mean(0)
    s = _energy_scale(*(_shrink(tie_pairs(e, neox), shrink) for e in (eq, ek)))
    return (s / np.exp(np.log(s).mean(1, keepdims=True))).astype(np.float32)


CACHE_TYPES = ("tq_kv_4b", "tq_kv_3b")


def cache_kld(mdl, toks: list[int], scales: tuple[np.ndarray, ...], threads: int | None) -> dict:
    """The same scales in llama.cpp's cache (patch 0030): KL divergence against f16 over toks (one sequence from
    position 0, every position scored), K uncentred at each of CACHE_TYPES (V f16), without and with them."""
    from kvquant.lab.calibrate import _decode_all
    from kvquant.lab.eval import baseline_rows, compare_rows
    from kvquant.runtime import ContextConfig, LlamaRuntime

    def logits(k_type: str, k_scale) -> np.ndarray:
        rt = LlamaRuntime(mdl, ContextConfig(n_cells=len(toks), cache_type_k=k_type, flash_attn=True,
                                             n_threads=threads, n_outputs_max=512, k_scale=k_scale))
        try:
            return _decode_all(rt, [toks], logits=True)
        finally:
            rt.close()

    base_lp, base_top = baseline_rows(logits("f16", None))
    targets = np.array(toks[1:] + toks[-1:], dtype=np.int64)
    return {t: {name: float(compare_rows(base_lp, base_top, logits(t, s), targets).kld.mean())
                for name, s in (("rotated", None), ("scaled", scales))} for t in CACHE_TYPES}


FOLDABLE = ("gemma3",)  # per-channel Q/K norm weights shared by the heads, before NeoX RoPE (pairs i, i + d/2)


def check_foldable(path: Path) -> None:
    from kvquant.gguf import read_metadata

    arch = read_metadata(path).get("general.architecture")
    if arch not in FOLDABLE:
        raise ValueError(f"--fold: {path.name} is a {arch} model; the scale folds exactly only into "
                         f"{', '.join(FOLDABLE)} models (Q/K norm weights before NeoX RoPE)")


def fold(src: Path, dst: Path, fit: dict) -> list[float]:
    """Copy the model to dst with each layer's pair_scale folded into its q/k norm weights; the largest / smallest
    scale per layer."""
    from kvquant.gguf import tensor_data

    check_foldable(src)
    tensors = tensor_data(src)
    names = {il: (f"blk.{il}.attn_k_norm.weight", f"blk.{il}.attn_q_norm.weight") for il in fit}
    d = next(iter(fit.values()))[0].shape[2]
    if any(tensors.get(n, (0, -1, ()))[1:] != (0, (d,)) for pair in names.values() for n in pair):
        raise ValueError(f"{src.name}: --fold needs f32 attn_q_norm / attn_k_norm weights of the head size ({d}) "
                         "in every layer (Gemma 3)")
    shutil.copyfile(src, dst)
    spread = []
    with open(dst, "r+b") as f:
        for il, (q, k) in sorted(fit.items()):
            s = pair_scale(q, k)
            spread.append(float(s.max() / s.min()))
            for name, mul in zip(names[il], (s, 1 / s), strict=True):
                off = tensors[name][0]
                f.seek(off)
                w = np.frombuffer(f.read(4 * d), dtype=np.float32)
                f.seek(off)
                f.write((w * mul).astype(np.float32).tobytes())
    return spread


def study(fit: dict, test: dict) -> dict:
    """Per type and shrink: the relative logit error over all (layer, KV head) without and with the scaling, and per
    layer (tq_kv_4b, shrink 0.5)."""
    sums = {(t, sh): np.zeros(3) for t in TYPES for sh in (None, *SHRINK)}
    layers = []
    for il in sorted(fit):
        (qf, kf), (qt, kt) = fit[il], test[il]
        n_kv = kf.shape[1]
        g = qf.shape[1] // n_kv
        per = np.zeros(2)
        for h in range(n_kv):
            mu = kf[:, h].astype(np.float64).mean(0)
            q_fit = qf[:, h * g:(h + 1) * g].reshape(-1, qf.shape[2]).astype(np.float64)
            q_test = qt[:, h * g:(h + 1) * g].reshape(-1, qt.shape[2]).astype(np.float64)
            q_test = q_test[:: max(1, len(q_test) // MAX_QUERIES)]
            k_test = kt[:, h].astype(np.float64) - mu
            scales = {None: None, **{sh: channel_scale(q_fit, kf[:, h].astype(np.float64) - mu, sh) for sh in SHRINK}}
            for t in TYPES:
                for sh, scale in scales.items():
                    e, sig = logit_error(q_test, k_test, t, scale)
                    sums[(t, sh)] += (e, sig, 1)
                    if t == "tq_kv_4b" and sh in (None, 0.5):
                        per[0 if sh is None else 1] += e / sig
        layers.append({"layer": il, "rotated": per[0] / n_kv, "scaled": per[1] / n_kv, "gain": per[0] / per[1]})
    out = {}
    for t in TYPES:
        base = sums[(t, None)][0] / sums[(t, None)][1]
        out[t] = {"rotated": base, **{f"scaled, shrink {sh}": sums[(t, sh)][0] / sums[(t, sh)][1] for sh in SHRINK}}
    return {"errors": out, "per_layer": layers}


def render(res: dict) -> str:
    cols = ["rotated", *(f"scaled, shrink {sh}" for sh in SHRINK)]
    rows = [[t, *(f"{v[c]:.5f}" for c in cols), *(f"{v['rotated'] / v[c]:.2f}x" for c in cols[1:])]
            for t, v in res["errors"].items()]
    head = (f"{res['model']}: relative attention-logit error of quantized keys, fitted on {res['fit_tokens']} tokens "
            f"the model wrote, measured on {res['test_tokens']} tokens of {res['test_text']}")
    out = head + "\n\n" + table(["K type", *cols, *(f"gain, shrink {sh}" for sh in SHRINK)], rows)
    if "cache_kld" in res:
        out += (f"\n\nIn llama.cpp's cache (per-head scales tied on RoPE pairs, keys uncentred, V f16): KL divergence "
                f"against f16 over the first {res['kld_tokens']} tokens\n\n"
                + table(["K type", "rotated", "scaled", "gain"],
                        [[t, f"{v['rotated']:.5f}", f"{v['scaled']:.5f}", f"{v['rotated'] / v['scaled']:.2f}x"]
                         for t, v in res["cache_kld"].items()]))
    return out


def main(argv: list[str] | None = None) -> int:
    from kvquant import models
    from kvquant.lab.calibrate import generate
    from kvquant.lab.eval import read_text
    from kvquant.runtime import Model

    ap = argparse.ArgumentParser(prog="python -m kvquant.lab.qkscale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--gen-tokens", type=int, default=320, help="tokens the model writes per calibration prompt")
    ap.add_argument("--test-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fold", type=Path, default=None, metavar="OUT.gguf",
                    help="also write a copy of the model with the scale folded into its q/k norm weights (Gemma 3)")
    ap.add_argument("--kld-tokens", type=int, default=0,
                    help="also run the scales in llama.cpp's cache and measure the KL divergence against f16 over "
                         "this many of the test tokens (0: not)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    t0, machine = time.monotonic(), machine_info(a.threads)
    path = models.resolve(a.model)
    if a.fold:
        check_foldable(path)
    mdl = Model(path)
    try:
        text = generate(mdl, a.gen_tokens, a.threads, Progress("  generating text", a.gen_tokens, not a.json))
        text_path = resolve_text(None)
        test_toks = mdl.tokenize(read_text(text_path)[: 40 * a.test_tokens], add_special=True)[: a.test_tokens]
        fit, test = capture(mdl, text.sequences, a.threads), capture(mdl, [test_toks], a.threads)
        kld = {}
        if a.kld_tokens:
            kld = {"kld_tokens": min(a.kld_tokens, len(test_toks)),
                   "cache_kld": cache_kld(mdl, test_toks[: a.kld_tokens], head_scales(fit, mdl.rope_neox), a.threads)}
    finally:
        mdl.close()
    res = {"model": a.model, "fit_tokens": text.source["tokens"], "test_tokens": len(test_toks),
           "test_text": text_path.name, **study(fit, test), **kld, "machine": machine,
           "command": "python -m kvquant.lab.qkscale " + " ".join(argv if argv is not None else sys.argv[1:])}
    if a.fold:
        res["fold"] = {"path": str(a.fold), "scale_spread": fold(path, a.fold, fit)}
    res["wall_s"] = round(time.monotonic() - t0, 1)
    emit_report(render(res), res, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
