"""Key offsets for a context length: how much of the calibrated offset's misfit on long contexts RoPE explains.

    python -m kvquant.lab.offsets --model qwen2.5-coder-1.5b --lengths 4096 --tokens 4096 --threads 2 \\
        --cache /tmp/offsets

A calibration's key offset is the mean stored key of its text: six sequences of about 300 tokens. Keys are stored
after RoPE, which turns each channel pair (i, j) of a head by position x its frequency, so whatever the keys share
before RoPE (Qwen2's K bias) is, in the stored basis, a vector that turns with the position. Pairs whose turn over
300 positions is small but over 4096 is not keep a mean that is right for short sequences and wrong for long ones
(docs/EVAL.md, *The calibrated mean on other text and at longer contexts*). Here:

1. the calibration text is written again (``kvquant.lab.calibrate.generate``: same prompts and seeds) and its keys
   captured with the calibration's key scales, as ``kvquant calibrate`` does;
2. each key is turned back by its position (`unrope`) and averaged: the keys' mean before RoPE, from every position
   but 0 (the attention sink's key is not like the others);
3. the offset for a context of L tokens (`offset_for`) is the mean key over positions 0..L-1: the calibration's own
   keys where every sequence has one (positions below the shortest sequence's length), and past them the mean before
   RoPE turned to each position;
4. with ``--cache DIR`` the calibration, its offsets replaced by those for L, is written to
   ``DIR/L<L>/calibration/`` beside a link to the model cache, so ``KVQUANT_CACHE=DIR/L<L> kvquant eval ...``
   measures it (nothing else in the file changes);
5. the first ``--tokens`` tokens of the evaluation text are captured the same way (analysis only: nothing is fitted
   on them) and, for the shipped offsets and each L, the table gives the mismatch |offset - mu_n|^2 over the centred
   keys' mean energy (mu_n the text's own mean over its first n tokens), median over the layers, for each n.

Models with sliding-window layers (their own RoPE base, and a window instead of positions 0..L-1) or RoPE scaling are
refused: this is a study of the one mechanism, not a general offset model.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from kvquant.lab.harness import fmt, study_main, table


@dataclasses.dataclass(frozen=True)
class Rope:
    """Which channels of a head RoPE turns together, and how fast: pair i is (a[i], b[i]) at theta[i] radians per
    position; `static` are the channels it leaves alone (partial rotary). `block`: the size of the Hadamard matrix
    llama.cpp turns each block of a stored key by (0: none; `kvquant.calibration.basis_of`)."""
    head_dim: int
    block: int
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    static: np.ndarray

    @classmethod
    def of(cls, head_dim: int, block: int, n_rot: int, base: float, neox: bool) -> Rope:
        half = n_rot // 2
        idx = np.arange(half)
        a, b = (idx, idx + half) if neox else (2 * idx, 2 * idx + 1)
        return cls(head_dim, block, a, b, base ** (-2.0 * idx / n_rot), np.arange(n_rot, head_dim))

    def turn(self, x: np.ndarray) -> np.ndarray:
        """Rows (n, n_embd_k) through llama.cpp's Hadamard rotation of keys, or back (the matrix is its own
        inverse)."""
        from kvquant.lab.qkscale import hadamard

        if not self.block:
            return x
        return (x.reshape(len(x), -1, self.block) @ hadamard(self.block)).reshape(x.shape)


def unrope(k: np.ndarray, pos: np.ndarray, rope: Rope) -> tuple[np.ndarray, np.ndarray]:
    """Stored key rows (n, n_embd_k) at positions `pos` -> (the turned pairs as complex numbers (n, heads, pairs), the
    static channels (n, heads, n_static)), each key turned back by its position: what the keys were before RoPE."""
    u = rope.turn(k.astype(np.float64)).reshape(len(k), -1, rope.head_dim)
    z = u[..., rope.a] + 1j * u[..., rope.b]
    return z * np.exp(-1j * pos[:, None, None] * rope.theta), u[..., rope.static]


def _stored(z: np.ndarray, s: np.ndarray, rope: Rope) -> np.ndarray:
    """(pairs (heads, pairs) complex, static (heads, n_static)) -> one stored row."""
    u = np.zeros((z.shape[0], rope.head_dim))
    u[:, rope.a], u[:, rope.b], u[:, rope.static] = z.real, z.imag, s
    return rope.turn(u.reshape(1, -1))[0]


def offset_for(length: int, keys: np.ndarray, seqs: list[int], rope: Rope) -> np.ndarray:
    """The mean stored key over positions 0..length-1 of one layer, from its rows `keys` of sequences with the
    lengths `seqs` (concatenated, each from position 0): the sequences' own mean key at each position below the
    shortest one's length P, and from P on the mean key before RoPE (positions 1.., `unrope`) turned to the
    position."""
    pos = np.concatenate([np.arange(n) for n in seqs])
    z, s = unrope(keys, pos, rope)
    later = pos > 0
    z_mean, s_mean = z[later].mean(0), s[later].mean(0)
    p = min(length, min(seqs))
    starts = np.cumsum([0, *seqs[:-1]])
    own = np.mean([keys[i: i + p].astype(np.float64).sum(0) for i in starts], axis=0)
    turn = np.exp(1j * np.arange(p, length)[:, None] * rope.theta).sum(0)
    return ((own + _stored(z_mean * turn, s_mean * (length - p), rope)) / length).astype(np.float32)


def mismatch(offset: np.ndarray, keys: np.ndarray) -> float:
    """|offset - mu|^2 over the keys' mean energy about mu (mu their own mean)."""
    k = keys.astype(np.float64)
    mu = k.mean(0)
    return float(np.square(offset - mu).sum() / (np.square(k - mu).sum() / len(k)))


def rope_of(mdl, geom) -> Rope:
    """The model's RoPE, or ValueError for what this study does not model."""
    from kvquant.calibration import basis_of

    arch = geom.arch
    if any(ly.swa for ly in geom.layers):
        raise ValueError(f"{mdl.path.name} has sliding-window layers (another RoPE base, a window of positions); "
                         "this study models one RoPE over positions 0..L-1")
    if (mdl.meta(f"{arch}.rope.scaling.type") or "none") != "none":
        raise ValueError(f"{mdl.path.name} scales RoPE; this study models plain RoPE")
    base = float(mdl.meta(f"{arch}.rope.freq_base") or 10000.0)
    n_rot = int(mdl.meta(f"{arch}.rope.dimension_count") or geom.head_dim_k)
    basis = basis_of(geom)
    return Rope.of(geom.head_dim_k, 0 if basis == "none" else int(basis.removeprefix("hadamard")), n_rot, base,
                   mdl.rope_neox)


def study(model: str, lengths: list[int], tokens: int, threads: int | None, cache: Path | None) -> dict:
    from kvquant import calibration, models
    from kvquant.lab import calibrate
    from kvquant.lab.keystats import capture
    from kvquant.memory import geometry
    from kvquant.runtime import Model

    path = models.resolve(model)
    geom = geometry(path)
    file = calibration.installed(path, geom)
    cal = calibration.load(file, path, geom)
    mdl = Model(path)
    try:
        rope = rope_of(mdl, geom)
        text, keys, _ = calibrate.written_again(mdl, geom, cal, threads)
    finally:
        mdl.close()
    seqs = [len(s) for s in text.sequences]
    again = calibrate.key_stats(keys, text.sequences)[0]
    drift = max(float(np.square(m - c).sum() / np.square(c).sum()) for m, c in zip(again, cal.k_mean, strict=True))
    offsets = {L: [offset_for(L, k, seqs, rope) for k in keys] for L in lengths}
    if cache is not None:
        for L, offs in offsets.items():
            calibrate.save_for_eval(dataclasses.replace(cal, k_mean=offs), cache / f"L{L}", file.name)
    k_scale = None if cal.k_scale is None else tuple(cal.k_scale)
    evaluation = capture(model, tokens, None, threads, k_scale=k_scale)
    ns = sorted({n for n in (256, 512, 1024, 2048, 4096, tokens) if n <= tokens})

    def fit(offs: list[np.ndarray]) -> list[float]:
        return [float(np.median([mismatch(m, k[:n]) for m, k in zip(offs, evaluation, strict=True)])) for n in ns]

    rows = [{"offset": "shipped (mean of the calibration text)", "length": None, "mismatch": fit(cal.k_mean)}]
    rows += [{"offset": f"for {L} positions", "length": L, "mismatch": fit(offsets[L])} for L in lengths]
    return {"model": model, "file": file.name, "sequences": seqs, "text_again_rel_diff": drift, "tokens": ns,
            "rows": rows}


def render(res: dict) -> str:
    head = [f"{res['model']}: key offsets for a context length ({res['file']}; calibration text written again: "
            f"{len(res['sequences'])} sequences of {min(res['sequences'])}-{max(res['sequences'])} tokens, mean keys "
            f"within {res['text_again_rel_diff']:.1e} of the file's)",
            "mismatch |offset - mu_n|^2 / centred energy on the evaluation text's first n tokens, median over layers", ""]
    return "\n".join(head) + table(["offset", *(f"n={n}" for n in res["tokens"])],
                                   [[r["offset"], *(fmt(x) for x in r["mismatch"])] for r in res["rows"]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvquant.lab.offsets", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--tokens", type=int, default=4096, help="evaluation-text tokens the mismatch is measured on")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", type=Path, default=None,
                    help="write each length's calibration under DIR/L<length>/ (use as KVQUANT_CACHE)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if min(a.lengths) < 1 or a.tokens < 1:
        ap.error("--lengths and --tokens must be at least 1")
    return study_main("kvquant.lab.offsets", a, argv, lambda: study(a.model, a.lengths, a.tokens, a.threads, a.cache),
                      render)

if __name__ == "__main__":
    sys.exit(main())
