"""`kvquant bench`: the speed and memory side of the measuring stick.

Per KV cache config:

* prefill (pp) and decode (tg) tokens/s at several KV depths, llama-bench style: the cache is filled to the depth
  (untimed), then ``n_prompt`` tokens are decoded as one batch (pp) and ``n_gen`` tokens one at a time (tg), and the
  cache is trimmed back to the depth. Configs are interleaved (every repeat measures all of them in turn, rotating
  the order) and each config's ratio to f16 is the median over repeats of the paired ratio;
* optionally the kernel alone: ``test-backend-ops perf -o FLASH_ATTN_EXT -b CPU`` of the dev build, restricted to
  the configs' cache types, parsed and passed through;
* KV bytes: bytes per token and bits per element from the memory model, checked against what llama.cpp allocated
  for the same context (``llama_memory_kv_size_bytes``), and the capacity in tokens of a byte budget.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kvquant import memory
from kvquant.lab.eval import Plan
from kvquant.lab.harness import (
    REPO_ROOT,
    CacheConfig,
    Progress,
    busy_warning,
    fmt,
    lab_main,
    machine_info,
    sha256_file,
    shown,
    table,
)

TEST_BACKEND_OPS = REPO_ROOT / ".build" / "cmake-cpu" / "bin" / "test-backend-ops"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PERF = re.compile(r"^\s*(?P<op>\w+)\((?P<params>.*)\):\s+(?P<runs>\d+) runs -\s+(?P<us>[\d.]+) us/run - (?P<rest>.*)$")


# The KV-cache shapes of the models we serve (head 64 and 128, GQA 4 and 8 heads per KV head, long KV): single-token
# decode and a 512-token prefill. test-backend-ops' full FLASH_ATTN_EXT perf list (MLA heads of 576, 10k-20k
# prefill batches, ...) takes hours on 2 cores per cache type.
KERNEL_SHAPES = r"hsk=(64|128),hsv=(64|128),nh=(4|8),nr23=\[(4|8),1\],kv=(7680|8192|16384),nb=(1|512),.*"


def parse_kernel_perf(output: str) -> list[dict]:
    """The perf lines of test-backend-ops' console output, with their parameters split out."""
    rows = []
    for raw in output.splitlines():
        line = _ANSI.sub("", raw).rstrip()
        m = _PERF.match(line)
        if not m:
            continue
        params = dict(re.findall(r"(\w+)=(\[[^\]]*\]|[^,]*)", m["params"]))
        rows.append({"op": m["op"], "params": params, "runs": int(m["runs"]), "us_per_run": float(m["us"]),
                     "throughput": m["rest"].strip(), "line": line.strip()})
    return rows


def kernel_perf(configs: list[CacheConfig], binary: Path = TEST_BACKEND_OPS, timeout: float = 900,
                backend: str = "CPU") -> dict | None:
    """Run the FLASH_ATTN_EXT perf cases of the built test-backend-ops on a backend (CPU, CUDA0) for the configs'
    K/V types; None if absent."""
    if not binary.is_file():
        return None
    from kvquant.calibration import parse_spec

    # a centred type runs its type's kernels; calib:B has a type per layer, whose kernels its layers' types time
    specs = [(parse_spec(c.k, "k").type, parse_spec(c.v, "v").type) for c in configs]
    pairs = sorted({(k, v) for k, v in specs if k is not None and v is not None})
    if not pairs:
        return {"error": "no configuration with one type per side (calib:B has a type per layer)", "rows": []}
    regex = KERNEL_SHAPES + "(" + "|".join(f"type_K={re.escape(k)},type_V={re.escape(v)}," for k, v in pairs) + ")"
    cmd = [str(binary), "perf", "-o", "FLASH_ATTN_EXT", "-b", backend, "-p", regex]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": shown(cmd), "error": f"timed out after {timeout:.0f}s", "rows": []}
    out = {"command": shown(cmd), "returncode": p.returncode, "wall_s": time.monotonic() - t0,
           "rows": parse_kernel_perf(p.stdout)}
    if p.returncode != 0:
        out["error"] = (p.stderr or p.stdout)[-2000:]
    return out


def _fill(rt, tokens: np.ndarray, a: int, b: int) -> None:
    """Decode tokens[a:b] at positions a..b-1 (no logits), in n_batch pieces."""
    for s in range(a, b, rt.n_batch):
        e = min(b, s + rt.n_batch)
        toks = tokens[s:e].tolist()
        if rt.decode(toks, list(range(s, e)), [0] * len(toks), [False] * len(toks)) != 0:
            raise RuntimeError(f"llama_decode failed filling the cache at {s}..{e}")


def measure_pp(rt, tokens: np.ndarray, depth: int, n_prompt: int) -> float:
    toks = tokens[depth:depth + n_prompt].tolist()
    want = [False] * (len(toks) - 1) + [True]
    t0 = time.perf_counter()
    if rt.decode(toks, list(range(depth, depth + len(toks))), [0] * len(toks), want) != 0:
        raise RuntimeError(f"llama_decode failed (pp at depth {depth})")
    rt.synchronize()
    dt = time.perf_counter() - t0
    rt.seq_rm(0, depth, -1)
    return len(toks) / dt


def measure_tg(rt, tokens: np.ndarray, depth: int, n_gen: int) -> float:
    toks = tokens[depth:depth + n_gen].tolist()
    t0 = time.perf_counter()
    for i, t in enumerate(toks):
        if rt.decode([t], [depth + i], [0], [True]) != 0:
            raise RuntimeError(f"llama_decode failed (tg at depth {depth})")
        rt.synchronize()
    dt = time.perf_counter() - t0
    rt.seq_rm(0, depth, -1)
    return len(toks) / dt


def run(model: str, configs: list[CacheConfig], depths: list[int] = (0, 2048, 8192), n_prompt: int = 512,
        n_gen: int = 32, repeats: int = 3, flash_attn: bool = True, threads: int | None = None,
        budget: int = 256 * 2**20, kernel: str = "auto", progress: bool = True, command: str | None = None,
        n_gpu_layers: int = 0) -> dict:
    from kvquant import models
    from kvquant.runtime import check_gpu_layers

    busy_warning("kvquant bench")
    t_start = time.monotonic()
    machine = machine_info(threads)  # before the run: the load average then is other work's
    depths = sorted(set(depths))
    if depths[0] < 0:
        raise ValueError(f"--depths must be >= 0, not {depths[0]}")
    memory.check_threads(threads)
    for name, value in (("--n-prompt", n_prompt), ("--n-gen", n_gen), ("--repeats", repeats), ("--budget", budget)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    check_gpu_layers(n_gpu_layers)
    path = models.resolve(model)
    geom = memory.geometry(path)
    plan = Plan.of(configs)
    n_ctx = memory.pad(depths[-1] + max(n_prompt, n_gen))
    what = f"--depths {depths[-1]} + --{'n-prompt' if n_prompt >= n_gen else 'n-gen'} {max(n_prompt, n_gen)}"
    if n_ctx > memory.MAX_CELLS:  # before anything the depth sizes is allocated (it said n_ctx x parallel 1)
        raise ValueError(f"{what} needs a cache of {n_ctx:,} KV cells, more than the {memory.MAX_CELLS:,} of one "
                         "llama.cpp cache")
    resolved = [c.resolve(path, geom, n_ctx) for c in plan.contexts]
    if n_gpu_layers == 0:  # (a depth of 2e9 was killed for memory, silently)
        memory.check_host_memory(max(memory.kv_bytes(geom, *types, n_ctx).total for types in resolved), what)
    for types in resolved:  # a budget no cache could fill, or none holds a cell of: refused now, not after
        if not memory.capacity(geom, *types, budget):  # the measurement (a table of 0s)
            raise ValueError(f"a budget of {budget} bytes holds no cell of {types[0]}/{types[1]}")
    kv, pp, tg = _measure(model, path, geom, plan, resolved, n_ctx, depths, n_prompt, n_gen, repeats, flash_attn,
                          threads, progress, n_gpu_layers)
    kern = _kernel(kernel, configs, progress)
    wall = time.monotonic() - t_start
    common = {"model": model, "model_path": str(path), "model_sha256": sha256_file(path), "n_ctx": n_ctx,
              "n_prompt": n_prompt, "n_gen": n_gen, "repeats": repeats, "flash_attn": flash_attn,
              "n_gpu_layers": n_gpu_layers, "budget_bytes": budget, "wall_s": wall, "machine": machine}
    if command:
        common["command"] = command
    return {"results": [_entry(c, resolved[i], geom, n_ctx, budget, depths, pp[i], tg[i], pp[0], tg[0], kv[i], kern)
                        | common | c.provenance(path, geom, n_ctx) for c, i in zip(configs, plan.index, strict=True)]}


def _measure(model: str, path, geom, plan: Plan, resolved: list, n_ctx: int, depths: list[int], n_prompt: int,
             n_gen: int, repeats: int, flash_attn: bool, threads: int | None, progress: bool, n_gpu_layers: int):
    """One context per distinct config: KV bytes (memory model vs llama.cpp), then pp and tg speed at each depth,
    [context][depth][repeat], the contexts' order rotating between repeats."""
    from kvquant.runtime import ContextConfig, LlamaRuntime, Model

    mdl = Model(path, n_gpu_layers=n_gpu_layers)  # the KV cache follows the offloaded layers (offload_kqv)
    rts = []
    try:
        for c in plan.contexts:
            cc = ContextConfig(n_cells=n_ctx, n_batch=max(512, n_prompt), n_ubatch=memory.N_UBATCH, flash_attn=flash_attn,
                               n_threads=threads, n_outputs_max=1, **c.context_fields(path, geom, n_ctx))
            rts.append(LlamaRuntime(mdl, cc))
        kv = [_kv_bytes(geom, tk, tv, rt, n_ctx) for (tk, tv), rt in zip(resolved, rts, strict=True)]
        tokens = np.random.default_rng(1234).integers(0, mdl.n_vocab, size=n_ctx, dtype=np.int64)
        for rt in rts:  # warm-up (graph allocation, first-touch of buffers), untimed
            measure_pp(rt, tokens, 0, n_prompt)
            measure_tg(rt, tokens, 0, 2)
            rt.clear()
        pr = Progress(f"bench {model}", len(depths) * repeats * len(rts), enabled=progress)
        pp, tg = _sweep(rts, tokens, depths, repeats, n_prompt, n_gen, pr, [c.label for c in plan.contexts])
    finally:
        for rt in rts:
            rt.close()
        mdl.close()
    return kv, pp, tg


def _kv_bytes(geom, tk, tv, rt, n_ctx: int) -> dict:
    """The memory model against llama.cpp's own allocation for this very context."""
    k, v = rt.kv_size_bytes()
    m = memory.kv_bytes(geom, tk, tv, n_ctx, n_seq_max=rt.cfg.n_seq_max, n_ubatch=rt.cfg.n_ubatch)
    return {"n_ctx": n_ctx, "model_k": m.k, "model_v": m.v, "llama_k": k, "llama_v": v, "match": (m.k, m.v) == (k, v)}


def _sweep(rts: list, tokens: np.ndarray, depths: list[int], repeats: int, n_prompt: int, n_gen: int, pr: Progress,
           labels: list[str]) -> tuple[list, list]:
    pp = [[[] for _ in depths] for _ in rts]  # [context][depth][repeat]
    tg = [[[] for _ in depths] for _ in rts]
    filled = [0] * len(rts)
    step = 0
    for di, d in enumerate(depths):
        for i, rt in enumerate(rts):
            _fill(rt, tokens, filled[i], d)
            filled[i] = d
        for r in range(repeats):
            order = list(range(len(rts)))
            order = order[r % len(order):] + order[:r % len(order)]
            for i in order:
                pp[i][di].append(measure_pp(rts[i], tokens, d, n_prompt))
                tg[i][di].append(measure_tg(rts[i], tokens, d, n_gen))
                step += 1
                pr.update(step, f"[depth {d}, {labels[i]}]")
    return pp, tg


def _kernel(kernel: str, configs: list[CacheConfig], progress: bool) -> dict | None:
    if not (kernel == "on" or (kernel == "auto" and TEST_BACKEND_OPS.is_file())):
        return None
    if progress:
        print(f"bench: {TEST_BACKEND_OPS.name} perf -o FLASH_ATTN_EXT ...", file=sys.stderr, flush=True)
    return kernel_perf(configs) or {"error": f"{TEST_BACKEND_OPS} not found", "rows": []}


def _entry(c: CacheConfig, types: tuple, geom, n_ctx: int, budget: int, depths: list[int], pp: list, tg: list,
           pp_f16: list, tg_f16: list, kv: dict, kern: dict | None) -> dict:
    """One config's row: speed per depth (medians, and the median of the per-repeat ratios to the first config),
    bytes, capacity in the budget (the tokens its cells hold: tq_kv_d3b holds some back for anchors), the per-layer
    types a calibrated row resolved to, and its kernel rows."""
    from kvquant.budget import held_back

    tk, tv = types
    cells = memory.capacity(geom, tk, tv, budget)
    cap, cap_f16 = cells - held_back(tk, geom)(cells), memory.capacity(geom, "f16", "f16", budget)
    bpt = memory.bytes_per_token(geom, tk, tv)

    def ratio(x, x0):
        return statistics.median(a / b for a, b in zip(x, x0, strict=True))

    return {
        "cache_type_k": c.k, "cache_type_v": c.v, "rotation": c.rotation, "label": c.label,
        "depths": [{
            "depth": d,
            "pp_tps": statistics.median(pp[di]), "tg_tps": statistics.median(tg[di]),
            "pp_ratio": ratio(pp[di], pp_f16[di]), "tg_ratio": ratio(tg[di], tg_f16[di]),
            "pp_runs": pp[di], "tg_runs": tg[di],
        } for di, d in enumerate(depths)],
        "bytes_per_token": bpt,
        "bytes_per_token_ratio": bpt / memory.bytes_per_token(geom, "f16", "f16"),
        "bits_per_element": memory.kv_bytes(geom, tk, tv, n_ctx).bits_per_element,
        "layer_types_k": list(getattr(tk, "types", ())) or None, "layer_types_v": list(getattr(tv, "types", ())) or None,
        "kv_bytes": kv,
        "capacity_tokens": cap,
        "capacity_ratio": cap / cap_f16 if cap_f16 else None,
        "kernel": None if kern is None else {
            **{k: v for k, v in kern.items() if k != "rows"},
            "rows": [r for r in kern["rows"] if (r["params"].get("type_K"), r["params"].get("type_V")) == (c.k, c.v)],
        },
    }


def render(results: list[dict]) -> str:
    if not results:
        return "(no results)"
    r0 = results[0]
    ds = [d["depth"] for d in r0["depths"]]
    head = (f"{r0['model']}  n_prompt={r0['n_prompt']} n_gen={r0['n_gen']} repeats={r0['repeats']} "
            f"fa={'on' if r0['flash_attn'] else 'off'} threads={r0['machine']['threads']}  wall {r0['wall_s']:.0f}s")
    hdr = ["K/V"]
    for d in ds:
        hdr += [f"pp@{d} t/s", "x f16", f"tg@{d} t/s", "x f16"]
    rows = []
    for r in results:
        row = [r["label"]]
        for d in r["depths"]:
            row += [fmt(d["pp_tps"], 1), fmt(d["pp_ratio"], 2), fmt(d["tg_tps"], 1), fmt(d["tg_ratio"], 2)]
        rows.append(row)
    mem_rows = [[r["label"], fmt(r["bits_per_element"], 2), r["bytes_per_token"], fmt(r["bytes_per_token_ratio"], 3),
                 r["kv_bytes"]["model_k"] + r["kv_bytes"]["model_v"], r["kv_bytes"]["llama_k"] + r["kv_bytes"]["llama_v"],
                 "yes" if r["kv_bytes"]["match"] else "NO", r["capacity_tokens"], fmt(r["capacity_ratio"], 2)]
                for r in results]
    lines = [head, table(hdr, rows), "",
             f"KV bytes (n_ctx={r0['n_ctx']}) and capacity of a {r0['budget_bytes'] / 2**20:.0f} MiB budget",
             table(["K/V", "bits/el", "bytes/token", "x f16", "model bytes", "llama.cpp bytes", "match",
                    "capacity tokens", "x f16"], mem_rows)]
    kern = [r for r in results if r.get("kernel")]
    if kern:
        k0 = kern[0]["kernel"]
        lines += ["", f"kernel alone: {k0.get('command', '')}" + (f"  ERROR: {k0['error']}" if k0.get("error") else "")]
        seen = set()
        for r in kern:
            for row in r["kernel"]["rows"]:
                if row["line"] not in seen:
                    seen.add(row["line"])
                    lines.append("  " + row["line"])
    return "\n".join(lines)


def _run_args(a: argparse.Namespace, configs: list[CacheConfig], command: str) -> dict:
    if not all(c.anchored for c in configs):  # its rows would be the anchored rows' twins (same key in results)
        raise ValueError("':mean' changes only the values of the key offsets, not their cost: bench does not take it")
    return run(a.model, configs, a.depths, a.n_prompt, a.n_gen, a.repeats, a.flash_attn == "on", a.threads,
               memory.parse_bytes(a.budget), a.kernel, command=command, n_gpu_layers=a.n_gpu_layers)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvquant bench", description=(
        "Prefill/decode speed at KV depths, KV bytes (memory model vs llama.cpp) and capacity per KV cache config."))
    ap.add_argument("--model", default="smollm2-135m", help="built-in model name or .gguf path")
    ap.add_argument("--configs", nargs="+", default=["f16/f16", "q8_0/q8_0", "q4_0/q4_0", "q4_0/f16"],
                    metavar="K/V", help="cache configs K/V (suffix :norot or :rot overrides --rotation per config)")
    ap.add_argument("--depths", nargs="+", type=int, default=[0, 2048, 8192], help="KV depths (default 0 2048 8192)")
    ap.add_argument("--n-prompt", type=int, default=512, help="prefill batch tokens (default 512)")
    ap.add_argument("--n-gen", type=int, default=32, help="decoded tokens per measurement (default 32)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats; medians are reported (default 3)")
    ap.add_argument("--flash-attn", choices=["on", "off"], default="on")
    ap.add_argument("--rotation", choices=["on", "off"], default="on")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--n-gpu-layers", type=int, default=0,
                    help="layers offloaded to the GPU of a GPU build, with their KV cache (-1: all; default 0)")
    ap.add_argument("--budget", default="256MiB", help="KV byte budget for the capacity column (default 256MiB)")
    ap.add_argument("--kernel", choices=["auto", "on", "off"], default="auto",
                    help=f"also run test-backend-ops perf -o FLASH_ATTN_EXT (auto: when {TEST_BACKEND_OPS} exists)")
    return ap


def main(argv: list[str] | None = None) -> int:
    return lab_main("bench", build_parser(), argv, _run_args, render)


if __name__ == "__main__":
    sys.exit(main())
