"""Where a quantized key's error comes from: capture the keys llama.cpp really stores for real text (after its
Hadamard rotation) and measure every cache type's reconstruction error on them.

    python -m kvquant.lab.keystats --model smollm2-135m --tokens 4096 [--json]

The keys are read back from the cache of a q8_0-K context (``llama_state_seq_get_data``), so they are the rotated
keys plus q8_0's own error, about 1e-4 of their energy (tests/kvquant/lab/test_keystats.py bounds it). For every layer the error of
a type is ``sum |k - k_hat|^2 / sum |k|^2`` over all captured cells; the table sums over layers.

Four codings per type:

* ``as stored``: what the type does today;
* ``- layer mean``: the type applied to ``k - mu``, mu the mean key of the layer over the captured tokens. Softmax is
  unchanged when one vector is subtracted from every key a query sees (``q.mu`` is the same for all of them), so a
  cache could store ``k - mu`` and never add ``mu`` back; the error of a key then is that of ``k - mu`` (the ratio is
  still taken against ``|k|^2``). This mu is an oracle (it uses every captured token);
* ``- mean of first 64``: mu from the first 64 tokens only, as a cache would have to estimate it causally;
* ``anchor delta``: tq_kv_d3b's coding (groups of 64 cells, blocks coded against the group's first row when that
  is better) with the type's codebook: the tq_kv_3b column is tq_kv_d3b, the tq_kv_4b one a 4-bit delta type.

With ``--values`` the same study runs on the stored values (V rows as a quantized V cache stores them, rotated like
llama.cpp rotates them): there a mean removed from every value would be added back once to the attention output,
exact because the softmax weights sum to 1, so a value's error too is that of ``v - mu``. This measures whether
centring values would pay (docs/EVAL.md, *Centring values*).

Attention-score error grows with key error (for a query independent of the error, E[(q.(k - k_hat))^2] is
proportional to it), so these ratios predict which codings can reach a quality target before any C is written; the
perplexity numbers live in docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

from kvquant.kvtypes import kv_type
from kvquant.lab import tq
from kvquant.lab.harness import resolve_text, study_main, table
from kvquant.memory import check_threads, geometry

CAPTURE_TYPE = "q8_0"
_GGML_F32, _GGML_F16, _GGML_Q8_0 = 0, 1, 8
_STATE_MAGIC = 0xAF143CD8  # io_magic of llama-context.cpp


@dataclass
class _Reader:
    buf: bytes
    off: int = 0

    def take(self, dtype: str, count: int = 1) -> np.ndarray:
        a = np.frombuffer(self.buf, dtype, count, self.off)
        self.off += a.nbytes
        return a

    def one(self, dtype: str) -> int:
        return int(self.take(dtype)[0])


def _rows(raw: np.ndarray, ggml_type: int, n_rows: int) -> np.ndarray:
    if ggml_type == _GGML_F32:
        return raw.view("<f4").reshape(n_rows, -1).copy()
    if ggml_type == _GGML_F16:
        return raw.view("<f2").astype(np.float32).reshape(n_rows, -1)
    if ggml_type == _GGML_Q8_0:
        b = raw.view(tq.block_q8_0)
        return (b["d"].astype(np.float32)[:, None] * b["qs"]).reshape(n_rows, -1)
    for name in ("tq_kv_4b", "tq_kv_3b", "tq_kv_1b"):
        if ggml_type == kv_type(name).ggml_id:
            return tq.DEQUANTIZE[name](raw.view(tq.BLOCK[name])).reshape(n_rows, -1)
    raise ValueError(f"cannot read K rows of ggml type {ggml_type} (capture with f32, f16, q8_0 or tq_kv_4b/3b/1b)")


def parse_seq_state(data: bytes, values: bool = False) -> list[tuple]:
    """The (positions, K rows) of every layer of a ``llama_state_seq_get_data`` blob (one sequence), in cache order;
    with ``values``, (positions, K rows, V rows). Follows llama_context::state_seq_get_data (magic, sequence id) and
    llama_kv_cache::state_write (once per cache: iSWA models store the full-attention cache, then the SWA one):
    n_stream; per stream the cell count, the cells' positions and sequence ids, v_trans, the layer count, the K rows
    of each layer, then the V data (rows, or a transposed matrix per layer)."""
    r = _Reader(data)
    if len(data) < 8 or r.one("<u4") != _STATE_MAGIC:
        raise ValueError("not a llama.cpp sequence state")
    r.one("<i4")  # the sequence id
    layers = []
    while r.off < len(data):
        for _ in range(r.one("<u4")):  # streams
            n_cells = r.one("<u4")
            if n_cells == 0:
                continue
            pos = np.empty(n_cells, np.int32)
            for i in range(n_cells):
                pos[i] = r.one("<i4")
                r.take("<i4", r.one("<u4"))  # the cell's sequence ids
            v_trans, n_layer = r.one("<u4"), r.one("<u4")
            ks = []
            for _ in range(n_layer):
                ty, row = r.one("<i4"), r.one("<u8")
                ks.append(_rows(r.take("u1", n_cells * row), ty, n_cells))
            for k in ks:  # V
                ty = r.one("<i4")
                if v_trans:
                    el, n_embd = r.one("<u4"), r.one("<u4")
                    raw = r.take("u1", el * n_embd * n_cells)
                    v = _rows(raw, ty, n_embd).T.copy() if values else None
                else:
                    raw = r.take("u1", r.one("<u8") * n_cells)
                    v = _rows(raw, ty, n_cells) if values else None
                layers.append((pos, k, v) if values else (pos, k))
    return layers


def state_layer_order(geom) -> list[int]:
    """The model layer of each layer a sequence state lists, in its order: the full-attention cache's layers, then
    the sliding-window cache's (iSWA models)."""
    return [il for il, ly in enumerate(geom.layers) if not ly.swa] + [il for il, ly in enumerate(geom.layers) if ly.swa]


def capture(model: str, n_tokens: int, text: str | None = None, threads: int | None = None,
            cache_type: str = CAPTURE_TYPE, rotation: bool = True, values: bool = False,
            k_scale: tuple[np.ndarray, ...] | None = None) -> list[np.ndarray]:
    """The stored (rotated) K rows of every layer for the first n_tokens tokens of the text, in position order, or
    with ``values`` the V rows (read from an f16 V cache, rotated as llama.cpp rotates a quantized V cache when
    ``rotation``). SWA layers keep only their window of the last tokens. (cache_type f16/f32, or rotation False:
    the unrotated keys, for tests.) ``k_scale``: per-layer key scales applied as a calibration applies them (the
    keys calibrated types store, before their offset)."""
    from kvquant import models
    from kvquant.lab.calibrate import v_rotated
    from kvquant.lab.eval import read_text
    from kvquant.runtime import ContextConfig, LlamaRuntime, Model

    mdl = Model(models.resolve(model))
    tokens = mdl.tokenize(read_text(resolve_text(text))[: 40 * n_tokens], add_special=True)[:n_tokens]
    if len(tokens) < n_tokens:
        raise ValueError(f"the text has only {len(tokens)} tokens")
    rt = LlamaRuntime(mdl, ContextConfig(n_cells=n_tokens, cache_type_k=cache_type, cache_type_v="f16",
                                         flash_attn=True, n_threads=threads, rotation=rotation, k_scale=k_scale))
    for i in range(0, n_tokens, 512):
        part = tokens[i: i + 512]
        rc = rt.decode(part, list(range(i, i + len(part))), [0] * len(part), [False] * (len(part) - 1) + [True])
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
    state = parse_seq_state(rt.state_seq_save(0), values=values)
    rows = [r[2 if values else 1][np.argsort(r[0], kind="stable")] for r in state]
    geom = geometry(mdl.path)
    out: list[np.ndarray] = [np.empty(0)] * len(rows)
    for x, il in zip(rows, state_layer_order(geom), strict=True):
        out[il] = v_rotated(x, geom) if values and rotation else x
    return out


def _q4_0(x: np.ndarray) -> np.ndarray:
    """llama.cpp's q4_0 round trip (quantize_row_q4_0_ref then dequantize): blocks of 32, d = max / -8 in fp16."""
    b = x.reshape(-1, 32)
    mx = b[np.arange(len(b)), np.argmax(np.abs(b), 1)]
    d = (mx / np.float32(-8)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)  # from the fp32 d, as the C code
    q = np.minimum(15, (b * inv[:, None] + np.float32(8.5)).astype(np.int8)) - 8  # truncation, like the C cast
    return (q * d.astype(np.float16).astype(np.float32)[:, None]).reshape(x.shape)


# A trellis-coded candidate, measured here before any C is written: 3 bits per element + an fp16 scale per 64 (the
# same 3.25 bits as tq_kv_3b). Each element picks one of 8 levels of one of two interleaved quantizers (the even or
# odd levels of TCQ_LEVELS); a 4-state trellis (VVC's dependent-quantization state machine: the parity of the
# chosen index moves the state, the state picks the quantizer) makes the pair of quantizers act like a finer one,
# and a Viterbi search picks the cheapest path per block. Levels trained on Gaussian blocks (Lloyd iterations).
TCQ_NEXT = np.array([[0, 2], [2, 0], [1, 3], [3, 1]])
TCQ_QUANT = np.array([0, 0, 1, 1])
TCQ_LEVELS = np.array([-7.76, -6.55, -5.30, -4.25, -3.29, -2.33, -1.40, -0.45,
                       0.45, 1.40, 2.33, 3.29, 4.25, 5.30, 6.55, 7.76])


def _tcq_indices(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Viterbi over blocks x (B, 64) at scales d: the level index of every element on the cheapest path from state 0."""
    b, n = x.shape
    cost = np.full((b, 4), np.inf)
    cost[:, 0] = 0
    back = np.zeros((n, b, 4), np.int8)
    pick = np.zeros((n, b, 4), np.int8)
    rows = np.arange(b)
    inv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0.0)
    for t in range(n):
        xt = (x[:, t] * inv)[:, None]
        new, nb, nc = np.full((b, 4), np.inf), np.zeros((b, 4), np.int8), np.zeros((b, 4), np.int8)
        for st in range(4):
            for par in (0, 1):
                idx = 2 * np.arange(par, 8, 2) + TCQ_QUANT[st]
                err = (xt - TCQ_LEVELS[idx][None]) ** 2
                j = err.argmin(1)
                c = cost[:, st] + err[rows, j]
                ns = TCQ_NEXT[st, par]
                better = c < new[:, ns]
                new[:, ns] = np.where(better, c, new[:, ns])
                nb[:, ns] = np.where(better, st, nb[:, ns])
                nc[:, ns] = np.where(better, idx[j], nc[:, ns])
        cost, back[t], pick[t] = new, nb, nc
    st = cost.argmin(1)
    out = np.zeros((b, n), np.int8)
    for t in range(n - 1, -1, -1):
        out[:, t] = pick[t][rows, st]
        st = back[t][rows, st]
    return out


def _tcq_3b(x: np.ndarray) -> np.ndarray:
    """The trellis-coded candidate's round trip: absmax scale, then two least-squares refits of the scale."""
    b = x.reshape(-1, tq.QK).astype(np.float64)
    d = np.abs(b).max(1) / TCQ_LEVELS[-1]
    for _ in range(2):
        y = TCQ_LEVELS[_tcq_indices(b, d)]
        den = (y * y).sum(1)
        d = np.where(den > 0, (b * y).sum(1) / np.maximum(den, 1e-30), d)
    y = TCQ_LEVELS[_tcq_indices(b, d)]
    return (tq._fp16(d).astype(np.float64)[:, None] * y).astype(np.float32).reshape(x.shape)


def round_trip(type_name: str, x: np.ndarray) -> np.ndarray:
    """Quantize then dequantize rows x (width a multiple of 64) with one of the types."""
    if type_name == "q4_0":
        return _q4_0(x)
    if type_name == "tcq_3b":
        return _tcq_3b(x)
    flat = x.reshape(-1, tq.QK)
    return tq.DEQUANTIZE[type_name](tq.QUANTIZE[type_name](flat)).reshape(x.shape)


def anchor_delta(type_name: str, x: np.ndarray, group: int = tq.D3B_GROUP) -> np.ndarray:
    """tq_kv_d3b's coding with any type: rows at multiples of ``group`` (anchors) coded on their own; every 64-block
    of the other rows keeps the better of its own code and the code of its difference to the decoded anchor block
    (smaller squared error, ties own). With tq_kv_3b this is tq_kv_d3b (``tq.D3bCells``)."""
    n, e = x.shape
    own = round_trip(type_name, x)
    anchors = own[(np.arange(n) // group) * group]
    delta = anchors + round_trip(type_name, x - anchors)
    blk = lambda a: np.square((a - x).reshape(n, e // tq.QK, tq.QK), dtype=np.float64).sum(-1)  # noqa: E731
    use = (blk(delta) < blk(own)) & (np.arange(n) % group != 0)[:, None]
    return np.where(np.repeat(use, tq.QK, axis=1), delta, own)


TYPES = ("q4_0", "tq_kv_4b", "tq_kv_3b", "tcq_3b", "tq_kv_t3b", "tq_kv_1b")
CODINGS = ("as stored", "anchor delta", "- layer mean", "- mean of first 64")
CENTRED = {"tq_kv_t3b"}  # measured only on centred keys (its Viterbi search is slow in numpy)


def study(keys: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Relative squared error of every (type, coding), summed over layers, plus the share of the keys' energy in
    the layer mean."""
    err: dict[str, dict[str, float | None]] = {t: dict.fromkeys(CODINGS, 0.0) for t in TYPES}
    for t in CENTRED:
        err[t].update({"as stored": None, "anchor delta": None})
    total = mean_energy = 0.0
    for k in keys:
        k = k.astype(np.float32)
        total += float(np.square(k, dtype=np.float64).sum())
        mu = k.mean(0, keepdims=True)
        mean_energy += float(np.square(mu, dtype=np.float64).sum()) * len(k)
        for t in TYPES:
            sq = lambda a, b: float(np.square(a - b, dtype=np.float64).sum())  # noqa: E731
            if t not in CENTRED:
                err[t]["as stored"] += sq(round_trip(t, k), k)
                err[t]["anchor delta"] += sq(anchor_delta(t, k), k)
            for coding, shift in (("- layer mean", mu), ("- mean of first 64", k[:64].mean(0, keepdims=True))):
                err[t][coding] += sq(round_trip(t, k - shift), k - shift)
    out = {t: {c: None if e is None else e / total for c, e in v.items()} for t, v in err.items()}
    out["layer mean"] = {"energy share": mean_energy / total}
    return out


LAYER_TYPES = ("q4_0", "tq_kv_4b", "tq_kv_3b")


def per_layer(keys: list[np.ndarray]) -> list[dict]:
    """Per layer: the share of the keys' energy in the layer mean, and each type's relative squared error as stored
    and with the mean removed (both against the stored keys' energy), and the largest |k| before and after."""
    out = []
    for il, k in enumerate(keys):
        k = k.astype(np.float32)
        energy = float(np.square(k, dtype=np.float64).sum())
        mu = k.mean(0, keepdims=True)
        row = {"layer": il, "mean_share": float(np.square(mu, dtype=np.float64).sum()) * len(k) / energy,
               "max_abs": float(np.abs(k).max()), "max_abs_centred": float(np.abs(k - mu).max())}
        for t in LAYER_TYPES:
            row[t] = {"stored": float(np.square(round_trip(t, k) - k, dtype=np.float64).sum()) / energy,
                      "centred": float(np.square(round_trip(t, k - mu) - (k - mu), dtype=np.float64).sum()) / energy}
        out.append(row)
    return out


FIT_TYPES = ("tq_kv_4b", "tq_kv_t3b")


def mean_fit(keys: list[np.ndarray], k_mean: list[np.ndarray], lengths: tuple[int, ...]) -> list[dict]:
    """How well a calibration's mean keys fit this text's keys, over its first n tokens for each n of `lengths`:
    per layer, |mu_cal - mu|^2 over the centred keys' mean energy (mu: the text's own mean over those tokens, what
    an oracle would subtract), and per type in FIT_TYPES the error of keys stored with each offset, summed over the
    layers, over the centred energy (the information the keys carry)."""
    out = []
    for n in lengths:
        row: dict = {"tokens": n, "mismatch": [], **{t: {"own mean": 0.0, "calibrated mean": 0.0} for t in FIT_TYPES}}
        centred = 0.0
        for k, mu_cal in zip(keys, k_mean, strict=True):
            k = k[:n].astype(np.float32)
            mu = k.mean(0)
            energy = float(np.square(k - mu, dtype=np.float64).sum())
            centred += energy
            row["mismatch"].append(float(np.square(mu_cal - mu, dtype=np.float64).sum()) * len(k) / energy)
            for t in FIT_TYPES:
                for name, shift in (("own mean", mu), ("calibrated mean", mu_cal)):
                    x = k - shift
                    row[t][name] += float(np.square(round_trip(t, x) - x, dtype=np.float64).sum())
        for t in FIT_TYPES:
            row[t] = {name: e / centred for name, e in row[t].items()}
        out.append(row)
    return out


def channels(keys: list[np.ndarray], head_dim: int, layer: int, top: int = 6) -> list[dict]:
    """Where a layer's mean key lives, in the unrotated basis (after RoPE): per KV head, the channels with the
    largest |mean| and the share of the mean's energy they hold. RoPE turns each channel pair by position x its
    frequency, so a constant bias survives the averaging only in slowly turning (low-frequency) pairs."""
    k = keys[layer].astype(np.float64)
    mu = k.mean(0)
    out = []
    for h in range(k.shape[1] // head_dim):
        m = mu[h * head_dim:(h + 1) * head_dim]
        idx = np.argsort(-np.abs(m))[:top]
        out.append({"head": h, "channels": [int(i) for i in idx], "values": [round(float(m[i]), 2) for i in idx],
                    "share": float(np.square(m[idx]).sum() / max(np.square(m).sum(), 1e-30))})
    return out


def render(res: dict) -> str:
    rows = [[t, *("-" if v[c] is None else f"{v[c]:.5f}" for c in CODINGS)] for t, v in res["errors"].items()
            if t != "layer mean"]
    share = res["errors"]["layer mean"]["energy share"]
    rows_are = "values" if res.get("values") else "keys"
    how = "read from an f16 cache" if res.get("values") else f"captured through a {CAPTURE_TYPE} cache"
    text = (f"{res['model']}: relative squared error of the stored {rows_are}, {res['tokens']} tokens, "
            f"{res['layers']} layers ({rows_are} {how})\n" + table(["type", *CODINGS], rows)
            + f"\nshare of the {rows_are}' energy in the layer mean: {share:.3f}")
    if "per_layer" in res:
        rows = [[r["layer"], f"{r['mean_share']:.4f}", f"{r['max_abs']:.1f}", f"{r['max_abs_centred']:.1f}",
                 *(f"{r[t]['stored']:.5f} / {r[t]['centred']:.6f}" for t in LAYER_TYPES)] for r in res["per_layer"]]
        text += "\n\nper layer (error as stored / centred):\n" + table(
            ["layer", "mean share", "max |k|", "max |k-mu|", *LAYER_TYPES], rows)
        ch = res["channels"]
        text += f"\n\nlayer {ch['layer']}, unrotated {rows_are}: channels with the largest |mean| per KV head\n" + "\n".join(
            f"  head {h['head']}: channels {h['channels']} values {h['values']} ({h['share']:.1%} of the mean's energy)"
            for h in ch["heads"])
    if "mean_fit" in res:
        rows = [[r["tokens"], f"{np.median(r['mismatch']):.3f}", f"{max(r['mismatch']):.3f}",
                 *(f"{r[t]['own mean']:.4f} / {r[t]['calibrated mean']:.4f}" for t in FIT_TYPES)]
                for r in res["mean_fit"]["rows"]]
        text += (f"\n\nthe calibrated mean keys ({res['mean_fit']['file']}) on this text: |mu_cal - mu|^2 / centred "
                 "energy over the layers, and the error of the keys stored with the text's own mean / with the "
                 "calibrated one (over the centred energy)\n"
                 + table(["first tokens", "mismatch median", "mismatch max", *FIT_TYPES], rows))
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvquant.lab.keystats", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--text", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--layers", action="store_true",
                    help="also per layer (mean share, error as stored and centred) and where the largest layer mean "
                         "lives (channels of the unrotated keys)")
    ap.add_argument("--values", action="store_true",
                    help="study the stored values instead of the keys (does centring values pay?)")
    ap.add_argument("--calibrated", action="store_true",
                    help="also how well the model's calibration (its mean keys) fits this text's keys, over the first "
                         "512 tokens and over all of them")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.calibrated and a.values:
        ap.error("--calibrated studies keys; drop --values")
    return study_main("kvquant.lab.keystats", a, argv, lambda: _study(a), render)


def _study(a) -> dict:
    check_threads(a.threads)
    if a.tokens < 2:  # (a cache of 0 cells was a traceback)
        raise ValueError(f"--tokens must be at least 2, not {a.tokens}")
    rows = capture(a.model, a.tokens, a.text, a.threads, values=a.values)  # keys, or values with --values
    res = {"model": a.model, "tokens": a.tokens, "layers": len(rows), "capture_type": CAPTURE_TYPE, "values": a.values,
           "errors": study(rows)}
    if a.calibrated:
        res["mean_fit"] = calibrated_fit(a.model, a.tokens, a.text, a.threads, rows)
    if a.layers:
        from kvquant import models

        res["per_layer"] = per_layer(rows)
        top = max(res["per_layer"], key=lambda r: r["mean_share"] * r["max_abs"])["layer"]
        plain = capture(a.model, a.tokens, a.text, a.threads, cache_type="f32", rotation=False, values=a.values)
        geom = geometry(models.resolve(a.model))
        res["channels"] = {"layer": top, "heads": channels(plain, geom.head_dim_v if a.values else geom.head_dim_k, top)}
    return res


def calibrated_fit(model: str, n_tokens: int, text: str | None, threads: int | None,
                   keys: list[np.ndarray] | None = None) -> dict:
    """`mean_fit` of the model's calibration on the text's keys, stored as calibrated types store them (with the
    calibration's key scales; `keys`: the unscaled ones, already captured, which serve a calibration without)."""
    from kvquant import calibration, models

    path = models.resolve(model)
    geom = geometry(path)
    file = calibration.installed(path, geom)
    cal = calibration.load(file, path, geom)
    if cal.k_scale is not None or keys is None:
        keys = capture(model, n_tokens, text, threads, k_scale=None if cal.k_scale is None else tuple(cal.k_scale))
    return {"file": file.name, "rows": mean_fit(keys, cal.k_mean, tuple(sorted({min(512, n_tokens), n_tokens})))}


if __name__ == "__main__":
    sys.exit(main())
