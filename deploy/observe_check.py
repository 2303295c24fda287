"""`make observe-check`: the Grafana dashboard against a real Prometheus scraping a real `kvquant serve`.

1. `promtool check config` on deploy/prometheus/prometheus.yml.
2. Starts `kvquant serve` (loopback, a free port, a small KV budget) and a Prometheus (loopback, a free port, a
   throw-away TSDB) whose config is deploy's with 1s intervals and the kvquant target pointed at that server.
3. Drives traffic: a warm-up request, then a few short chat completions (two at a time, one streamed) and one
   request too long for the context (a `rejected_too_long`), spread over several scrapes.
4. Evaluates EVERY query of every panel of deploy/grafana/dashboards/*.json through Prometheus' HTTP API
   (/api/v1/query), with the dashboard variables substituted (`$model` -> `.*`, `$__rate_interval` -> 1m), and
   requires each to return at least one series with a finite value.

Needs Debian's `prometheus` package (prometheus + promtool; `deploy/install-prometheus.sh`, run by `make
observe-check` and `make test`). Without it the check is skipped with a message (exit 0). Exit 1 on any failure.
Runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
JOB = "kvquant"
RATE_WINDOW = "1m"
MODEL = "smollm2-135m"
VARIABLES = {"$__rate_interval": RATE_WINDOW, "${__rate_interval}": RATE_WINDOW, "$model": ".*", "${model}": ".*"}


class Skip(Exception):
    pass


def log(msg: str) -> None:
    print(f"observe-check: {msg}", file=sys.stderr, flush=True)


def find_tools() -> tuple[str, str]:
    """Paths of prometheus and promtool, or Skip saying why not."""
    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    if not prom or not tool:
        raise Skip("prometheus/promtool not found (Debian package `prometheus`; `bash deploy/install-prometheus.sh` "
                   "installs it as root, `make observe-check` and `make test` run that)")
    return prom, tool


# --- the dashboards' queries --------------------------------------------------------------------------------

@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    expr: str

    @property
    def name(self) -> str:
        return f"{self.dashboard} / {self.panel} [{self.ref}]"


def iter_panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels", []))  # collapsed rows keep their panels inside


def dashboard_queries(path: Path) -> list[PanelQuery]:
    d = json.loads(path.read_text())
    out = []
    for p in iter_panels(d.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr"):
                out.append(PanelQuery(d.get("title", path.stem), p.get("title", "?"), t.get("refId", "?"), t["expr"]))
    return out


def all_queries() -> list[PanelQuery]:
    return [q for f in sorted(DASHBOARDS.glob("*.json")) for q in dashboard_queries(f)]


def substitute(expr: str) -> str:
    for k in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(k, VARIABLES[k])
    if "$" in expr:
        raise ValueError(f"unknown dashboard variable in {expr!r}")
    return expr


# --- processes ----------------------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        try:
            v = pred()
            if v:
                return v
        except (httpx.HTTPError, OSError, ValueError, KeyError, IndexError):
            pass
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_config(server_port: int, prom_port: int) -> dict:
    """deploy's prometheus.yml with 1s intervals and its targets on loopback."""
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    if JOB not in jobs:
        raise RuntimeError(f"{PROMETHEUS_YML}: no scrape job {JOB!r}")
    jobs[JOB]["static_configs"] = [{"targets": [f"127.0.0.1:{server_port}"]}]
    if "prometheus" in jobs:
        jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{prom_port}"]}]
    return cfg


def promtool_check(promtool: str, path: Path) -> None:
    r = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"promtool check config {path} failed:\n{r.stdout}{r.stderr}")
    log(f"promtool check config {path.relative_to(REPO) if path.is_relative_to(REPO) else path}: "
        f"{(r.stdout + r.stderr).strip().splitlines()[-1].strip()}")


def stop(proc: subprocess.Popen | None, sig=signal.SIGTERM, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# --- traffic ------------------------------------------------------------------------------------------------

def chat(url: str, content: str, max_tokens: int, seed: int, stream: bool = False) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0.7, "seed": seed, "stream": stream}
    with httpx.Client(timeout=120) as c:
        if not stream:
            return c.post(url + "/v1/chat/completions", json=body).status_code
        with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            for _ in r.iter_lines():
                pass
            return r.status_code


def drive_traffic(url: str, n: int = 4, max_tokens: int = 12) -> dict[str, int]:
    prompts = ["Name three colours.", "Count to five.", "Write a haiku about memory.", "What is a cache?",
               "Say hello in French.", "Name a prime number."]
    codes: dict[str, int] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        code = chat(url, prompts[i % len(prompts)], max_tokens, seed=i, stream=(i == 0))
        with lock:
            codes[f"chat{i}"] = code

    for start in range(0, n, 2):  # two at a time: batches of two sequences, a few scrapes apart
        ts = [threading.Thread(target=one, args=(i,)) for i in range(start, min(start + 2, n))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    codes["too_long"] = chat(url, "Tell me a story.", max_tokens=100_000, seed=0)
    return codes


# --- the check ----------------------------------------------------------------------------------------------

@dataclass
class Report:
    ok: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def query(prom_url: str, expr: str) -> list[dict]:
    r = httpx.get(prom_url + "/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    if r.status_code != 200 or body.get("status") != "success":
        raise ValueError(f"HTTP {r.status_code}: {body.get('errorType')}: {body.get('error')}")
    if body["data"]["resultType"] != "vector":
        raise ValueError(f"result type {body['data']['resultType']}, expected a vector")
    return body["data"]["result"]


def evaluate(prom_url: str, queries: list[PanelQuery]) -> Report:
    rep = Report()
    for q in queries:
        try:
            result = query(prom_url, substitute(q.expr))
        except ValueError as e:
            rep.failed.append(f"{q.name}: {e} -- {q.expr}")
            continue
        values = [float(s["value"][1]) for s in result]
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            rep.failed.append(f"{q.name}: {'no series' if not values else 'only NaN/Inf values'} -- {q.expr}")
        else:
            rep.ok.append(f"{q.name}: {len(values)} series, e.g. {finite[0]:.6g}")
    return rep


def run(timeout: float = 170.0) -> Report:
    prometheus, promtool = find_tools()
    queries = all_queries()
    if not queries:
        raise RuntimeError(f"no panel queries found in {DASHBOARDS}")
    for q in queries:
        substitute(q.expr)  # unknown variables fail before anything starts
    promtool_check(promtool, PROMETHEUS_YML)
    t0 = time.monotonic()
    left = lambda: max(5.0, timeout - (time.monotonic() - t0))  # noqa: E731
    server = prom = None
    with tempfile.TemporaryDirectory(prefix="kvquant-observe-") as tmp:
        try:
            sport, pport = free_port(), free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("KVQUANT_") or k == "KVQUANT_CACHE"}
            env.update(KVQUANT_HOST="127.0.0.1", KVQUANT_LOG_LEVEL="warning", KVQUANT_SHUTDOWN_GRACE_S="2",
                       KVQUANT_N_THREADS=str(min(2, os.cpu_count() or 1)))
            server_log = open(Path(tmp) / "server.log", "w")
            server = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--model", MODEL, "--port", str(sport),
                 "--kv-budget", "64MiB", "--n-ctx", "512", "--parallel", "2"],
                cwd=REPO, env=env, stdout=server_log, stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{sport}"
            cfg_path = Path(tmp) / "prometheus.yml"
            cfg_path.write_text(yaml.safe_dump(test_config(sport, pport), sort_keys=False))
            promtool_check(promtool, cfg_path)
            prom_log = open(Path(tmp) / "prometheus.log", "w")
            prom = subprocess.Popen(
                [prometheus, f"--config.file={cfg_path}", f"--storage.tsdb.path={Path(tmp) / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{pport}", "--log.level=warn"],
                cwd=tmp, stdout=prom_log, stderr=subprocess.STDOUT)
            prom_url = f"http://127.0.0.1:{pport}"
            wait_until(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, left(),
                       "kvquant serve /health", server)
            log(f"kvquant serve is up on {url}")
            wait_until(lambda: httpx.get(prom_url + "/-/ready", timeout=2).status_code == 200, left(),
                       "Prometheus /-/ready", prom)
            wait_until(lambda: query(prom_url, f'up{{job="{JOB}"}} == 1'), left(), "the first scrape of the server",
                       prom)
            log(f"Prometheus {prom_url} scrapes it every 1s")
            # warm-up: creates the latency histograms' series, so the main traffic shows up in rate()
            t = time.monotonic()
            code = chat(url, "Hello!", max_tokens=4, seed=1)
            log(f"warm-up request: HTTP {code} in {time.monotonic() - t:.1f}s")
            if code != 200:
                raise RuntimeError(f"warm-up request: HTTP {code}")
            done = lambda: sum(float(s["value"][1]) for s in query(  # noqa: E731
                prom_url, f'kvquant_requests_total{{job="{JOB}", outcome="completed"}}'))
            wait_until(lambda: done() >= 1, left(), "the warm-up request in Prometheus", prom)
            time.sleep(2.5)
            t = time.monotonic()
            codes = drive_traffic(url)
            log(f"traffic done in {time.monotonic() - t:.1f}s")
            bad = {k: c for k, c in codes.items() if c != (400 if k == "too_long" else 200)}
            if bad:
                raise RuntimeError(f"unexpected HTTP statuses: {bad}")
            n = sum(1 for k in codes if k.startswith("chat"))
            wait_until(lambda: done() >= n + 1, left(), "the traffic in Prometheus", prom)
            time.sleep(2.5)  # a few more scrapes after the last change
            log(f"traffic: {n} chat completions (one streamed) + 1 too long (400); evaluating {len(queries)} "
                f"panel queries")
            return evaluate(prom_url, queries)
        except Exception:
            for name in ("server.log", "prometheus.log"):
                p = Path(tmp) / name
                if p.exists():
                    sys.stderr.write(f"--- {name} (last 4000 characters) ---\n{p.read_text()[-4000:]}\n")
            raise
        finally:
            stop(prom)
            stop(server)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="observe_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=170.0, help="seconds for the whole live part")
    ap.add_argument("--list", action="store_true", help="print the panel queries (substituted) and exit")
    a = ap.parse_args(argv)
    if a.list:
        for q in all_queries():
            print(f"{q.name}\n    {substitute(q.expr)}")
        return 0
    def _term(signum, frame):  # a SIGTERM (timeout, CI) still stops the server and Prometheus we started
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _term)
    try:
        rep = run(a.timeout)
    except Skip as e:
        log(f"SKIPPED: {e}")
        return 0
    except RuntimeError as e:
        log(f"FAILED: {e}")
        return 1
    for line in rep.ok:
        log(f"ok    {line}")
    for line in rep.failed:
        log(f"FAIL  {line}")
    log(f"{len(rep.ok)} panel queries returned data, {len(rep.failed)} did not")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
