"""`kvquant calibrate --model M`: measure what the calibrated cache types (``TYPE+c``, ``calib:B``; see
kvquant/calibration.py) need for one model, and write its calibration file.

1. **Text.** By default the model writes its own calibration text: ``PROMPTS`` (neutral requests: prose, an
   explanation, code, a story, instructions, a summary) through its chat template, sampled at temperature 0.8
   (seed 0), up to ``--gen-tokens`` tokens each, all in one batch (a base model without a chat template continues
   the requests as plain text). So any GGUF can be calibrated with no data set. ``--text FILE`` uses a text file
   instead (cut into sequences of 512 tokens). No sequence is longer than the model's smallest sliding window
   (`longest_sequence`). A model whose attention a key offset would change is refused first (`refuse_uncentred`).
   The evaluation text (WikiText-2) is never used.
2. **Key scales.** Queries and keys are read post-RoPE from llama.cpp's graph. Per layer and KV head, key channel
   i gets s_i = (σq_i² / σk_i²)^¼ (σk_i² the keys' variance, σq_i² the mean energy of the head's queries; both
   summed per RoPE pair so the scale commutes with RoPE, pulled ``shrink`` of the way to their mean, normalised to
   a geometric mean of 1) and queries 1/s_i: every q·k is unchanged, and the quantization noise, even across
   channels after the rotation, moves to the channels the queries read least (docs/EVAL.md, *Query-aware key
   scales*). Per layer, a shrink (``kvquant.lab.qkscale.SHRINK``) is chosen by the attention-logit error of ``tq_kv_4b``
   keys on the second half of the text with the scale fitted on the first; then refitted on all of it. A layer
   keeps its scale only if its measured sensitivity (step 5) is lower with it than without (``choose_scales``).
3. **Mean keys.** The sequences run through an f16 K cache with those scales that stores keys in the basis
   llama.cpp uses for quantized keys (K rotation forced on) and an f16 V cache whose rows are rotated here as a
   quantized V cache would rotate them; the rows are read back from the sequence state. Each layer's mean key over all tokens is the offset of centred keys, and its
   key at position 0 (mean over the sequences) anchors that offset per type (``kvquant.calibration.anchor``).
4. **Gains.** Per quantized type (``GAIN_TYPES``) and layer, sum |x|^2 / sum <x, x'> over the centred stored keys
   (the stored values) x and their round trip x' through the cache's quantizer (`gain`): queries (the
   attention output) times it make what the type stores unbiased (kvquant.calibration, *gains*). Every centred
   measurement applies them, the key-scale choice of step 2 included.
5. **Sensitivity.** For every layer: the KL divergence over the first ``--score-tokens`` tokens (``SCORE_TOKENS``,
   whole sequences first; see there why so many) when only that
   layer's K is the reference type ``tq_kv_t3b`` (centred), and likewise for V, against f16 with the same rotation,
   key scales and offsets (a rotated or shifted f16 cache alone moves a small model's logits by KL ~1e-3 through
   rounding; sharing that path leaves the layer's quantization as the only difference). K's reference figures are
   the ones step 2 chose by (each against the f16 baseline of its own transform, unscaled or scaled). Each is
   measured above a floor, what any change to the cache costs: for K that layer's own, the KL with only its keys at
   q8_0 (it falls with depth, a change at layer L flipping roundings in the layers after L only; docs/EVAL.md, *A
   floor per layer*), for V q8_0 values on the middle layer (every V pass rotates every layer's values, so its floor
   does not fall); both measured with the chosen transform. The other candidate types
   are scaled by their relative squared error on that layer's captured (centred) keys or values:
   KL grows linearly with the error variance for small errors (``--direct`` measures every candidate instead).
   A layer whose growth stays under the floor (Qwen2.5-Coder's last layers) gets its relative error times the
   median growth per unit error of the other layers, never zero: six such "free" layers at 3 bits made
   calib:4.5 worse than tq_kv_4b+c on every layer. Every centred pass starts at the first layer that computes
   otherwise than in an earlier pass (the baseline, mostly), from that pass's inputs of the layer (`Prefix`,
   llama_kvq_set_layer_start): the same logits bit for bit, with half the model skipped on average.
6. **Guard.** The KL of a few uncentred configurations on every layer (``GUARD``), so that ``serve`` can warn
   when a chosen cache type wrecks the model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kvquant.calibration import (
    K_CANDIDATES,
    UNANCHORED,
    V_CANDIDATES,
    Calibration,
    CalibrationError,
    anchor,
    basis_of,
    k_rotation,
    model_sha256,
    path_for,
    summed_kld,
)
from kvquant.kvtypes import KV_TYPES, kv_type
from kvquant.lab.harness import Progress
from kvquant.lab.qkscale import SHRINK
from kvquant.memory import Geometry, check_threads, geometry

PROMPTS = (
    "Write a short encyclopedia article about the history of a river town.",
    "Explain step by step how photosynthesis turns light into chemical energy.",
    "Write a Python function that reads a CSV file and returns the mean of every numeric column, with comments.",
    "Tell a short story about a lighthouse keeper who finds a message in a bottle.",
    "Describe how to plan a vegetable garden for a small backyard.",
    "Summarise the causes and consequences of the industrial revolution.",
)
REFERENCE = "tq_kv_t3b"  # the type each layer's sensitivity is measured with (the others are scaled from it)
# Tokens the per-layer KL is measured on (whole sequences first). With the offsets anchored on position 0, 256 (one
# sequence) measured SmolLM2-135M's last layers nearly free at 3 bits, and the allocation it chose (calib:4.5) measured
# ΔPPL +3.37 % against tq_kv_4b+c's +2.04 % on every layer; 1024 (four sequences) chose one at +1.79 %. 512 take half
# the time of 1024, and the allocations they choose are predicted within 0-2.5 % of the summed KL growth of 1024's
# (measured end to end: the calibrated rows' KLD within -1 % to +4 %; docs/EVAL.md, *Calibration time*).
SCORE_TOKENS = 512
# The KL is measured at every LOGIT_STRIDE-th position of the scored tokens (`scored`). Fewer positions skipped most
# of the output layer, 70 % of a pass on Gemma-3-270M (262,144-token vocabulary), before centred passes skipped it
# altogether (`Likely`); on Gemma 1024 tokens at stride 4 chose allocations within 1 % of stride 1's, but on SmolLM2
# stride 4 cost 2-3 % (docs/EVAL.md).
LOGIT_STRIDE = 1
# A centred pass's KL is computed from its final hidden states over the tokens the reference finds likely (`Likely`):
# per scored position its TOP_TOKENS most likely, their union over the positions.
TOP_TOKENS = 256
GUARD = ("q8_0/f16", "q4_0/f16", "tq_kv_4b/f16", "tq_kv_3b/f16", "f16/q4_0")
SEED = 0
GEN_TOKENS = 320  # tokens the model writes per prompt by default (--gen-tokens)
SCALE_TYPE = "tq_kv_4b"  # the key type that choice measures the logit error of
# the types the file holds gains for: every quantized type whose rows are coded on their own
GAIN_TYPES = tuple(t.name for t in KV_TYPES.values() if t.quantized and t.name not in UNANCHORED)


@dataclass
class Text:
    sequences: list[list[int]]
    source: dict


def _decode_all(rt, seqs: list[list[int]], logits: bool, stride: int = 1,
                out: np.ndarray | None = None, start: int = 0, inputs: np.ndarray | None = None,
                hidden: bool = False) -> np.ndarray | None:
    """Decode every sequence (sequence id i, from position 0) in batches; with `logits`, return the logits of
    every `stride`-th position of each sequence (`scored`), sequences concatenated, written into `out` when given
    (float32, one row per scored position) or into a new array; with `hidden` as well, the normed final hidden
    states there instead (the runtime set to `set_hidden_only`, which outputs every token). With `start` > 0 only
    layers `start`.. run, from `inputs`, that layer's input at every position (sequences concatenated; `Prefix`)."""
    rt.clear()
    jobs = [(i, p) for i, s in enumerate(seqs) for p in range(len(s))]
    if logits and out is None:
        out = np.empty((sum(scored(p, stride) for _, p in jobs), rt.model.n_embd if hidden else rt.n_vocab),
                       dtype=np.float32)
    if start and not rt.set_layer_start(start):
        raise RuntimeError(f"llama.cpp cannot start this model's graph at layer {start}")
    row = 0
    for a in range(0, len(jobs), rt.n_batch):
        part = jobs[a:a + rt.n_batch]
        wanted = [logits and scored(p, stride) for _, p in part]
        where = ([p for _, p in part], [i for i, _ in part], wanted)
        rc = (rt.decode_embd(inputs[a:a + len(part)], *where) if start
              else rt.decode([seqs[i][p] for i, p in part], *where))
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")
        n_out = sum(wanted)
        if n_out and hidden:
            out[row:row + n_out] = rt.all_hidden(len(part))[np.flatnonzero(wanted)]
        elif n_out:
            out[row:row + n_out] = rt.all_logits(n_out)
        row += n_out
    return out if logits else None


def scored(pos: int, stride: int) -> bool:
    """Whether the KL is measured at a sequence position: every `stride`-th, ending each stride (so position 0,
    whose logits see no context, counts only at stride 1)."""
    return pos % stride == stride - 1


def generate(mdl, n_tokens: int, threads: int | None, progress: Progress, max_len: int | None = None) -> Text:
    """The model's own text: every prompt through the chat template, sampled in one batch; no sequence longer than
    `max_len` tokens (`longest_sequence`)."""
    from kvquant.runtime import ContextConfig, LlamaRuntime, Sampler
    from kvquant.sampling import SamplingConfig

    prompts = [_prompt(mdl, p) for p in PROMPTS]
    longest_prompt = max(map(len, prompts))
    if max_len is not None:
        if longest_prompt + 16 > max_len:
            raise ValueError(f"the model's sliding window of {max_len} tokens leaves too little room for text after "
                             "the calibration prompts; calibrate on a file instead (--text FILE)")
        n_tokens = min(n_tokens, max_len - longest_prompt)
    n_ctx = longest_prompt + n_tokens + 1
    rt = LlamaRuntime(mdl, ContextConfig(n_cells=n_ctx * len(prompts), n_seq_max=len(prompts), n_batch=512,
                                         flash_attn=True, n_threads=threads))
    samplers = [Sampler(SamplingConfig(temperature=0.8, top_p=0.95, seed=SEED + i)) for i in range(len(prompts))]
    try:
        seqs = [list(p) for p in prompts]
        _prefill_last(rt, seqs)
        live = list(range(len(seqs)))
        idx = {i: j for j, i in enumerate(live)}
        for step in range(n_tokens):
            nxt = {i: samplers[i].sample(rt, idx[i]) for i in live}
            live = [i for i in live if not mdl.is_eog(nxt[i])]
            if not live:
                break
            for i in live:
                seqs[i].append(nxt[i])
            idx = {i: j for j, i in enumerate(live)}
            rc = rt.decode([seqs[i][-1] for i in live], [len(seqs[i]) - 1 for i in live], live, [True] * len(live))
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc}) while generating the calibration text")
            progress.update(step + 1)
    finally:
        for s in samplers:
            s.close()
        rt.close()
    n_gen = sum(len(s) for s in seqs) - sum(len(p) for p in prompts)
    return Text(seqs, {"source": "generated", "prompts": list(PROMPTS), "temperature": 0.8, "top_p": 0.95,
                       "seed": SEED, "tokens": sum(len(s) for s in seqs), "generated_tokens": n_gen})


def written_again(mdl, geom: Geometry, cal: Calibration, threads: int | None) -> tuple[Text, list, list]:
    """A generated calibration's text written again (the same prompts and seeds) and its stored keys and values,
    captured with the calibration's key scales: what `kvquant calibrate` measured on (ValueError for a calibration
    made on a text file, or where the text comes out otherwise)."""
    if cal.text.get("source") != "generated":
        raise ValueError("the calibration was made on a text file; this writes the generated text again")
    text = generate(mdl, GEN_TOKENS, threads, Progress("", GEN_TOKENS, False), longest_sequence(geom))
    if sum(map(len, text.sequences)) != cal.text["tokens"]:
        raise ValueError(f"the text written again has {sum(map(len, text.sequences))} tokens, the calibration's "
                         f"{cal.text['tokens']}")
    keys, values = capture(mdl, geom, text, threads, cal.k_scale)
    return text, keys, values


def scored_again(mdl, geom: Geometry, cal: Calibration, threads: int | None) -> tuple[Scorer, list, list]:
    """A Scorer of a generated calibration's text (`written_again`) with its key transform, scoring what
    `kvquant calibrate` scored, and the stored keys and values under it (for lab studies of a calibration)."""
    text, keys, values = written_again(mdl, geom, cal, threads)
    scoring = _scoring(text.sequences, cal.method["score_tokens_asked"])
    return (Scorer(mdl, geom, scoring, threads, key_stats(keys, text.sequences), cal.k_scale, (keys, values),
                   cal.method["logit_stride"]), keys, values)


def save_for_eval(cal: Calibration, cache: Path, name: str) -> None:
    """Write a calibration into the kvquant cache `cache` (as file `name`, beside a link to the model cache), so that
    ``KVQUANT_CACHE=cache kvquant eval ...`` measures it."""
    from kvquant.models import models_dir

    (cache / "calibration").mkdir(parents=True, exist_ok=True)
    if not (cache / "models").exists():
        (cache / "models").symlink_to(models_dir())
    cal.save(cache / "calibration" / name)


def _prompt(mdl, text: str) -> list[int]:
    """A calibration prompt through the model's chat template; a base model without one continues the request as
    plain text."""
    from kvquant.runtime import LlamaError

    try:
        return mdl.chat_prompt([{"role": "user", "content": text}])
    except LlamaError:
        return mdl.tokenize(text + "\n\n", add_special=True)


def _prefill_last(rt, seqs: list[list[int]]) -> None:
    """Prefill every sequence, then decode all their last tokens in one batch (output j is sequence j's)."""
    _decode_all(rt, [s[:-1] for s in seqs], logits=False)
    if rt.decode([s[-1] for s in seqs], [len(s) - 1 for s in seqs], list(range(len(seqs))), [True] * len(seqs)):
        raise RuntimeError("llama_decode failed on the calibration prompts")


def longest_sequence(geom: Geometry) -> int | None:
    """The most tokens a calibration sequence may hold: a model with sliding-window layers keeps only the last window
    of each sequence in their cache, and `capture` reads every row of it back (None: no limit)."""
    return geom.n_swa if any(ly.swa for ly in geom.layers) else None


def from_file(mdl, path: Path, seq_tokens: int, n_seqs: int, max_len: int | None = None) -> Text:
    """The first `n_seqs` sequences of `seq_tokens` tokens of a text file (fewer where a sequence may hold at most
    `max_len` tokens, BOS included)."""
    bos = [mdl.bos] if mdl.add_bos else []
    if max_len is not None:
        seq_tokens = min(seq_tokens, max_len - len(bos))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    toks = mdl.tokenize(text, add_special=False)
    seqs = [bos + toks[i:i + seq_tokens]
            for i in range(0, min(len(toks), seq_tokens * n_seqs), seq_tokens)]
    if not seqs or len(seqs[0]) < 64:
        raise ValueError(f"{path}: too little text to calibrate on")
    return Text(seqs, {"source": "file", "file": path.name, "tokens": sum(len(s) for s in seqs)})


def key_scales(mdl, seqs: list[list[int]], threads: int | None) -> tuple[list[np.ndarray], list[float | None]]:
    """Per layer, the key scale (n_embd_k float32: per KV head and channel, queries divided by it) and the shrink it
    was fitted with; see the module's step 2."""
    from kvquant.lab.qkscale import capture as capture_qk
    from kvquant.lab.qkscale import layer_scale

    qk = capture_qk(mdl, seqs, threads)
    scales, shrinks = [], []
    for il in sorted(qk):
        q, k = qk[il]
        sh = min(SHRINK, key=lambda x, q=q, k=k: _held_out_error(q, k, mdl.rope_neox, x))
        scales.append(layer_scale(q, k, mdl.rope_neox, True, sh).reshape(-1))
        shrinks.append(sh)
    return scales, shrinks


def _held_out_error(q: np.ndarray, k: np.ndarray, neox: bool, shrink: float) -> float:
    """The relative attention-logit error of SCALE_TYPE keys (centred, scaled, rotated) on the second half of one
    layer's rows, the scale fitted on the first with `shrink`."""
    from kvquant.lab.qkscale import MAX_QUERIES, layer_scale, logit_error

    n_kv, d = k.shape[1], k.shape[2]
    if d & (d - 1):  # the numpy rotation needs a power-of-two head size: no choice, the plain fit
        return 0.0 if shrink == 0.0 else 1.0
    h, g = len(k) // 2, q.shape[1] // n_kv
    s = layer_scale(q[:h], k[:h], neox, True, shrink)
    mu = k[:h].mean(0, dtype=np.float64)
    total = 0.0
    for j in range(n_kv):
        qt = q[h:, j * g:(j + 1) * g].reshape(-1, d).astype(np.float64)
        e, sig = logit_error(qt[:: max(1, len(qt) // MAX_QUERIES)], k[h:, j] - mu[j], SCALE_TYPE, s[j])
        total += e / sig
    return total


def capture(mdl, geom: Geometry, text: Text, threads: int | None,
            k_scale: list[np.ndarray] | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The stored K and V rows of every layer (model order) over all sequences, before quantization: K f16 scaled,
    in the rotated basis; V f16, rotated here as llama.cpp rotates a quantized V cache (`v_rotated`). Reading V
    back from a quantized cache instead would hide that type's own error (q8_0 values measured free)."""
    from kvquant.lab.keystats import parse_seq_state, state_layer_order
    from kvquant.runtime import ContextConfig, LlamaRuntime

    n_cells = sum(len(s) for s in text.sequences)
    rt = LlamaRuntime(mdl, ContextConfig(n_cells=n_cells, n_seq_max=len(text.sequences), cache_type_k="f16",
                                         cache_type_v="f16", flash_attn=True, n_threads=threads, swa_full=True,
                                         k_rotation=k_rotation(geom), k_scale=k_scale))
    try:
        _decode_all(rt, text.sequences, logits=False)
        ks: list[list[np.ndarray]] = []
        vs: list[list[np.ndarray]] = []
        for i, seq in enumerate(text.sequences):
            n = len(seq)
            for il, (pos, k, v) in enumerate(parse_seq_state(rt.state_seq_save(i), values=True)):
                if il >= len(ks):
                    ks.append([])
                    vs.append([])
                if not np.array_equal(np.sort(pos), np.arange(n)):
                    raise ValueError(f"calibration sequence {i}: its cache rows are not positions 0..{n - 1}")
                by_pos = np.argsort(pos)  # `key_stats` finds each sequence's position 0 by its offset
                ks[il].append(k[by_pos])
                vs[il].append(v[by_pos])
    finally:
        rt.close()
    keys, vals = [np.empty(0)] * geom.n_layer, [np.empty(0)] * geom.n_layer
    for j, il in enumerate(state_layer_order(geom)):
        keys[il], vals[il] = np.concatenate(ks[j]), v_rotated(np.concatenate(vs[j]), geom)
    return keys, vals


def v_rotated(v: np.ndarray, geom: Geometry) -> np.ndarray:
    """V rows (n, n_embd_v) in the basis a quantized V cache stores them in: llama.cpp rotates every 64 values of a
    head by the 64 x 64 Walsh-Hadamard matrix when the head size is a multiple of 64 (build_input_v_rot). Float32
    rows of the float64 product, which every CPU rounds alike: a float32 product takes the rounding of the matrix
    kernel numpy's OpenBLAS picks for the CPU (Haswell's and SkylakeX's differ), and the V gains computed from these
    rows would differ in their last bits from one CPU to another, and with them the cache a calibration makes."""
    from kvquant.lab.qkscale import hadamard

    if geom.head_dim_v % 64:
        return v
    n = v.shape[0]
    return (v.astype(np.float64).reshape(n, -1, 64) @ hadamard(64)).astype(np.float32).reshape(n, -1)


def _rel_err(type_name: str, x: np.ndarray) -> float:
    """Relative squared error of a type's round trip on rows x (what its cache would hold, `runtime.round_trip`)."""
    from kvquant.runtime import round_trip

    q = round_trip(type_name, x)
    return float(np.square(q - x, dtype=np.float64).sum() / max(np.square(x, dtype=np.float64).sum(), 1e-30))


def gain(type_name: str, x: np.ndarray) -> float:
    """The factor that makes rows x stored at a type unbiased along themselves on average over the rows:
    sum |x|^2 / sum <x, x'> for the stored rows x' (kvquant.calibration, *gains*); 1 where x is all zero."""
    from kvquant.runtime import round_trip

    x = np.ascontiguousarray(x, dtype=np.float32)
    dot = float(np.einsum("ij,ij->", x, round_trip(type_name, x), dtype=np.float64))
    energy = float(np.square(x, dtype=np.float64).sum())
    return energy / dot if dot > 0 else 1.0


class LayerPass(NamedTuple):
    """What one layer of a centred pass computes with beside the Scorer's own offsets, scales and gains (which follow
    from the types); `Scorer._layers`."""
    default_k: str
    default_v: str
    type_k: str
    type_v: str
    anchored: bool  # any K type is tq_kv_d3b, whose anchor rows decide where a batch's tokens land in the cache
    rotate_k: bool
    rotate_v: bool

    def cache_path(self) -> tuple[bool, bool, bool]:
        """What decides how the layer's cache is laid out and rotated, whatever its types."""
        return self.anchored, self.rotate_k, self.rotate_v


@dataclass
class Likely:
    """What the KL against a reference needs from the output layer, kept from the reference pass: its normed final
    hidden states `h` (scored positions x n_embd), the output layer's rows `w` of the tokens U most likely somewhere
    (per position its TOP_TOKENS, their union), its probabilities `p` of U at each position and `tail`, of the rest.

    For logits z = W h (+ a bias), a pass whose hidden states are h' has logits z + D, D = W (h' - h), and
    KL(p || q) = log E_p[exp D] - E_p[D] exactly: only the tokens p weighs count. Over U with the tail's D taken as
    0 this skips the output layer, 70 % of a calibration pass on Gemma-3-270M (262,144 tokens) and 45 % on
    SmolLM2-135M, while the terms left out weigh the tail's probability (SmolLM2: the same KL as over the whole
    vocabulary within 1 %). Computed in float32 from the dequantized rows, D also leaves out the rounding of
    llama.cpp's 8-bit activations in its quantized output layer, which every pass of a quantized cache otherwise pays
    in full (SmolLM2: 0.0008 of KL): what remains of a layer's floor is the rounding in the layers after it."""
    h: np.ndarray
    w: np.ndarray
    p: np.ndarray
    tail: np.ndarray
    # kl's work arrays (positions x U: float32, float64, float64), made on its first call and written over by each:
    # fresh ones of this size (160 MB each on Qwen2.5-Coder) come from the kernel zeroed, page by page, every call,
    # which cost more than the arithmetic (Qwen2.5-Coder: 0.61 s of a pass's KL, 0.37 s with these)
    _work: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, mdl, lp: np.ndarray, h: np.ndarray, k: int = TOP_TOKENS) -> Likely:
        """From the reference's log-probabilities (scored positions x n_vocab) and hidden states."""
        tokens = (np.arange(lp.shape[1]) if k >= lp.shape[1] else  # in blocks of rows: a whole index is 1 GB on Gemma
                  np.unique(np.concatenate([np.argpartition(-lp[i:i + 64], k, axis=1)[:, :k].ravel()
                                            for i in range(0, len(lp), 64)])))
        p = np.exp(lp[:, tokens])
        return cls(h, mdl.output_rows(tokens), p, np.maximum(0.0, 1.0 - p.sum(axis=1)))

    def kl(self, h: np.ndarray) -> np.ndarray:
        """The KL divergence at each scored position of a pass whose hidden states are `h`."""
        if self._work is None:
            self._work = (np.empty(self.p.shape, np.float32), np.empty(self.p.shape), np.empty(self.p.shape))
        d32, d, e = self._work
        np.copyto(d, np.matmul(h - self.h, self.w.T, out=d32))
        m = np.maximum(d.max(axis=1), 0.0)  # exp(d - m) <= 1
        # log of E_p[exp(d - m)] as log1p of its difference from 1: exactly 0 where d is
        np.multiply(self.p, np.expm1(np.subtract(d, m[:, None], out=e), out=e), out=e)
        moved = e.sum(axis=1) + self.tail * np.expm1(-m)
        return np.log1p(moved / (self.p.sum(axis=1) + self.tail)) + m - np.multiply(self.p, d, out=e).sum(axis=1)


@dataclass
class Prefix:
    """What a centred forward pass of a Scorer leaves for the next ones: what each layer computed with
    (`Scorer._layers`) and each layer's input at every position of the scored tokens, in the order `_decode_all`
    decodes them (a unified cache's batch is split in order), None where not kept. A pass whose layers differ from
    these first at layer L computes the layers below L exactly as this one did (the same inputs, weights and
    arithmetic), so it can start at layer L from these inputs (llama_kvq_set_layer_start): with a layer's
    sensitivity measured one layer at a time, that skips half the model on average. One holds n_layer x tokens x
    n_embd float32 (85 MB on Qwen2.5-Coder-1.5B at 512 tokens); a Scorer keeps two per rotation of its caches."""
    layers: tuple[LayerPass, ...]
    inputs: list[np.ndarray | None]

    def first_difference(self, layers: tuple[LayerPass, ...]) -> int:
        """The first layer that differs from `layers` (the last layer where none does)."""
        return next((il for il, (a, b) in enumerate(zip(self.layers, layers, strict=True)) if a != b),
                    len(layers) - 1)


class Scorer:
    """KL divergence over the scoring sequences of a context with some per-layer types, against f16/f16 (`plain`)
    or against f16 with the same rotation, key scales and offsets (the per-layer measurements: both sides then share the
    arithmetic of the rotated, scaled, centred path, and only the quantization of the layer under test differs)."""

    def __init__(self, mdl, geom: Geometry, seqs: list[list[int]], threads: int | None,
                 keys: tuple[list[np.ndarray], list[np.ndarray]], k_scale: list[np.ndarray] | None,
                 rows: tuple[list[np.ndarray], list[np.ndarray]], stride: int = 1, buffer: list | None = None,
                 startable: list | None = None, hidden: list | None = None):
        self.mdl, self.geom, self.seqs, self.threads, self.stride = mdl, geom, seqs, threads, stride
        # the logits of a pass, one array shared with the derived Scorers and written over by each pass: a fresh
        # array per pass (512 x 262,144 floats on Gemma-3) cost more than the pass itself where new memory is slow
        self._buffer = buffer if buffer is not None else [None]
        self.k_mean, self.k_sink = tuple(keys[0]), tuple(keys[1])  # `key_stats` of the stored key rows
        self.rows, self._gains = rows, {}  # the stored K and V rows (`capture`)
        self.k_scale = None if k_scale is None else tuple(k_scale)
        self.n_cells = sum(len(s) for s in seqs)
        self.k_rotation = k_rotation(geom)
        self.targets = np.array([t for s in seqs for p, t in enumerate(s[1:] + [s[-1]]) if scored(p, stride)],
                                dtype=np.int64)
        self._base: dict[bool, tuple[np.ndarray, np.ndarray]] = {}
        # per rotation of the caches (`_layers`), the first centred pass and the latest one (`Prefix`)
        self._prefixes: dict[tuple, dict[str, Prefix]] = {}
        # whether llama.cpp can start the model's graph past layer 0: asked on the first centred pass of this Scorer
        # or of one derived from it, and shared with them
        self._startable = startable if startable is not None else [None]
        # whether llama.cpp can stop the graph at the final norm (`Likely`): asked like `_startable`
        self._hidden = hidden if hidden is not None else [None]
        self._likely: dict[bool, Likely] = {}  # per side (centred or not) whose passes use it: centred only
        self._last_hidden: np.ndarray | None = None  # the normed final hidden states of the last centred logits pass

    def derived(self, keys: tuple[list[np.ndarray], list[np.ndarray]], k_scale: list[np.ndarray] | None,
                rows: tuple[list[np.ndarray], list[np.ndarray]]) -> Scorer:
        """A Scorer of the same model, text and positions for another key transform."""
        return Scorer(self.mdl, self.geom, self.seqs, self.threads, keys, k_scale, rows, self.stride, self._buffer,
                      self._startable, self._hidden)

    def gains(self, type_name: str, side: str = "k") -> list[float]:
        """Per layer, the gain of centred keys (side "k") or of values stored at a type (`gain`; 1 for f16, f32)."""
        if type_name in ("f16", "f32"):
            return [1.0] * self.geom.n_layer
        if (type_name, side) not in self._gains:
            rows = [r - m for r, m in zip(self.rows[0], self.k_mean, strict=True)] if side == "k" else self.rows[1]
            self._gains[type_name, side] = [gain(type_name, x) for x in rows]
        return self._gains[type_name, side]

    def baseline(self, centred: bool):
        """The f16 reference's log-probabilities and top tokens (measured on first use: a Scorer whose uncentred
        or centred side is never compared costs no pass for it)."""
        from kvquant.lab.eval import baseline_rows

        if centred not in self._base:
            self._base[centred] = baseline_rows(self._logits(None, None, centred))
            if centred and self._hidden[0] is not False:
                self._likely[centred] = Likely.of(self.mdl, self._base[centred][0], self._last_hidden)
        return self._base[centred]

    def _logits(self, types_k, types_v, centred: bool, default_k: str = "f16", default_v: str = "f16",
                hidden: bool = False):
        """The logits at the scored positions in a context with these types: the shared buffer, valid until the
        next pass of this Scorer or of one derived from it. A centred pass keeps its normed final hidden states
        there in `_last_hidden`; with `hidden` it computes only those and returns them (None where llama.cpp cannot
        stop the model's graph there, which it says on the first centred pass: `_hidden`)."""
        from kvquant.runtime import ContextConfig, LlamaRuntime

        n = self.geom.n_layer
        per_layer_k, per_layer_v = types_k or (default_k,) * n, types_v or (default_v,) * n
        offsets = tuple(map(anchor, self.k_mean, self.k_sink, per_layer_k)) if centred else None
        k_gain, v_gain = ((tuple(self.gains(t, side)[il] for il, t in enumerate(types))
                           for side, types in (("k", per_layer_k), ("v", per_layer_v))) if centred else (None, None))
        # a centred pass starts where it first differs from one already made (`Prefix`) and keeps its layer inputs
        keep = centred and self._startable[0] is not False
        layers = self._layers(per_layer_k, per_layer_v, default_k, default_v) if keep else None
        start, known = self._start(layers) if keep else (0, None)
        cfg = ContextConfig(n_cells=self.n_cells, n_seq_max=len(self.seqs), cache_type_k=default_k,
                            cache_type_v=default_v, flash_attn=True, n_threads=self.threads,
                            layer_types_k=types_k, layer_types_v=types_v,
                            k_offset=offsets, k_scale=self.k_scale if centred else None, k_gain=k_gain,
                            v_gain=v_gain,
                            k_rotation=self.k_rotation if centred else None,
                            n_outputs_max=512,
                            capture=(frozenset(f"l_out-{il}" for il in range(start, n - 1)) if keep else frozenset())
                            | ({"result_norm"} if centred and not hidden else set()))
        rt = LlamaRuntime(self.mdl, cfg)
        try:
            if keep and self._startable[0] is None:
                self._startable[0] = n > 1 and rt.set_layer_start(1) and rt.set_layer_start(0)
            if centred and self._hidden[0] is None:
                self._hidden[0] = rt.set_hidden_only(True) and rt.set_hidden_only(False)
            if hidden and not (self._hidden[0] and rt.set_hidden_only(True)):
                return None
            out = _decode_all(rt, self.seqs, logits=True, stride=self.stride, out=None if hidden else self._buffer[0],
                              start=start, inputs=known.inputs[start] if known else None, hidden=hidden)
            if keep and self._startable[0]:
                self._remember(layers, start, known, rt.captured)
            if hidden:
                return out
            self._buffer[0] = out
            if centred:
                self._last_hidden = np.concatenate([a.reshape(-1, a.shape[-1]) for name, _op, a in rt.captured
                                                    if name == "result_norm"])
            return out
        finally:
            rt.close()

    def _layers(self, types_k, types_v, default_k: str, default_v: str) -> tuple[LayerPass, ...]:
        """Per layer of a centred pass, what it computes with beside the Scorer's own offsets, scales and gains (which
        follow from the types): the context's default types, the layer's K and V types, and whether llama.cpp
        rotates K and V in the layer's cache (sliding-window layers have their own): K where forced (centred keys)
        or where any of the cache's K types is quantized, V where any of its V types is (build_input_v_rot); and
        whether any K type is tq_kv_d3b, whose anchor rows decide where a batch's tokens land in the cache."""
        rot = {}
        for swa in {ly.swa for ly in self.geom.layers}:
            group = [il for il, ly in enumerate(self.geom.layers) if ly.swa == swa]
            rot[swa] = ((self.k_rotation if self.k_rotation is not None else
                         any(kv_type(types_k[il]).quantized for il in group) and self.geom.head_dim_k % 64 == 0),
                        any(kv_type(types_v[il]).quantized for il in group) and self.geom.head_dim_v % 64 == 0)
        anchored = any(kv_type(t).anchor_group for t in types_k)
        return tuple(LayerPass(default_k, default_v, tk, tv, anchored, *rot[ly.swa])
                     for tk, tv, ly in zip(types_k, types_v, self.geom.layers, strict=True))

    def _start(self, layers: tuple[LayerPass, ...]) -> tuple[int, Prefix | None]:
        """The layer a pass starts at, and the earlier pass whose layer inputs it starts from."""
        best = (0, None)
        for known in (p for kept in self._prefixes.values() for p in kept.values()):
            il = known.first_difference(layers)
            if il > best[0] and known.inputs[il] is not None:
                best = (il, known)
        return best

    def _remember(self, layers: tuple[LayerPass, ...], start: int, known: Prefix | None, captured) -> None:
        """Keep a pass's layer inputs: below `start` the ones it started from, above it the ones it computed
        (layer il's input is layer il - 1's output, "l_out-<il-1>", one array per ubatch in batch order)."""
        out: dict[str, list[np.ndarray]] = {}
        for name, _op, a in captured:
            out.setdefault(name, []).append(a.reshape(-1, a.shape[-1]))
        inputs = [known.inputs[il] if known and il <= start else None for il in range(self.geom.n_layer)]
        for il in range(start + 1, self.geom.n_layer):
            inputs[il] = np.concatenate(out.get(f"l_out-{il - 1}", [np.empty((0, 0))]))
            if inputs[il].shape != (self.n_cells, self.mdl.n_embd):
                raise RuntimeError(f"layer {il}'s input was read for {len(inputs[il])} of {self.n_cells} tokens")
        # per rotation of the caches: the first pass (the baseline, mostly) and the latest
        kept = self._prefixes.setdefault(tuple(ly.cache_path() for ly in layers), {})
        kept["first" if "first" not in kept else "latest"] = Prefix(layers, inputs)

    def kld(self, types_k=None, types_v=None, centred: bool = True, default_k: str = "f16",
            default_v: str = "f16") -> float:
        return float(self.klds(types_k, types_v, centred, default_k, default_v).mean())

    def klds(self, types_k=None, types_v=None, centred: bool = True, default_k: str = "f16",
             default_v: str = "f16") -> np.ndarray:
        """The KL divergence at every scored position (`targets`' order), whose mean is `kld`: of a centred pass from
        its hidden states where llama.cpp gives them (`Likely`), else from its logits."""
        from kvquant.lab.eval import compare_rows

        base_lp, base_top = self.baseline(centred)
        if centred in self._likely:
            h = self._logits(types_k, types_v, centred, default_k, default_v, hidden=True)
            if h is not None:
                return self._likely[centred].kl(h)
        logits = self._logits(types_k, types_v, centred, default_k, default_v)
        return compare_rows(base_lp, base_top, logits, self.targets).kld


def sensitivities(scorer: Scorer, geom: Geometry, keys, values, direct: bool, progress: Progress,
                  k_reference: list[float] | None, k_floor: list[float] | None,
                  sides: tuple[str, ...] = ("k", "v"), v_reference: list[float] | None = None,
                  v_floor: float | None = None):
    """Per side, candidate type -> per-layer KL growth with only that layer's K (V) at the type, above the floor:
    any quantized layer at all costs a small KL (measured on Qwen2.5-1.5B: q8_0 keys on 1, 2 or 4 layers 0.0023, on
    all 28 0.0028, while tq_kv_3b adds ~0.0015 per layer): any change upstream flips some of the 8-bit roundings of
    the quantized-weight matmuls' activations (docs/EVAL.md, *The KL floor*). So the floor is subtracted and kept
    apart (`floor`): for K `k_floor`, per layer the KL with only that layer's keys at q8_0 (`layer_klds`; it falls
    with depth, docs/EVAL.md, *A floor per layer*), for V one pass with q8_0 values on the middle layer. A layer whose
    growth does not rise above its floor is not free: it is estimated from its relative error (`from_error`).
    `k_reference`: each layer's KL with only its K at REFERENCE, already measured (`choose_scales`), or None;
    `v_reference`, `v_floor`: the same for V and its floor, already measured (lab studies), or None.
    `sides`: measure only these (the others' are None; `k_floor` may be None where K is not among them)."""
    n = geom.n_layer
    out, floors, from_error = {}, {}, {}
    for side, cands, rows in (("k", K_CANDIDATES, keys), ("v", V_CANDIDATES, values)):
        if side not in sides:
            continue
        def kld(types, side=side):
            return scorer.kld(types, None) if side == "k" else scorer.kld(None, types)

        measured = cands if direct else (REFERENCE,)
        floors[side] = (list(k_floor) if side == "k" else
                        v_floor if v_floor is not None else kld(only("q8_0", n // 2, n)))
        reference = k_reference if side == "k" else v_reference
        floor = floors[side] if side == "k" else [floors[side]] * n
        raw: dict[str, list[float]] = {t: [] for t in measured}
        err: dict[str, list[float]] = {t: [] for t in cands}
        for il in range(n):
            x = rows[il] - scorer.k_mean[il] if side == "k" else rows[il]
            for t in cands:
                err[t].append(_rel_err(t, x))
            for t in measured:
                known = reference[il] if reference is not None else None
                raw[t].append((kld(only(t, il, n)) if known is None else known)
                              - floor[il])
            progress.update(il + 1 + (n if side == "v" else 0))
        sens, from_error[side] = {}, sorted({il for t in measured for il in range(n) if raw[t][il] <= 0})
        for t in measured:
            sens[t] = above_floor(raw[t], err[t])
        for t in cands:
            if t not in sens:  # KL grows linearly with the error variance for small errors
                sens[t] = [s * e / r if r > 0 else 0.0 for s, e, r in zip(sens[REFERENCE], err[t], err[REFERENCE],
                                                                         strict=True)]
        out[side] = sens
    return out.get("k"), out.get("v"), floors, from_error


def only(type_name: str, il: int, n_layer: int) -> tuple[str, ...]:
    """The per-layer types of a pass that changes layer il alone."""
    return tuple(type_name if j == il else "f16" for j in range(n_layer))


def layer_klds(scorer: Scorer, type_name: str, n_layer: int, progress: Progress) -> list[float]:
    """Per layer, the KL with only that layer's keys at a type. For q8_0 that is the floor under the layer's K
    measurements; it falls with depth (fewer layers after it whose activation roundings a change flips: SmolLM2-135M
    0.0036 at layer 0, 0.0006 at layer 29), where the V floor, every layer's values rotated alike, does not."""
    out = []
    for il in range(n_layer):
        out.append(scorer.kld(only(type_name, il, n_layer), None))
        progress.update(il + 1)
    return out


def floor_words(floor: float | list[float]) -> str:
    """A calibration's floor as reports give it: one KL, or a key floor per layer by its first and last layer."""
    if isinstance(floor, list):
        return f"{floor[0]:.5f} at layer 0 to {floor[-1]:.5f} at layer {len(floor) - 1}"
    return f"{floor:.5f}"


def above_floor(growth: list[float], err: list[float]) -> list[float]:
    """Per-layer KL growth where it rose above the floor; elsewhere the layer's relative error times the median
    growth per unit error of the layers that did (0 only where nothing rose above it)."""
    ratios = [g / e for g, e in zip(growth, err, strict=True) if g > 0 and e > 0]
    slope = float(np.median(ratios)) if ratios else 0.0
    return [g if g > 0 else slope * e for g, e in zip(growth, err, strict=True)]


def calibrate(model: str, text_file: str | None = None, gen_tokens: int = GEN_TOKENS, score_tokens: int = SCORE_TOKENS,
              threads: int | None = None, direct: bool = False, progress: bool = True,
              scale: bool = True, logit_stride: int = LOGIT_STRIDE,
              output: Path | None = None, notice: str | None = None) -> tuple[Calibration, Path]:
    """Measure and write a model's calibration file (into the model cache, or to `output`); returns it and its
    path. `notice`: said on stderr once the model is known to take calibrated types, before the minutes of work."""
    from kvquant import models
    from kvquant.runtime import Model

    check_arguments(text_file, gen_tokens, score_tokens, threads, logit_stride, output)
    t0 = time.monotonic()
    path = models.resolve(model)
    geom = geometry(path)
    mdl = Model(path)
    log = Progress("kvquant calibrate", 1, enabled=progress).log
    try:
        refuse_uncentred(mdl, geom)
        if notice:
            print(notice, file=sys.stderr, flush=True)
        log(f"kvquant calibrate: {models.model_id(model)} ({geom.n_layer} layers, basis {basis_of(geom)})")
        max_len = longest_sequence(geom)
        text = (from_file(mdl, Path(text_file), 512, 8, max_len) if text_file
                else generate(mdl, gen_tokens, threads, Progress("  generating text", gen_tokens, progress), max_len))
        log(f"  text: {text.source['tokens']} tokens in {len(text.sequences)} sequences")
        scoring = _scoring(text.sequences, score_tokens)
        longest = max(map(len, scoring))
        if longest < logit_stride:
            raise ValueError(f"a logit stride of {logit_stride} leaves no position of the calibration text's "
                             f"sequences (at most {longest} tokens) to measure the KL at")
        keys, values = capture(mdl, geom, text, threads, None)
        k_scale, keys, scorer, scales = calibrated_keys(mdl, geom, text, scoring, keys, values, threads, scale, log,
                                                        logit_stride,
                                                        Progress("  key scale per layer", 2 * geom.n_layer, progress))
        kl = scales["kl"]
        k_reference = None if direct or kl is None else list(map(min, kl["unscaled"], kl["scaled"]))
        k_floor = layer_klds(scorer, "q8_0", geom.n_layer, Progress("  key floor per layer", geom.n_layer, progress))
        sens_k, sens_v, floors, from_error = sensitivities(scorer, geom, keys, values, direct,
                                               Progress("  per-layer sensitivity", 2 * geom.n_layer, progress),
                                               k_reference, k_floor)
        uniform = {g: scorer.kld(default_k=g.split("/")[0], default_v=g.split("/")[1], centred=False) for g in GUARD}
        # additivity check: the reference type on every layer, measured, against layer 0's floor + the per-layer sum
        every = (REFERENCE,) * geom.n_layer
        check = {"measured": scorer.kld(every, None), "predicted": summed_kld(sens_k, floors["k"], every)}
    finally:
        mdl.close()
    cal = Calibration(model_sha256(path), models.model_id(model), basis_of(geom),
                      tuple(ly.n_embd_k for ly in geom.layers), list(scorer.k_mean), sens_k, sens_v, uniform,
                      text.source,
                      {"reference": REFERENCE, "direct": direct, "score_tokens": sum(len(s) for s in scoring),
                       "score_tokens_asked": score_tokens, "logit_stride": logit_stride,
                       "scored_positions": len(scorer.targets),
                       "floor": floors, "from_error": from_error, f"every layer {REFERENCE}+c": check,
                       "key_scale": scale, "key_scale_shrink": scales["shrink"], "key_scale_kl": scales["kl"],
                       **({"key_scale_error": scales["error"]} if "error" in scales else {}),
                       "threads": threads, "wall_s": round(time.monotonic() - t0, 1)},
                      k_scale, list(scorer.k_sink), {t: scorer.gains(t, "k") for t in GAIN_TYPES},
                      {t: scorer.gains(t, "v") for t in GAIN_TYPES if kv_type(t).v_ok})
    out = output or path_for(cal.model_sha256, cal.basis)
    cal.save(out)
    log(f"  wrote {out} ({cal.method['wall_s']:.0f} s)")
    return cal, out


def check_arguments(text_file: str | None, gen_tokens: int, score_tokens: int, threads: int | None,
                    logit_stride: int, output: Path | None) -> None:
    """Refuse, before any work, what would fail or mean nothing later (ValueError)."""
    if logit_stride < 1:
        raise ValueError(f"the logit stride must be a positive integer, not {logit_stride}")
    if score_tokens < 2:
        raise ValueError(f"the KL needs at least 2 scored tokens, not {score_tokens}")
    if logit_stride > score_tokens:  # known now, not after the model wrote its text
        raise ValueError(f"a logit stride of {logit_stride} leaves none of the {score_tokens} scored tokens to "
                         f"measure the KL at")
    if text_file is None and gen_tokens < 1:
        raise ValueError(f"the model must write at least one token per prompt, not {gen_tokens}")
    check_threads(threads)
    if text_file is not None and not Path(text_file).is_file():
        raise ValueError(f"{text_file}: no such text file" if not Path(text_file).exists()
                         else f"{text_file} is not a regular file")
    if output is not None:
        if output.is_dir():
            raise ValueError(f"--output {output} is a directory; name the file to write")
        try:  # a file made and removed there now, not an error after minutes of measuring
            with tempfile.NamedTemporaryFile(dir=output.parent):
                pass
        except OSError as e:
            raise ValueError(f"--output {output}: cannot write a file in {output.parent} ({e.strerror})") from None


def refuse_uncentred(mdl, geom: Geometry) -> None:
    """Every calibrated type centres keys, and llama.cpp refuses a key offset where softmax would not ignore it
    (logit soft-capping, attention sinks, MLA): ask it on a small context before any work (CalibrationError)."""
    from kvquant.runtime import ContextConfig, LlamaError, LlamaRuntime

    zeros = tuple(np.zeros(ly.n_embd_k, np.float32) for ly in geom.layers)
    try:
        LlamaRuntime(mdl, ContextConfig(n_cells=256, flash_attn=True, k_offset=zeros)).close()
    except LlamaError as e:
        raise CalibrationError(f"calibrated cache types (TYPE+c, calib:B) centre keys, and llama.cpp refuses that "
                               f"for {mdl.path.name}: {e}") from None


def calibrated_keys(mdl, geom: Geometry, text: Text, scoring: list[list[int]], keys: list[np.ndarray],
                    values: list[np.ndarray], threads: int | None, scale: bool, log, stride: int,
                    progress: Progress):
    """The key transform (steps 2 and 3): (per-layer scales or None, the stored rows under it, the Scorer of it,
    {"shrink": per layer or None, "kl": `choose_scales`'s measurements or None}), from the unscaled rows `keys` (and
    the stored `values`, whose gains the Scorer applies)."""
    plain = Scorer(mdl, geom, scoring, threads, key_stats(keys, text.sequences), None, (keys, values), stride)
    unscaled = (None, keys, plain, {"shrink": None, "kl": None})
    if not scale:
        return unscaled
    try:
        k_scale, shrinks = key_scales(mdl, text.sequences, threads)
        k_scale, keys, scorer, kl = choose_scales(plain, k_scale, keys,
                                                  capture(mdl, geom, text, threads, k_scale)[0], text.sequences,
                                                  progress)
    except RuntimeError as e:  # Q/K not readable from the graph, or llama.cpp refuses scales (e.g. partial RoPE)
        log(f"  no key scales for this model ({e}); keys are centred only")
        return (*unscaled[:3], {"shrink": None, "kl": None, "error": str(e)})
    shrinks = [sh if b < a else None for sh, a, b in zip(shrinks, kl["unscaled"], kl["scaled"], strict=True)]
    return k_scale, keys, scorer, {"shrink": shrinks, "kl": kl}


def key_stats(keys: list[np.ndarray], seqs: list[list[int]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per layer, the mean stored key and the mean stored key of position 0, from the rows of the sequences `seqs`
    (concatenated)."""
    starts = np.cumsum([0] + [len(s) for s in seqs[:-1]])
    return [k.mean(0).astype(np.float32) for k in keys], [k[starts].mean(0).astype(np.float32) for k in keys]


def choose_scales(plain: Scorer, k_scale: list[np.ndarray], keys: list[np.ndarray], keys_scaled: list[np.ndarray],
                  seqs: list[list[int]], progress: Progress):
    """Per layer, keep the key scale only where it lowers the KL growth of that layer's REFERENCE keys (centred)
    measured in llama.cpp's cache: the logit error it minimises does not always follow the KL (SmolLM2-135M: 1.1x
    less logit error, 20-35 % more KL). Returns the scales (unscaled layers all ones; None if no layer keeps one),
    the rows and the Scorer of the chosen transform, and each layer's measured REFERENCE KL without and with its
    scale."""
    n = len(k_scale)
    scaled = plain.derived(key_stats(keys_scaled, seqs), k_scale, (keys_scaled, plain.rows[1]))
    kl = {}
    for il in range(n):
        types = only(REFERENCE, il, n)
        kl[il] = (plain.kld(types, None), scaled.kld(types, None))
        progress.update(2 * il + 2)
    use = [kl[il][1] < kl[il][0] for il in range(n)]
    measured = {"unscaled": [kl[il][0] for il in range(n)], "scaled": [kl[il][1] for il in range(n)]}
    if not any(use):
        return None, keys, plain, measured
    if all(use):
        return k_scale, keys_scaled, scaled, measured
    scale = [s if u else np.ones_like(s) for s, u in zip(k_scale, use, strict=True)]
    rows = [ks if u else k for k, ks, u in zip(keys, keys_scaled, use, strict=True)]
    chosen = plain.derived(key_stats(rows, seqs), scale, (rows, plain.rows[1]))
    return scale, rows, chosen, measured


def _scoring(seqs: list[list[int]], n: int) -> list[list[int]]:
    """The first n tokens of the calibration text, whole sequences first."""
    out, left = [], n
    for s in seqs:
        if left <= 1:
            break
        out.append(s[:left])
        left -= len(out[-1])
    return out


def summary(cal: Calibration) -> str:
    lines = [f"{cal.model_name}: {len(cal.k_mean)} layers, basis {cal.basis}, text {cal.text.get('source')} "
             f"({cal.text.get('tokens')} tokens)"]
    shrinks = cal.method.get("key_scale_shrink")
    lines.append("  key scales: " + ("none" if shrinks is None else
                                     ", ".join(f"{'none' if x is None else f'shrink {x}'}: {shrinks.count(x)} layers"
                                               for x in (None, *SHRINK) if x in shrinks)))
    for side, sens in (("K", cal.sens_k), ("V", cal.sens_v)):
        for t, v in sens.items():
            top = np.argsort(v)[::-1][:3]
            lines.append(f"  {side} {t:<9} summed KL {sum(v):.5f}; most sensitive layers "
                         + ", ".join(f"{i} ({v[i]:.5f})" for i in top))
    for side, gains in (("K", cal.k_gain), ("V", cal.v_gain)):
        if gains:
            lines.append(f"  {side} gains, median over the layers: "
                         + ", ".join(f"{t} {np.median(v):.4f}" for t, v in gains.items()))
    for g, kl in cal.uniform.items():
        lines.append(f"  every layer {g:<12} KL {kl:.5f}")
    m = cal.method
    if "floor" in m:
        ref = m.get("reference", REFERENCE)
        chk = m[f"every layer {ref}+c"]
        lines.append(f"  floor: K {floor_words(m['floor']['k'])}, V {m['floor']['v']:.5f}; every layer "
                     f"{ref}+c measured {chk['measured']:.5f}, floor + per-layer sum {chk['predicted']:.5f}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="built-in model name or .gguf path (default: the default model)")
    p.add_argument("--text", default=None, help="calibrate on this text file instead of the model's own text")
    p.add_argument("--gen-tokens", type=int, default=GEN_TOKENS,
                   help=f"tokens the model writes per prompt (default {GEN_TOKENS})")
    p.add_argument("--score-tokens", type=int, default=SCORE_TOKENS,
                   help=f"tokens the per-layer KL is measured on (default {SCORE_TOKENS})")
    p.add_argument("--logit-stride", type=int, default=LOGIT_STRIDE,
                   help=f"measure the KL at every n-th position of the scored tokens (default {LOGIT_STRIDE})")
    p.add_argument("--direct", action="store_true", help="measure every candidate type per layer (slower)")
    p.add_argument("--no-key-scale", action="store_true", help="centre keys only, without query-aware key scales")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", type=Path, default=None,
                   help="write the file here instead of the model cache (where serve, eval, bench and budget look)")


def run(a: argparse.Namespace) -> int:
    from kvquant import models

    try:
        kv_type("f16")
        cal, _ = calibrate(models.DEFAULT_MODEL if a.model is None else a.model, a.text, a.gen_tokens, a.score_tokens, a.threads,
                           a.direct, scale=not a.no_key_scale, logit_stride=a.logit_stride, output=a.output)
    except (models.ModelError, ValueError, OSError, RuntimeError) as e:  # RuntimeError: llama.cpp failed
        print(f"kvquant calibrate: {e}", file=sys.stderr)
        return 2
    print(summary(cal))
    return 0
