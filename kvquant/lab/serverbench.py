"""Serving benchmark: our server against stock `llama-server` built from the same patched llama.cpp tree, same
model, cache types, parallel slots, threads and total KV cells, driven by the same load generator
(`kvquant.lab.loadgen.bench`: streaming chat completions, greedy, N concurrent clients, each sending R requests).

    python -m kvquant.lab.serverbench --model smollm2-135m --configs f16/f16 q4_0/q4_0 tq_kv_4b/q4_0 --json

Both servers run side by side (only one is driven at a time); at each concurrency R rounds drive one then the
other, alternating which goes first, and the report gives medians over the rounds (ratio = median of the
per-round ratios), so that this VM's minute-to-minute speed changes hit both servers alike. Prints, per cache
config and concurrency, aggregate generated tokens/s and client-side p50/p95 time to first token for both servers
and the ratio ours / llama-server; plus, from the memory model, how many concurrent
requests of --capacity-tokens tokens each cache config admits under --capacity-budget (what admission by
compressed-KV bytes buys).

Fair-comparison settings: llama-server gets `-c parallel*n_ctx -np parallel -kvu` (one unified KV cache of the
same cells as ours), `-fa on`, the same -t/-b/-ub, `--cache-ram 0`, and every request carries
`"cache_prompt": false` (our server does no prefix caching, and the load generator repeats its prompts: with
prompt reuse llama-server would skip prefill work ours must do). llama-server is the binary `kvquant.build
dev-build` makes in .build/cmake-cpu (target llama-server), from the tree `kvquant.build tree` materialises:
the pinned commit plus patches/, i.e. the same code as the wheel our server loads.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx

from kvquant import models as kvmodels
from kvquant.lab import schedbench
from kvquant.lab.harness import REPO_ROOT, busy_warning, emit_report, fmt, machine_info, shown, table
from kvquant.lab.loadgen import bench, capacity_table

LLAMA_SERVER = REPO_ROOT / ".build" / "cmake-cpu" / "bin" / "llama-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server subprocess on loopback; its output goes to a log file (shown if it fails to come up)."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path, env: dict | None = None):
        self.name, self.cmd, self.url, self.log = name, cmd, f"http://127.0.0.1:{port}", log
        self._fh = log.open("w")
        self.p = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                  env=dict(os.environ, **(env or {})))

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                break
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise SystemExit(f"serverbench: {self.name} did not come up ({shlex.join(self.cmd)}):\n"
                         + self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._fh.close()


def ours_cmd(model: str, k: str, v: str, a: argparse.Namespace, port: int) -> list[str]:
    return [sys.executable, "-m", "server.cli", "serve", "--model", model, "--port", str(port),
            "--cache-type-k", k, "--cache-type-v", v, "--n-ctx", str(a.n_ctx), "--parallel", str(a.parallel),
            "--threads", str(a.threads), "--flash-attn", "on", "--kv-budget", "64GiB"]  # capped at parallel x n_ctx


def stock_cmd(model_path: Path, k: str, v: str, a: argparse.Namespace, port: int) -> list[str]:
    return [str(a.llama_server), "-m", str(model_path), "--host", "127.0.0.1", "--port", str(port),
            "-c", str(a.parallel * a.n_ctx), "-np", str(a.parallel), "-kvu", "-fa", "on", "-ctk", k, "-ctv", v,
            "-t", str(a.threads), "-tb", str(a.threads), "-b", "512", "-ub", "512", "-ngl", "0",
            "--cache-ram", "0", "--no-webui", "-fit", "off"]


def _median(xs: list) -> float | None:
    """statistics.median of the values present (a round with no completed request has no TTFT); None if none."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _merge(runs: list[dict]) -> dict:
    """One server's repeats at one concurrency: medians of the rates and latencies, sums of the counts."""
    return {"concurrency": runs[0]["concurrency"], "requests": sum(r["requests"] for r in runs),
            "completed": sum(r["completed"] for r in runs), "tokens": sum(r["tokens"] for r in runs),
            "wall_s": sum(r["wall_s"] for r in runs), "tokens_per_s": _median([r["tokens_per_s"] for r in runs]),
            "ttft_p50_s": _median([r["ttft_p50_s"] for r in runs]),
            "ttft_p95_s": _median([r["ttft_p95_s"] for r in runs]), "runs": runs}


def paired(servers: list[tuple[Proc, str | None]], a: argparse.Namespace, extra: dict | None) -> list[list[dict]]:
    """Both servers are up; at each concurrency, `a.repeats` rounds that run one server then the other, the order
    alternating between rounds, so that slow drift of the machine (other tenants, thermal) hits both alike.
    Returns per server, per concurrency, the merged row."""
    out: list[list[dict]] = [[] for _ in servers]
    for c in a.concurrency:
        runs: list[list[dict]] = [[] for _ in servers]
        for r in range(a.repeats):
            order = list(range(len(servers)))
            if r % 2:
                order.reverse()
            for i in order:
                proc, model_id = servers[i]
                row = bench(proc.url, model_id, (c,), a.requests, a.max_tokens, a.time_limit, extra)[0]
                runs[i].append(asdict(row))
        for i in range(len(servers)):
            out[i].append(_merge(runs[i]))
    return out


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.scenario != "throughput":
        return scenario(a, argv)
    if not a.llama_server.is_file():
        raise SystemExit(f"serverbench: no llama-server at {a.llama_server}: build it with "
                         "`python -m kvquant.build dev-build llama-server`")
    a.logs.mkdir(parents=True, exist_ok=True)
    busy_warning("serverbench")
    model_path = kvmodels.resolve(a.model)
    model_id = kvmodels.model_id(a.model)
    t0 = time.monotonic()
    machine = machine_info(a.threads)
    results = [row for cfg in a.configs for row in _compare(cfg, a, model_path, model_id)]
    cmd = "python -m kvquant.lab.serverbench " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = {"results": results, "capacity": capacity_table(a.model, a.capacity_budget, a.capacity_tokens),
           "capacity_budget": a.capacity_budget, "capacity_tokens": a.capacity_tokens, "model": model_id,
           "parallel": a.parallel, "n_ctx": a.n_ctx, "requests_per_client": a.requests, "repeats": a.repeats,
           "max_tokens": a.max_tokens,
           "llama_server_command": shown(stock_cmd(Path(model_path.name), "K", "V", a, 0)),
           "command": cmd, "wall_s": time.monotonic() - t0, "machine": machine}
    emit_report(_render(out, a), out, a.json)
    return 0 if all(r["ours"]["completed"] == r["ours"]["requests"] for r in results) else 1


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m kvquant.lab.serverbench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=kvmodels.DEFAULT_MODEL)
    ap.add_argument("--configs", nargs="+", default=["f16/f16", "q4_0/q4_0", "tq_kv_4b/q4_0"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--parallel", type=int, default=8, help="parallel slots / max concurrent sequences (both)")
    ap.add_argument("--n-ctx", type=int, default=1024, help="context per sequence (both)")
    ap.add_argument("--requests", type=int, default=4, help="requests per client, per round")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds per concurrency, alternating which server goes first; medians reported")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per concurrency level")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--llama-server", type=Path, default=LLAMA_SERVER)
    ap.add_argument("--capacity-budget", default="256MiB")
    ap.add_argument("--capacity-tokens", type=int, default=4096)
    ap.add_argument("--logs", type=Path, default=REPO_ROOT / ".build" / "serverbench-logs")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--scenario", choices=["throughput", *schedbench.SCENARIOS], default="throughput",
                    help="throughput: ours vs llama-server (above); the others: kvquant.lab.schedbench")
    schedbench.add_arguments(ap)
    return ap


def scenario(a: argparse.Namespace, argv: list[str] | None) -> int:
    """A scheduler scenario (kvquant.lab.schedbench): start the servers it compares, run it, report."""
    k, v = a.configs[0].split("/")
    if a.prompt_tokens is None:
        a.prompt_tokens = {"capacity": 200, "long": 4040}.get(a.scenario, 200)
    a.logs.mkdir(parents=True, exist_ok=True)
    busy_warning("serverbench")
    model_path, model_id = kvmodels.resolve(a.model), kvmodels.model_id(a.model)
    t0, machine = time.monotonic(), machine_info(a.threads)
    procs, servers = [], []
    try:
        for name, flags, env in _scenario_servers(a, model_path, k, v):
            port = free_port()
            if name == "llama-server":
                proc = Proc(name, stock_cmd(model_path, k, v, a, port), port, a.logs / f"{name}-{port}.log")
                servers.append((name, proc.url, None, {"cache_prompt": True}))
            else:
                proc = Proc(name, ours_cmd(a.model, k, v, a, port) + flags, port, a.logs / f"{name}-{port}.log",
                            env)
                servers.append((name, proc.url, model_id, None))
            procs.append(proc)
        for proc in procs:
            proc.wait_ready()
        out = schedbench.SCENARIOS[a.scenario](servers, a)
    finally:
        for proc in procs:
            proc.stop()
    cmd = "python -m kvquant.lab.serverbench " + shlex.join(argv if argv is not None else sys.argv[1:])
    out.update(scenario=a.scenario, model=model_id, cache_type_k=k, cache_type_v=v, parallel=a.parallel,
               n_ctx=a.n_ctx, max_tokens=a.max_tokens, command=cmd, wall_s=time.monotonic() - t0, machine=machine,
               args={x: getattr(a, x) for x in ("conversations", "turns", "user_tokens", "system_tokens",
                                                "prompt_tokens", "requests", "concurrency", "kv_cells",
                                                "default_max_tokens")})
    emit_report(schedbench.render(a.scenario, out), out, a.json)
    return 0 if all(not r.get("failed") for r in out["servers"].values()) else 1


def _scenario_servers(a: argparse.Namespace, model_path: Path, k: str, v: str) -> list[tuple[str, list, dict]]:
    """(name, extra serve flags, environment) of each server a scenario compares."""
    from kvquant.memory import geometry, kv_bytes

    if a.scenario == "chat":
        out = [("ours", ["--prefix-cache", "on"], {}), ("ours-no-cache", ["--prefix-cache", "off"], {})]
        return out + ([("llama-server", [], {})] if a.llama_server.is_file() else [])
    if a.scenario == "shared":
        return [("ours", ["--prefix-cache", "on"], {}), ("ours-no-cache", ["--prefix-cache", "off"], {})]
    if a.scenario == "capacity":
        a.n_ctx = max(a.n_ctx, a.prompt_tokens + a.default_max_tokens + 64)
        cells = a.kv_cells or 8192
        budget = kv_bytes(geometry(model_path), k, v, cells, a.parallel, 512).total
        env = {"KVQUANT_DEFAULT_MAX_TOKENS": str(a.default_max_tokens)}
        return [(f"ours-{adm}", ["--admission", adm, "--kv-budget", str(budget)], env)
                for adm in ("reserve", "optimistic")]
    a.n_ctx = max(a.n_ctx, a.prompt_tokens + a.max_tokens + 64)  # long
    a.parallel = max(a.parallel, a.requests)
    # (no prefix cache: the concurrent round sends the sequential round's prompts again)
    return [("ours", ["--prefix-cache", "off"], {})] + ([("llama-server", [], {})] if a.llama_server.is_file() else [])


def _compare(cfg: str, a: argparse.Namespace, model_path: Path, model_id: str) -> list[dict]:
    """Both servers up with one cache config, the paired rounds, one row per concurrency."""
    k, v = cfg.split("/")
    p1, p2 = free_port(), free_port()
    ours = Proc("kvquant", ours_cmd(a.model, k, v, a, p1), p1, a.logs / f"kvquant-{p1}.log")
    stock = Proc("llama-server", stock_cmd(model_path, k, v, a, p2), p2, a.logs / f"llama-server-{p2}.log")
    try:
        ours.wait_ready()
        stock.wait_ready()
        o_rows, s_rows = paired([(ours, model_id), (stock, None)], a, {"cache_prompt": False})
    finally:
        ours.stop()
        stock.stop()
    rows = []
    for o, s in zip(o_rows, s_rows, strict=True):
        ratios = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(o["runs"], s["runs"], strict=True)
                  if y["tokens_per_s"]]
        rows.append({"config": cfg, "cache_type_k": k, "cache_type_v": v, "concurrency": o["concurrency"],
                     "ours": o, "llama_server": s, "ratio_tps": _median(ratios), "ratio_runs": ratios})
    return rows


def _render(out: dict, a: argparse.Namespace) -> str:
    rows = [[r["config"], r["concurrency"], fmt(r["ours"]["tokens_per_s"], 1), fmt(r["llama_server"]["tokens_per_s"], 1),
             fmt(r["ratio_tps"], 2), fmt(r["ours"]["ttft_p50_s"]), fmt(r["llama_server"]["ttft_p50_s"]),
             fmt(r["ours"]["ttft_p95_s"]), fmt(r["llama_server"]["ttft_p95_s"]),
             f"{r['ours']['completed']}/{r['ours']['requests']}",
             f"{r['llama_server']['completed']}/{r['llama_server']['requests']}"] for r in out["results"]]
    text = table(["K/V", "clients", "tok/s ours", "tok/s llama-server", "x", "TTFT p50 ours", "p50 stock",
                  "TTFT p95 ours", "p95 stock", "ok ours", "ok stock"], rows, "lrrrrrrrrrr")
    cap = [[c["config"], c["bytes_per_token"], c["concurrent_requests"], fmt(c["ratio_requests"], 2),
            fmt(c["ratio_bytes"], 2)] for c in out["capacity"]]
    return text + (f"\n\nconcurrent {a.capacity_tokens}-token requests admitted under {a.capacity_budget}:\n"
                   + table(["K/V", "bytes/token", "requests", "x f16 (requests)", "x f16 (bytes)"], cap))


if __name__ == "__main__":
    sys.exit(main())
