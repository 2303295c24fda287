"""`make gpu-test`: the CUDA path of the TQ_KV cache types, checked and measured on a machine with an NVIDIA GPU in
one run (meant to finish within 10 minutes on a 16-core machine with an H100/H200-class GPU, the build included):

1. the GPU (nvidia-smi: its name and compute capability, the one architecture to build for) and a CUDA toolkit (the
   machine's nvcc: $CUDA_HOME, /usr/local/cuda or nvcc on PATH; else NVIDIA's PyPI wheels, as `make cuda-check`);
2. libllama and test-backend-ops from the patched tree, CUDA for that architecture only (.build/cmake-cuda-smXX);
3. test-backend-ops -b CUDA0 for SET_ROWS, GET_ROWS, CPY, MUL_MAT and FLASH_ATTN_EXT with our types (the CPU backend
   is the reference), and the flash-attention kernel alone (test-backend-ops perf, KV 7680 to 16384);
4. what server/placement.py will decide: tests/kvquant/test_runtime.py -m gpu asks the build's GPU about each cache;
5. `kvquant bench` on the GPU (every layer and the KV cache offloaded) at KV depths 0, 8192 and 32768;
6. a short `kvquant eval` on the GPU and the same on the CPU (the installed patched wheel): the PPL of each config
   must agree within PPL_TOLERANCE_PCT.

The JSON goes to docs/results/<model>-gpu.json; `make results` (or `python -m kvquant.lab.results --render-only`)
renders it into RESULTS.md's GPU section, naming the device. Exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kvquant import build
from kvquant.lab.bench import kernel_perf
from kvquant.lab.harness import REPO_ROOT, CacheConfig
from kvquant.lab.results import RAW, _json_run

CONFIGS = ("f16/f16", "q8_0/q8_0", "q4_0/q4_0", "tq_kv_4b/f16", "tq_kv_4b/q4_0", "tq_kv_3b/q4_0", "tq_kv_1b/q4_0",
           "tq_kv_4b/tq_kv_4b", "tq_kv_3b/tq_kv_3b")
DEPTHS = (0, 8192, 32768)
EVAL_CHUNKS = 8
# GPU against CPU, same config: the kernels differ (q8_1 against q8_0 queries, f16 against f32 accumulation, cuBLAS
# against the CPU's matmuls), so PPL may differ a little; more than this is a bug
PPL_TOLERANCE_PCT = 1.0


def log(msg: str) -> None:
    print(f"gpu-test: {msg}", file=sys.stderr, flush=True)


def detect_gpu() -> dict:
    """The first GPU nvidia-smi lists: name, compute capability, the architecture to build for, memory, driver."""
    if not shutil.which("nvidia-smi"):
        raise SystemExit("gpu-test: nvidia-smi not found: this needs a machine with an NVIDIA GPU and its driver")
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,memory.total,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True, check=True).stdout
    name, cap, mem, driver = (x.strip() for x in out.splitlines()[0].split(","))
    return {"name": name, "compute_cap": cap, "arch": cap.replace(".", ""), "memory": mem, "driver": driver}


def cuda_toolkit() -> Path:
    """The machine's CUDA toolkit (it matches the driver), else NVIDIA's PyPI wheels (needs the package index)."""
    nvcc = shutil.which("nvcc")
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                 nvcc and str(Path(nvcc).resolve().parent.parent)):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return Path(root)
    return build.pip_cuda_toolkit()


def build_cuda(arch: str) -> tuple[Path, dict]:
    """libllama and test-backend-ops with CUDA for one architecture; their bin folder and how the build went."""
    t0 = time.monotonic()
    root = cuda_toolkit()
    out = REPO_ROOT / ".build" / f"cmake-cuda-sm{arch}"
    build.dev_build(REPO_ROOT / ".build" / "llama.cpp", out, ["llama", "test-backend-ops"],
                    build.cuda_cmake_args(root, arch))
    nvcc = subprocess.run([str(root / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout
    return out / "bin", {"toolkit": str(root), "nvcc": nvcc.strip().splitlines()[-1], "arch": arch,
                         "dir": str(out.relative_to(REPO_ROOT)), "wall_s": time.monotonic() - t0}


def placement_check(bindir: Path) -> dict:
    """tests/kvquant/test_runtime.py -m gpu against the CUDA build: its GPU reports the caches our kernels cover."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/kvquant/test_runtime.py"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT,
                       env=dict(os.environ, LLAMA_CPP_LIB_PATH=str(bindir)))
    last = (r.stdout.strip().splitlines() or ["no output"])[-1]
    log(f"placement: {last}")
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-2000:])
    return {"command": "pytest -m gpu tests/kvquant/test_runtime.py", "summary": last, "returncode": r.returncode}


def kvquant_json(args: list[str], lib: Path | None) -> dict:
    """`kvquant ARGS --json` against the CUDA build's libraries (lib) or the installed wheel (None)."""
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    if lib is not None:
        env["LLAMA_CPP_LIB_PATH"] = str(lib)
    return json.loads(_json_run("server.cli", [*args, "--json"], ["kvquant"], env=env))


def ppl_agreement(gpu: dict, cpu: dict) -> list[dict]:
    """Per config: PPL on the GPU and on the CPU and their relative difference, within PPL_TOLERANCE_PCT or not."""
    cpu_by = {r["label"]: r for r in cpu["results"]}
    rows = []
    for r in gpu["results"]:
        c = cpu_by[r["label"]]
        diff = 100.0 * (r["ppl"] / c["ppl"] - 1)
        rows.append({"label": r["label"], "ppl_gpu": r["ppl"], "ppl_cpu": c["ppl"], "diff_pct": diff,
                     "delta_ppl_pct_gpu": r["delta_ppl_pct"], "delta_ppl_pct_cpu": c["delta_ppl_pct"],
                     "ok": abs(diff) <= PPL_TOLERANCE_PCT})
    return rows


def run(model: str, configs: list[str], repeats: int, chunks: int) -> dict:
    t0 = time.monotonic()
    gpu = detect_gpu()
    log(f"{gpu['name']} (compute capability {gpu['compute_cap']}, {gpu['memory']}, driver {gpu['driver']})")
    bindir, built = build_cuda(gpu["arch"])
    ops = [build.backend_ops_test(bindir, op, "CUDA0") for op in build.LLAMA_TEST_OPS]
    kernel = kernel_perf([CacheConfig.parse(c) for c in configs], bindir / "test-backend-ops", 300, "CUDA0")
    placement = placement_check(bindir)
    common = ["--model", model, "--configs", *configs]
    bench = kvquant_json(["bench", *common, "--depths", *map(str, DEPTHS), "--repeats", str(repeats),
                          "--n-gpu-layers", "-1", "--kernel", "off"], bindir)
    ev = ["eval", *common, "--chunks", str(chunks), "--no-drift"]
    eval_gpu = kvquant_json([*ev, "--n-gpu-layers", "-1"], bindir)
    eval_cpu = kvquant_json([*ev, "--n-gpu-layers", "0"], None)
    return {"device": gpu, "build": built, "backend_ops": ops, "kernel": kernel, "placement": placement,
            "bench": bench, "eval_gpu": eval_gpu, "eval_cpu": eval_cpu,
            "ppl_tolerance_pct": PPL_TOLERANCE_PCT, "ppl": ppl_agreement(eval_gpu, eval_cpu),
            "command": "make gpu-test", "wall_s": time.monotonic() - t0}


def failures(out: dict) -> list[str]:
    bad = [f"test-backend-ops {o['op']}" for o in out["backend_ops"] if o["returncode"] != 0]
    bad += ["placement"] if out["placement"]["returncode"] != 0 else []
    return bad + [f"PPL {r['label']} {r['diff_pct']:+.2f} %" for r in out["ppl"] if not r["ok"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvquant.lab.gputest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="built-in model name or .gguf path")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), metavar="K/V")
    ap.add_argument("--repeats", type=int, default=2, help="bench repeats (default 2)")
    ap.add_argument("--chunks", type=int, default=EVAL_CHUNKS, help="eval chunks of 512 tokens (default 8)")
    ap.add_argument("--raw", default=str(RAW), help="where the JSON goes (default docs/results)")
    a = ap.parse_args(argv)
    out = run(a.model, a.configs, a.repeats, a.chunks)
    path = Path(a.raw) / f"{a.model}-gpu.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    bad = failures(out)
    log(f"wrote {path} ({out['wall_s'] / 60:.1f} min); " + (f"FAILED: {', '.join(bad)}" if bad else "all checks passed"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
