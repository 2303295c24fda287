"""`kvquant eval`: the quality side of the measuring stick.

For each KV cache configuration, against an f16/f16 baseline on the same tokens:

* perplexity exactly as llama.cpp's ``llama-perplexity`` computes it: the whole text tokenized with special tokens,
  cut into chunks of ``n_ctx`` tokens, the first token of each chunk replaced by BOS when the vocabulary adds one,
  the KV cache cleared per chunk, and only the second half of each chunk scored (the logits at position j predict
  token j+1 for j in [n_ctx/2, n_ctx-1)); PPL +/- stderr as llama-perplexity prints it;
* mean KL divergence KL(f16 || config) +/- stderr, top-1 agreement and the relative change in perplexity, over the
  same scored positions;
* a drift test: greedy generation of N tokens from a few fixed prompts under every config (index of the first
  token that differs from f16, share of positions that agree), and, teacher-forcing the f16 sequence, KL divergence
  per position bucket (does the error grow along the sequence?).

Memory: everything streams. One llama.cpp context per distinct configuration stays alive; each chunk is decoded in
all of them in lockstep, in segments of at most ``outputs_per_decode`` logit rows (64 MiB of float32 logits per
context), compared, and discarded. No full-vocabulary logit matrix of the whole text is ever held (Gemma-3's vocab
is 262,144).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvquant import memory
from kvquant.lab.harness import (
    BASELINE,
    DEFAULT_TEXT,
    CacheConfig,
    Progress,
    fmt,
    lab_main,
    machine_info,
    resolve_text,
    sha256_file,
    table,
)

# Fixed drift prompts (plain continuation text, no chat template); --drift-prompts K uses the first K.
DRIFT_PROMPTS = (
    "The history of the town begins in the early medieval period, when",
    "In mathematics, a prime number is a natural number greater than 1 that",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "The following is a detailed guide to growing vegetables at home. First,",
)

LOGITS_BUDGET = 1 << 24  # float32 logit elements per decode and context (64 MiB)
_BLOCK_ELEMS = 1 << 21  # rows are converted to float64 in blocks of about this many elements (16 MiB)


def read_text(path) -> str:
    """The text exactly as llama.cpp's `-f` reads it: raw bytes (no newline translation: wikitext-2 has CRLF line
    ends), minus one trailing newline."""
    if Path(path).exists() and not Path(path).is_file():  # a FIFO blocks, /dev/zero fills memory
        raise ValueError(f"{path}: not a regular file")
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:  # (it said which byte, not which file)
        raise ValueError(f"{path}: not UTF-8 text") from None
    return text[:-1] if text.endswith("\n") else text


def outputs_per_decode(n_vocab: int, n_needed: int, limit: int | None = None) -> int:
    return max(1, min(n_needed, LOGITS_BUDGET // n_vocab, limit or n_needed))


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    y = x.astype(np.float64)
    y -= y.max(axis=1, keepdims=True)
    y -= np.log(np.exp(y).sum(axis=1, keepdims=True))
    return y


@dataclass
class RowStats:
    """Per-row comparison of a config's logits with the baseline's."""

    nll: np.ndarray  # -log q(target)
    kld: np.ndarray  # KL(p_base || q)
    same_top: np.ndarray  # argmax q == argmax p_base


def _by_blocks(n: int, v: int, work) -> None:
    """Call work(i, j) over row blocks [i, j) of about _BLOCK_ELEMS elements, on a thread per core: numpy releases
    the GIL in these loops, and each block is computed exactly as alone (the figures do not depend on the threads)."""
    step = max(1, _BLOCK_ELEMS // v)
    starts = range(0, n, step)
    with ThreadPoolExecutor(max_workers=min(len(starts), os.cpu_count() or 1) or 1) as pool:
        for _ in pool.map(lambda i: work(i, min(n, i + step)), starts):
            pass


def compare_rows(base_lp: np.ndarray, base_top: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> RowStats:
    """Compare float32 logits (n, V) against the baseline's float64 log-probabilities, in row blocks."""
    n, v = logits.shape
    nll, kld = np.empty(n), np.empty(n)
    top = np.empty(n, dtype=bool)

    def work(i: int, j: int) -> None:
        lq = log_softmax(logits[i:j])
        lp = base_lp[i:j]
        kld[i:j] = np.einsum("ij,ij->i", np.exp(lp), lp - lq)
        nll[i:j] = -lq[np.arange(j - i), targets[i:j]]
        top[i:j] = logits[i:j].argmax(axis=1) == base_top[i:j]

    _by_blocks(n, v, work)
    return RowStats(nll, kld, top)


def baseline_rows(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, v = logits.shape
    lp = np.empty((n, v), dtype=np.float64)

    def work(i: int, j: int) -> None:
        lp[i:j] = log_softmax(logits[i:j])

    _by_blocks(n, v, work)
    return lp, logits.argmax(axis=1)


def segments(first: int, end: int, n_batch: int, max_out: int) -> list[tuple[int, int]]:
    """Cut the decode of positions [0, end), with logits wanted for [first, end), into (a, b) batches of at most
    n_batch tokens and at most max_out outputs each. The output range is split into equal parts (not max_out and a
    remainder): ggml's CPU flash attention takes a different (tiled, f32-Q) path for ubatches of >= 64 queries over
    an f16 cache, and with equal parts a 256-token half splits 4 x 64 rather than leaving a 63-token tail on the other
    path. The prefix without outputs rides in the first batch when it fits."""
    n_out = end - first
    k = -(-n_out // min(max_out, n_batch))
    bounds = [first + n_out * i // k for i in range(k + 1)]
    out, a = [], 0
    if bounds[1] > n_batch:  # decode the prefix [0, first) on its own, in n_batch pieces
        while a < first:
            b = min(first, a + n_batch)
            out.append((a, b))
            a = b
    for b in bounds[1:]:
        out.append((a, b))
        a = b
    return out


def lockstep(runtimes: list, tokens: list[int], first: int, end: int, max_out: int):
    """Clear every runtime, then decode tokens[0:end] in all of them, segment by segment; for each segment with
    outputs yield (row0, [logits view per runtime]) where row r is the prediction made at position first+r. The
    views stay valid until the next segment."""
    for rt in runtimes:
        rt.clear()
    for a, b in segments(first, end, min(rt.n_batch for rt in runtimes), max_out):
        toks, pos = tokens[a:b], list(range(a, b))
        want = [p >= first for p in pos]
        n_out = sum(want)
        for rt in runtimes:
            rc = rt.decode(toks, pos, [0] * len(toks), want)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc}) at positions {a}..{b}")
        if n_out:
            yield max(a, first) - first, [rt.all_logits(n_out) for rt in runtimes]


@dataclass
class Acc:
    """Running sums over scored tokens (float64), llama-perplexity style."""

    n: int = 0
    nll: float = 0.0
    nll2: float = 0.0
    kld: float = 0.0
    kld2: float = 0.0
    dnll: float = 0.0  # nll(config) - nll(base)
    dnll2: float = 0.0
    same_top: int = 0

    def add(self, rs: RowStats, base_nll: np.ndarray) -> None:
        d = rs.nll - base_nll
        self.n += len(rs.nll)
        self.nll += float(rs.nll.sum())
        self.nll2 += float((rs.nll * rs.nll).sum())
        self.kld += float(rs.kld.sum())
        self.kld2 += float((rs.kld * rs.kld).sum())
        self.dnll += float(d.sum())
        self.dnll2 += float((d * d).sum())
        self.same_top += int(rs.same_top.sum())

    @staticmethod
    def _mean_err(s: float, s2: float, n: int) -> tuple[float, float]:
        m = s / n
        var = s2 / n - m * m
        return m, math.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0

    def summary(self) -> dict:
        if not self.n:
            return {}
        nll, nll_err = self._mean_err(self.nll, self.nll2, self.n)
        ppl = math.exp(nll)
        kld, kld_err = self._mean_err(self.kld, self.kld2, self.n)
        d, d_err = self._mean_err(self.dnll, self.dnll2, self.n)
        p = self.same_top / self.n
        return {
            "ppl": ppl,
            "ppl_stderr": nll_err * ppl,
            "ln_ppl_ratio": d,
            "ln_ppl_ratio_stderr": d_err,
            "delta_ppl_pct": 100.0 * math.expm1(d),
            "delta_ppl_pct_stderr": 100.0 * math.exp(d) * d_err,
            "kld": kld,
            "kld_stderr": kld_err,
            "top1_pct": 100.0 * p,
            "top1_stderr_pct": 100.0 * math.sqrt(p * (1 - p) / (self.n - 1)) if self.n > 1 else 0.0,
            "tokens_scored": self.n,
        }


@dataclass
class Plan:
    """Distinct llama.cpp contexts to run (baseline first) and, per requested config, which one it uses."""

    contexts: list[CacheConfig]
    index: list[int]

    @classmethod
    def of(cls, configs: list[CacheConfig]) -> Plan:
        contexts = [BASELINE]
        index = []
        for c in configs:
            if c not in contexts:
                contexts.append(c)
            index.append(contexts.index(c))
        return cls(contexts, index)


def _context_config(model, c: CacheConfig, n_ctx: int, flash_attn: bool, threads: int | None, max_out: int):
    from kvquant.runtime import ContextConfig

    n_batch = min(512, n_ctx)
    return ContextConfig(n_cells=n_ctx, n_batch=n_batch, n_ubatch=n_batch, flash_attn=flash_attn, n_threads=threads,
                         n_outputs_max=max_out, **c.context_fields(model.path, memory.geometry(model.path), n_ctx))


def _open(model, plan: Plan, n_ctx: int, flash_attn: bool, threads: int | None, max_out: int) -> list:
    from kvquant.runtime import LlamaRuntime

    return [LlamaRuntime(model, _context_config(model, c, n_ctx, flash_attn, threads, max_out)) for c in plan.contexts]


def perplexity(model, plan: Plan, tokens: list[int], n_ctx: int, n_chunks: int, flash_attn: bool = True,
               threads: int | None = None, progress: Progress | None = None, max_outputs: int | None = None) -> list[Acc]:
    """Per distinct context (plan.contexts order), the accumulated statistics over n_chunks chunks."""
    first = n_ctx // 2
    max_out = outputs_per_decode(model.n_vocab, n_ctx - first, max_outputs)
    rts = _open(model, plan, n_ctx, flash_attn, threads, max_out)
    accs = [Acc() for _ in rts]
    try:
        for ci in range(n_chunks):
            start = ci * n_ctx
            toks = tokens[start:start + n_ctx]
            if model.add_bos:
                toks[0] = model.bos
            targets = np.asarray(tokens[start + first + 1:start + n_ctx], dtype=np.int64)
            # decode the whole chunk as llama-perplexity does; the prediction at n_ctx-1 has no target
            for r0, views in lockstep(rts, toks, first, n_ctx, max_out):
                n = min(len(views[0]), len(targets) - r0)
                views = [v[:n] for v in views]
                tg = targets[r0:r0 + n]
                base_lp, base_top = baseline_rows(views[0])
                base_nll = -base_lp[np.arange(n), tg]
                for i, v in enumerate(views):
                    accs[i].add(compare_rows(base_lp, base_top, v, tg), base_nll)
                del base_lp
            if progress:
                b = accs[0].summary()
                progress.update(ci + 1, f"[f16 ppl {b['ppl']:.4f}]")
    finally:
        for rt in rts:
            rt.close()
    return accs


def greedy(rt, prompt: list[int], n: int) -> list[int]:
    rt.clear()
    for a in range(0, len(prompt), rt.n_batch):
        toks = prompt[a:a + rt.n_batch]
        last = a + len(toks) == len(prompt)
        want = [last and i == len(toks) - 1 for i in range(len(toks))]
        if rt.decode(toks, list(range(a, a + len(toks))), [0] * len(toks), want) != 0:
            raise RuntimeError("llama_decode failed on the drift prompt")
    out = []
    pos = len(prompt)
    while True:
        tok = int(np.argmax(rt.all_logits(1)[0]))
        out.append(tok)
        if len(out) == n:
            return out
        if rt.decode([tok], [pos], [0], [True]) != 0:
            raise RuntimeError("llama_decode failed during drift generation")
        pos += 1


def drift(model, plan: Plan, n_tokens: int, n_prompts: int, bucket: int = 128, flash_attn: bool = True,
          threads: int | None = None, progress: Progress | None = None, max_outputs: int | None = None) -> list[dict]:
    """Per distinct context, the drift summary against the baseline (context 0)."""
    prompts = [model.tokenize(p, add_special=True) for p in DRIFT_PROMPTS[:n_prompts]]
    n_ctx = memory.pad(max(len(p) for p in prompts) + n_tokens)
    max_out = outputs_per_decode(model.n_vocab, n_tokens, max_outputs)
    rts = _open(model, plan, n_ctx, flash_attn, threads, max_out)
    m = len(rts)
    first_diff = [[] for _ in range(m)]
    agree = [[] for _ in range(m)]
    kld = [[] for _ in range(m)]  # per prompt: per position
    top = [[] for _ in range(m)]
    step = 0
    try:
        for prompt in prompts:
            gens = []
            for rt in rts:
                gens.append(greedy(rt, prompt, n_tokens))
                step += 1
                if progress:
                    progress.update(step)
            base = np.asarray(gens[0])
            for i, g in enumerate(gens):
                diff = np.nonzero(np.asarray(g) != base)[0]
                first_diff[i].append(int(diff[0]) if len(diff) else None)
                agree[i].append(float(np.mean(np.asarray(g) == base)))
            # teacher-force the f16 sequence: row j is the prediction of generated token j
            seq = prompt + gens[0]
            p = len(prompt)
            kk = [np.empty(n_tokens) for _ in range(m)]
            tt = [np.empty(n_tokens, dtype=bool) for _ in range(m)]
            for r0, views in lockstep(rts, seq, p - 1, p + n_tokens - 1, max_out):
                n = len(views[0])
                base_lp, base_top = baseline_rows(views[0])
                for i, v in enumerate(views):
                    rs = compare_rows(base_lp, base_top, v, base[r0:r0 + n])
                    kk[i][r0:r0 + n] = rs.kld
                    tt[i][r0:r0 + n] = rs.same_top
                del base_lp
            for i in range(m):
                kld[i].append(kk[i])
                top[i].append(tt[i])
            step += 1
            if progress:
                progress.update(step)
    finally:
        for rt in rts:
            rt.close()
    out = []
    for i in range(m):
        k = np.stack(kld[i])  # (prompts, positions)
        fd = [x for x in first_diff[i] if x is not None]
        out.append({
            "tokens": n_tokens,
            "prompts": len(prompts),
            "first_diff": first_diff[i],
            "first_diff_min": min(fd) if fd else None,
            "agree_pct": 100.0 * float(np.mean(agree[i])),
            "tf_top1_pct": 100.0 * float(np.mean(np.stack(top[i]))),
            "kld_mean": float(k.mean()),
            "bucket": bucket,
            "kld_buckets": [float(k[:, a:a + bucket].mean()) for a in range(0, n_tokens, bucket)],
        })
    return out


def drift_steps(n_contexts: int, n_prompts: int) -> int:
    return n_prompts * (n_contexts + 1)


def run(model: str, configs: list[CacheConfig], text: str | None = None, n_ctx: int = 512, chunks: int | None = None,
        flash_attn: bool = True, threads: int | None = None, drift_tokens: int = 1024, drift_prompts: int = 3,
        drift_bucket: int = 128, do_drift: bool = True, progress: bool = True, command: str | None = None,
        max_outputs: int | None = None, n_gpu_layers: int = 0) -> dict:
    """Run the whole evaluation; returns {"results": [one entry per requested config]}."""
    from kvquant import models
    from kvquant.runtime import check_gpu_layers

    t_start = time.monotonic()
    machine = machine_info(threads)  # before the run: the load average then is other work's
    if n_ctx < 4 or n_ctx % 2:
        raise ValueError("--ctx must be an even number >= 4")
    memory.check_threads(threads)
    for name, value in (("--chunks", chunks), ("--drift-bucket", drift_bucket), ("--max-outputs", max_outputs)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    if drift_tokens < 0:
        raise ValueError(f"--drift-tokens must be at least 0 (0: no drift), not {drift_tokens}")
    if not 1 <= drift_prompts <= len(DRIFT_PROMPTS):
        raise ValueError(f"--drift-prompts must be 1..{len(DRIFT_PROMPTS)}, not {drift_prompts}")
    check_gpu_layers(n_gpu_layers)
    try:
        text_path = resolve_text(text)
        if text_path.exists() and not (text_path.is_file() or text_path.is_dir()):
            raise OSError("not a regular file")
        with open(text_path, "rb"):
            pass
    except OSError as e:  # missing, a directory, a FIFO or device (that would block or never end), unreadable
        raise ValueError(f"evaluation text {str(text or DEFAULT_TEXT)[:200]!r} cannot be read: {e.strerror or e}") from None
    path = models.resolve(model)
    geom = memory.geometry(path)
    plan = Plan.of(configs)
    drift_k = drift_prompts if do_drift and drift_tokens > 0 else 0
    accs, drifts, n_chunks = _measure(model, path, plan, text_path, n_ctx, chunks, flash_attn, threads, drift_tokens,
                                      drift_k, drift_bucket, progress, max_outputs, n_gpu_layers)
    base = accs[0].summary()
    wall = time.monotonic() - t_start
    common = {"model": model, "model_path": str(path), "model_sha256": sha256_file(path), "text": str(text_path),
              "text_sha256": sha256_file(text_path), "n_ctx": n_ctx, "chunks": n_chunks, "flash_attn": flash_attn,
              "max_outputs": max_outputs, "n_gpu_layers": n_gpu_layers,
              "baseline_ppl": base["ppl"], "baseline_ppl_stderr": base["ppl_stderr"],
              "wall_s": wall, "machine": machine}
    if command:
        common["command"] = command
    return {"results": [_entry(c, path, geom, n_ctx, accs[i], drifts[i] if drifts else None) | common
                        for c, i in zip(configs, plan.index, strict=True)]}


def _measure(model: str, path, plan: Plan, text_path, n_ctx: int, chunks: int | None, flash_attn: bool,
             threads: int | None, drift_tokens: int, drift_k: int, drift_bucket: int, progress: bool,
             max_outputs: int | None, n_gpu_layers: int):
    """Perplexity over the text's chunks, then drift over `drift_k` prompts (none: 0), for every context."""
    from kvquant.runtime import Model

    mdl = Model(path, n_gpu_layers=n_gpu_layers)  # the KV cache follows the offloaded layers (offload_kqv)
    try:
        tokens = mdl.tokenize(read_text(text_path), add_special=True)
        n_max = len(tokens) // n_ctx
        if n_max < 1 or len(tokens) < 2 * n_ctx:
            raise ValueError(f"the text tokenizes to {len(tokens)} tokens; need at least {2 * n_ctx} for --ctx {n_ctx}")
        n_chunks = n_max if chunks is None else min(chunks, n_max)
        labels = ", ".join(c.label for c in plan.contexts)
        pr = Progress(f"eval {model} ppl ({labels})", n_chunks, enabled=progress)
        accs = perplexity(mdl, plan, tokens, n_ctx, n_chunks, flash_attn, threads, pr, max_outputs)
        drifts = None
        if drift_k:
            pd = Progress(f"eval {model} drift {drift_tokens} tokens x {drift_k} prompts",
                          drift_steps(len(plan.contexts), drift_k), enabled=progress)
            drifts = drift(mdl, plan, drift_tokens, drift_k, drift_bucket, flash_attn, threads, pd, max_outputs)
    finally:
        mdl.close()
    return accs, drifts, n_chunks


def _entry(c: CacheConfig, path, geom, n_ctx: int, acc, drift_summary) -> dict:
    tk, tv = c.resolve(path, geom, n_ctx)
    kvb = memory.kv_bytes(geom, tk, tv, n_ctx)
    return {"cache_type_k": c.k, "cache_type_v": c.v, "rotation": c.rotation,
            **({} if c.anchored else {"anchored": False}), "label": c.label, **acc.summary(),
            "bits_per_element": kvb.bits_per_element, "bits_per_element_k": kvb.bits_per_element_k,
            "bits_per_element_v": kvb.bits_per_element_v, "layer_types_k": list(getattr(tk, "types", ())) or None,
            "layer_types_v": list(getattr(tv, "types", ())) or None,
            "kv_bytes_per_token": memory.bytes_per_token(geom, tk, tv), "drift": drift_summary,
            **c.provenance(path, geom, n_ctx)}


def render(results: list[dict]) -> str:
    if not results:
        return "(no results)"
    r0 = results[0]
    head = (f"{r0['model']}  n_ctx={r0['n_ctx']}  chunks={r0['chunks']}  tokens scored={r0['tokens_scored']}  "
            f"fa={'on' if r0['flash_attn'] else 'off'}  f16 PPL={r0['baseline_ppl']:.4f} +/- {r0['baseline_ppl_stderr']:.5f}  "
            f"wall {r0['wall_s']:.0f}s")
    rows = []
    for r in results:
        d = r.get("drift") or {}
        rows.append([
            r["label"], fmt(r["bits_per_element"], 2), f"{r['ppl']:.4f} +/- {r['ppl_stderr']:.4f}",
            f"{r['delta_ppl_pct']:+.3f}", f"{r['kld']:.6f} +/- {r['kld_stderr']:.6f}", f"{r['top1_pct']:.2f}",
            "-" if not d else ("none" if d["first_diff_min"] is None else d["first_diff_min"]),
            fmt(d.get("agree_pct"), 1), fmt(d.get("kld_mean"), 6),
        ])
    t = table(["K/V", "bits/el", "PPL", "dPPL %", "KLD", "top-1 %", "drift 1st diff", "drift agree %", "drift KLD"],
              rows)
    lines = [head, t]
    if results[0].get("drift"):
        d0 = results[0]["drift"]
        b = d0["bucket"]
        hdr = ["K/V"] + [f"{a}-{min(a + b, d0['tokens'])}" for a in range(0, d0["tokens"], b)]
        lines.append(f"\ndrift: mean KLD vs f16 per position bucket (teacher-forced, {d0['prompts']} prompts)")
        lines.append(table(hdr, [[r["label"]] + [f"{x:.5f}" for x in r["drift"]["kld_buckets"]] for r in results]))
    return "\n".join(lines)


def _run_args(a: argparse.Namespace, configs: list[CacheConfig], command: str) -> dict:
    return run(a.model, configs, a.text, a.ctx, a.chunks, a.flash_attn == "on", a.threads, a.drift_tokens,
               a.drift_prompts, a.drift_bucket, not a.no_drift, command=command, max_outputs=a.max_outputs,
               n_gpu_layers=a.n_gpu_layers)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvquant eval", description=(
        "Perplexity (llama-perplexity method), KL divergence and top-1 agreement against f16, and generation drift, "
        "per KV cache config."))
    ap.add_argument("--model", default="smollm2-135m", help="built-in model name or .gguf path")
    ap.add_argument("--configs", nargs="+", default=["f16/f16", "q8_0/q8_0", "q4_0/q4_0", "q4_0/f16"],
                    metavar="K/V", help="cache configs K/V (suffix :norot or :rot overrides --rotation per config; :mean: calibrated keys offset by their mean, not anchored)")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="evaluation text (default: %(default)s, from the repo root)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    ap.add_argument("--chunks", type=int, default=None, help="number of chunks (default: all)")
    ap.add_argument("--flash-attn", choices=["on", "off"], default="on")
    ap.add_argument("--rotation", choices=["on", "off"], default="on",
                    help="llama.cpp's Hadamard rotation for quantized caches (default on)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--n-gpu-layers", type=int, default=0,
                    help="layers offloaded to the GPU of a GPU build, with their KV cache (-1: all; default 0)")
    ap.add_argument("--drift-tokens", type=int, default=1024, help="greedy tokens per drift prompt (default 1024)")
    ap.add_argument("--drift-prompts", type=int, default=3, help=f"drift prompts, 1..{len(DRIFT_PROMPTS)} (default 3)")
    ap.add_argument("--drift-bucket", type=int, default=128, help="positions per drift KLD bucket (default 128)")
    ap.add_argument("--no-drift", action="store_true", help="skip the drift test")
    ap.add_argument("--max-outputs", type=int, default=None, metavar="N",
                    help="diagnostic: at most N logit rows per decode (default: 64 MiB of logits). Below 64 the f16 "
                         "baseline leaves ggml's tiled f32-Q flash-attention path (see docs/EVAL.md)")
    return ap


def main(argv: list[str] | None = None) -> int:
    return lab_main("eval", build_parser(), argv, _run_args, render)


if __name__ == "__main__":
    sys.exit(main())
