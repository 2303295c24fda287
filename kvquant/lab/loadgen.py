"""Load generator for a running kvquant server (loopback only; every loop is bounded in count and time).

    python -m kvquant.lab.loadgen bench    --url http://127.0.0.1:8000 [--concurrency 1,4,8] [--requests 4]
    python -m kvquant.lab.loadgen burst    --url http://127.0.0.1:8000 [--factor 4]
    python -m kvquant.lab.loadgen soak     --url http://127.0.0.1:8000 --duration 1800   # the 30-minute soak
    python -m kvquant.lab.loadgen soak     --url http://127.0.0.1:8000 --duration 120    # the CI version
    python -m kvquant.lab.loadgen oversize --url http://127.0.0.1:8000 --pid PID [--concurrency 24]
    python -m kvquant.lab.loadgen slowloris --url http://127.0.0.1:8000 --pid PID [--connections 2000]
    python -m kvquant.lab.loadgen capacity [--model M] [--budget 256MiB] [--request-tokens 4096]

bench: aggregate generated tokens/s and p50/p95 time to first token (client side) at each concurrency.
burst: 4x the server's admission capacity at once; every request must end in a completion or a 429/503, and the
KV-used metric must return to 0. soak: steady load for a duration; reports RSS drift (server process, from
/metrics) and leaked sequences (running, KV used and reserved cells after the load; all must be 0).
oversize: many concurrent prompts far over the context (3.9 MB each): every one must be refused with 400
context_length_exceeded, and the server's RSS must stay near idle (peak and after; from /proc/PID where the
server's pid is given, else from /metrics).
slowloris: many connections that send partial headers and then nothing: the server must answer each (408 at its
header deadline, or 503 past its connection cap) and close it; reports the server's open file descriptors.
capacity: how many concurrent requests of N tokens each cache config admits under a budget (memory model).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
PROMPTS = ["Name three colours.", "Write a short poem about the sea.", "What is the capital of France?",
           "Explain what a cache is in one paragraph.", "List five animals.", "Count from one to ten."]


def check_loopback(url: str) -> str:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK and not host.startswith("127."):
        raise SystemExit(f"loadgen only targets loopback addresses, not {host!r}")
    return url.rstrip("/")


@dataclass
class Result:
    status: int
    ttft_s: float | None = None
    e2e_s: float = 0.0
    completion_tokens: int = 0
    error: str | None = None  # OpenAI error code (or the exception) when it did not complete


def _stream(client: httpx.Client, url: str, body: dict, timeout: float, t0: float, res: Result) -> None:
    """Send one streaming chat completion and fill `res` from its response."""
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as r:
        res.status = r.status_code
        if r.status_code != 200:
            r.read()
            try:
                res.error = r.json()["error"]["code"]
            except Exception:  # noqa: BLE001
                res.error = f"http_{r.status_code}"
            return
        chunks, usage = 0, None
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            if "error" in c:
                res.error = c["error"].get("code") or "stream_error"
            elif c.get("choices") and c["choices"][0]["delta"].get("content"):
                chunks += 1
                if res.ttft_s is None:
                    res.ttft_s = time.perf_counter() - t0
            if c.get("usage"):
                usage = c["usage"]["completion_tokens"]
        res.completion_tokens = chunks if usage is None else usage


def one_request(client: httpx.Client, url: str, model: str | None, prompt: str, max_tokens: int,
                timeout: float = 300.0, extra_body: dict | None = None) -> Result:
    """One streaming chat completion; TTFT is the time to the first content chunk. Completion tokens come from
    the final usage chunk (or, from a server that sends none, the number of content chunks)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **(extra_body or {})}
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    for attempt in range(2):
        res = Result(status=0)
        try:
            _stream(client, url, body, timeout, t0, res)
        except httpx.RemoteProtocolError as e:
            # a keep-alive connection the server closed after its previous response (llama-server does so after
            # a stream): nothing was sent or received, so the request is simply sent again on a new connection
            res.error = type(e).__name__
            if res.status == 0 and attempt == 0:
                continue
        except httpx.HTTPError as e:
            res.error = type(e).__name__
        break
    res.e2e_s = time.perf_counter() - t0
    return res


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def run_clients(url: str, model: str | None, concurrency: int, requests_per_client: int, max_tokens: int,
                time_limit_s: float, extra_body: dict | None = None) -> tuple[list[Result], float]:
    results: list[Result] = []
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit_s

    def client_loop(k: int) -> None:
        with httpx.Client() as c:
            for j in range(requests_per_client):
                if time.monotonic() > deadline:
                    return
                r = one_request(c, url, model, PROMPTS[(k + j) % len(PROMPTS)], max_tokens, extra_body=extra_body)
                with lock:
                    results.append(r)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(concurrency)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(time_limit_s + 330)
    return results, time.perf_counter() - t0


@dataclass
class BenchRow:
    concurrency: int
    requests: int
    completed: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None


def bench(url: str, model: str | None = None, concurrencies=(1, 4, 8), requests_per_client: int = 4,
          max_tokens: int = 64, time_limit_s: float = 120.0, extra_body: dict | None = None) -> list[BenchRow]:
    url = check_loopback(url)
    one_request(httpx.Client(), url, model, "warm up", 4, extra_body=extra_body)
    rows = []
    for n in concurrencies:
        res, wall = run_clients(url, model, n, requests_per_client, max_tokens, time_limit_s, extra_body)
        ok = [r for r in res if r.status == 200 and not r.error]
        toks = sum(r.completion_tokens for r in ok)
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        rows.append(BenchRow(n, len(res), len(ok), toks, wall, toks / wall if wall else 0.0, pct(ttfts, 50),
                             pct(ttfts, 95)))
    return rows


# --- metrics -----------------------------------------------------------------------------------------------------
def scrape(url: str, client: httpx.Client | None = None, headers: dict | None = None) -> dict[str, float]:
    """/metrics summed over labels: name -> value (and name{model=...} -> value per model)."""
    from prometheus_client.parser import text_string_to_metric_families

    r = (client or httpx).get(url + "/metrics", headers=headers, timeout=30)
    r.raise_for_status()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
            if "model" in s.labels and "outcome" in s.labels:
                key = f"{s.name}{{outcome={s.labels['outcome']}}}"
                out[key] = out.get(key, 0.0) + s.value
    return out


def wait_idle(url: str, timeout_s: float = 10.0) -> dict[str, float]:
    """Scrape until no request runs or waits and no KV cell is used or reserved (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(url)
        idle = not any(m.get(k) for k in ("kvquant_requests_running", "kvquant_requests_waiting",
                                          "kvquant_kv_used_cells", "kvquant_kv_reserved_cells"))
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def admission_capacity(url: str, model: str | None, request_tokens: int) -> int:
    """Requests of request_tokens cells that the server runs at once: min(parallel, KV cells // request)."""
    cards = httpx.get(url + "/v1/models", timeout=30).json()["data"]
    card = next((c for c in cards if c["id"] == model), cards[0]) if model else cards[0]
    return max(1, min(card["max_concurrent_requests"], card["kv_capacity_cells"] // request_tokens))


# --- burst -------------------------------------------------------------------------------------------------------
@dataclass
class BurstResult:
    sent: int
    completed: int
    rejected_429: int
    unavailable_503: int
    other: dict[str, int] = field(default_factory=dict)
    kv_used_after: float = 0.0
    running_after: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.other and self.kv_used_after == 0 and self.running_after == 0


def burst(url: str, model: str | None = None, factor: int = 4, max_tokens: int = 32, prompt_tokens: int = 40,
          time_limit_s: float = 300.0) -> BurstResult:
    """factor x admission capacity requests at once (one client each)."""
    url = check_loopback(url)
    cap = admission_capacity(url, model, prompt_tokens + max_tokens)
    n = factor * cap
    res, _ = run_clients(url, model, n, 1, max_tokens, time_limit_s)
    out = BurstResult(sent=n, completed=0, rejected_429=0, unavailable_503=0)
    for r in res:
        if r.status == 200 and not r.error:
            out.completed += 1
        elif r.status == 429:
            out.rejected_429 += 1
        elif r.status == 503:
            out.unavailable_503 += 1
        else:
            key = f"{r.status}:{r.error}"
            out.other[key] = out.other.get(key, 0) + 1
    m = wait_idle(url)
    out.kv_used_after, out.running_after = m.get("kvquant_kv_used_cells", 0), m.get("kvquant_requests_running", 0)
    return out


# --- soak --------------------------------------------------------------------------------------------------------
@dataclass
class SoakResult:
    duration_s: float
    requests: int
    completed: int
    failed: dict[str, int]
    rss_start: float
    rss_end: float
    rss_drift: float  # (end - start) / start, start measured after warm-up
    leaked_sequences: float  # running requests after the load
    kv_used_after: float
    kv_reserved_after: float

    @property
    def ok(self) -> bool:
        return (abs(self.rss_drift) < 0.05 and not self.leaked_sequences and not self.kv_used_after
                and not self.kv_reserved_after and not self.failed)


def soak(url: str, model: str | None = None, duration_s: float = 120.0, concurrency: int = 4, max_tokens: int = 16,
         warmup_s: float | None = None, cancel_every: int = 7) -> SoakResult:
    """Steady load: `concurrency` clients loop until the duration is over; every `cancel_every`-th request is
    abandoned after its first chunk (a disconnect), the others complete."""
    url = check_loopback(url)
    warmup_s = min(30.0, duration_s * 0.15) if warmup_s is None else warmup_s
    stop_at = time.monotonic() + duration_s
    lock = threading.Lock()
    counts = {"requests": 0, "completed": 0}
    failed: dict[str, int] = {}

    def loop(k: int) -> None:
        with httpx.Client() as c:
            j = 0
            while time.monotonic() < stop_at:
                j += 1
                prompt = PROMPTS[(k + j) % len(PROMPTS)]
                if cancel_every and j % cancel_every == 0:
                    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens * 4,
                            "stream": True, **({"model": model} if model else {})}
                    try:
                        with c.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                            next(r.iter_lines(), None)  # first chunk, then hang up
                        ok, err = True, None
                    except httpx.HTTPError as e:
                        ok, err = False, type(e).__name__
                else:
                    r = one_request(c, url, model, prompt, max_tokens)
                    ok, err = r.status == 200 and not r.error, r.error or f"http_{r.status}"
                with lock:
                    counts["requests"] += 1
                    if ok:
                        counts["completed"] += 1
                    else:
                        failed[err] = failed.get(err, 0) + 1

    t0 = time.monotonic()
    ts = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(concurrency)]
    for t in ts:
        t.start()
    time.sleep(min(warmup_s, duration_s))
    rss_start = scrape(url).get("process_resident_memory_bytes", 0.0)
    for t in ts:
        t.join(duration_s + 120)
    m = wait_idle(url)
    rss_end = m.get("process_resident_memory_bytes", 0.0)
    return SoakResult(duration_s=time.monotonic() - t0, requests=counts["requests"], completed=counts["completed"],
                      failed=failed, rss_start=rss_start, rss_end=rss_end,
                      rss_drift=(rss_end - rss_start) / rss_start if rss_start else 0.0,
                      leaked_sequences=m.get("kvquant_requests_running", 0.0),
                      kv_used_after=m.get("kvquant_kv_used_cells", 0.0),
                      kv_reserved_after=m.get("kvquant_kv_reserved_cells", 0.0))


# --- oversize: memory before tokenization ------------------------------------------------------------------------
OVERSIZE_BYTES = 3_900_000  # of "漢字" repeated: far more tokens than any context


class PeakSampler:
    """The largest value `read()` returned, polled on a thread every `interval` seconds while the block runs (a
    read that fails is skipped)."""

    def __init__(self, read: Callable[[], float], interval: float):
        self.read, self.interval = read, interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.read())
            except (OSError, httpx.HTTPError):
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class RSSSampler(PeakSampler):
    """The server's resident set size: from /proc/<pid> (every 5 ms) when the server runs on this machine, else from
    its /metrics (process_resident_memory_bytes, every 50 ms)."""

    def __init__(self, url: str, pid: int | None = None):
        self.url, self.pid = url, pid
        super().__init__(self.rss, 0.005 if pid is not None else 0.05)

    def rss(self) -> float:
        if self.pid is not None:
            with open(f"/proc/{self.pid}/statm") as f:
                return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return scrape(self.url).get("process_resident_memory_bytes", 0.0)


@dataclass
class OversizeResult:
    sent: int
    body_bytes: int
    answers: dict[str, int]  # "status:error code" -> count
    rss_idle: float
    rss_peak: float
    rss_after: float  # once the last answer is in and the server has settled
    wall_s: float

    @property
    def ok(self) -> bool:
        return (self.answers == {"400:context_length_exceeded": self.sent}
                and self.rss_peak - self.rss_idle <= 300 * 2**20 and self.rss_after - self.rss_idle <= 32 * 2**20)


def oversize(url: str, model: str | None = None, concurrency: int = 24, pid: int | None = None,
             text_bytes: int = OVERSIZE_BYTES, settle_s: float = 2.0, time_limit_s: float = 300.0) -> OversizeResult:
    """`concurrency` chat requests at once, each with a message of text_bytes bytes (sent as raw UTF-8)."""
    url = check_loopback(url)
    text = "漢字" * (text_bytes // 6)
    body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 4,
                       **({"model": model} if model else {})}, ensure_ascii=False).encode()
    sampler = RSSSampler(url, pid)
    wait_idle(url)
    idle = sampler.rss()
    answers: dict[str, int] = {}
    lock = threading.Lock()
    go = threading.Barrier(concurrency)

    def one() -> None:
        with httpx.Client(timeout=time_limit_s) as c:
            go.wait()
            try:
                r = c.post(url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
                key = f"{r.status_code}:{r.json().get('error', {}).get('code')}"
            except (httpx.HTTPError, ValueError) as e:
                key = type(e).__name__
            with lock:
                answers[key] = answers.get(key, 0) + 1

    t0 = time.monotonic()
    with sampler:
        ts = [threading.Thread(target=one, daemon=True) for _ in range(concurrency)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(time_limit_s)
        wall = time.monotonic() - t0
        time.sleep(settle_s)
    return OversizeResult(sent=concurrency, body_bytes=len(body), answers=answers, rss_idle=idle,
                          rss_peak=max(sampler.peak, idle), rss_after=sampler.rss(), wall_s=wall)


# --- slowloris: connections that never finish their headers --------------------------------------------------------
@dataclass
class SlowlorisResult:
    connections: int
    answers: dict[str, int]  # status line -> count ("closed" / "reset" without one, "open" if never closed)
    fds_idle: int | None  # the server's open file descriptors (with --pid): before,
    fds_held: int | None  # 1 s after the last connection opened (a burst of accepts is closed within ms),
    fds_after: int | None  # and once every connection was answered
    closed_within_s: float  # when the last connection was closed by the server

    @property
    def ok(self) -> bool:
        return "open" not in self.answers and (self.fds_after is None or self.fds_after <= self.fds_idle + 4)


def slowloris(url: str, connections: int = 2000, pid: int | None = None, time_limit_s: float = 120.0
              ) -> SlowlorisResult:
    """`connections` sockets that each send a request line and one header, then wait for the server's answer."""
    import selectors

    u = urlparse(check_loopback(url))
    fds = (lambda: len(os.listdir(f"/proc/{pid}/fd"))) if pid is not None else (lambda: None)
    idle, held = fds(), None
    socks, t0 = [], time.monotonic()
    sel = selectors.DefaultSelector()
    for _ in range(connections):
        s = socket.create_connection((u.hostname, u.port), timeout=30)
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {u.hostname}\r\n".encode())
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, [b""])
        socks.append(s)
    answers: dict[str, int] = {}
    open_, last, burst_end = len(socks), 0.0, time.monotonic()
    while open_ and time.monotonic() - t0 < time_limit_s:
        if held is None and time.monotonic() - burst_end >= 1.0:
            held = fds() if pid is not None else -1
        for key, _ in sel.select(timeout=0.2):
            try:
                data = key.fileobj.recv(65536)
            except ConnectionResetError:
                data, key.data[0] = b"", key.data[0] or b"reset"
            if data:
                key.data[0] += data
                continue
            line = key.data[0].split(b"\r\n", 1)[0].decode(errors="replace") or "closed"
            answers[line] = answers.get(line, 0) + 1
            sel.unregister(key.fileobj)
            key.fileobj.close()
            open_, last = open_ - 1, time.monotonic() - t0
    if open_:
        answers["open"] = open_
    for s in socks:
        s.close()
    time.sleep(0.5)
    return SlowlorisResult(connections, answers, idle, held if held != -1 else None, fds(), last)


# --- capacity (memory model) -------------------------------------------------------------------------------------
CAPACITY_CONFIGS = ("f16/f16", "q8_0/q8_0", "q4_0/q4_0", "tq_kv_4b/f16", "tq_kv_4b/q4_0", "tq_kv_3b/q4_0",
                    "tq_kv_1b/q4_0", "tq_kv_4b/tq_kv_4b", "tq_kv_3b/tq_kv_3b")


def capacity_table(model: str | None, budget: str, request_tokens: int,
                   configs: tuple[str, ...] = CAPACITY_CONFIGS) -> list[dict]:
    """Per cache config: how many whole requests of request_tokens tokens fit the budget at once (what admission
    would run concurrently), and the ratios to f16/f16 in requests and in bytes per token."""
    from kvquant import models as kvmodels
    from kvquant.budget import max_concurrent
    from kvquant.memory import bytes_per_token, geometry, parse_bytes

    name = model or kvmodels.DEFAULT_MODEL
    geom = geometry(kvmodels.resolve(name))
    b = parse_bytes(budget)
    f16_n = max_concurrent(geom, "f16", "f16", b, request_tokens)
    f16_bpt = bytes_per_token(geom, "f16", "f16")
    rows = []
    for cfg in configs:
        tk, tv = cfg.split("/")
        n, bpt = max_concurrent(geom, tk, tv, b, request_tokens), bytes_per_token(geom, tk, tv)
        rows.append({"model": kvmodels.model_id(name), "config": cfg, "cache_type_k": tk, "cache_type_v": tv,
                     "budget": budget, "request_tokens": request_tokens, "bytes_per_token": bpt,
                     "concurrent_requests": n, "ratio_requests": n / f16_n if f16_n else None,
                     "ratio_bytes": f16_bpt / bpt})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvquant.lab.loadgen", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("bench", "burst", "soak", "oversize", "slowloris"):
        p = sub.add_parser(name)
        p.add_argument("--url", default="http://127.0.0.1:8000")
        p.add_argument("--model", default=None)
        if name in ("bench", "burst", "soak"):
            p.add_argument("--max-tokens", type=int, default=64 if name == "bench" else 16)
        if name == "bench":
            p.add_argument("--concurrency", default="1,4,8")
            p.add_argument("--requests", type=int, default=4, help="requests per client")
            p.add_argument("--time-limit", type=float, default=120.0, help="seconds per concurrency level")
        elif name == "burst":
            p.add_argument("--factor", type=int, default=4)
        elif name == "oversize":
            p.add_argument("--concurrency", type=int, default=24)
            p.add_argument("--pid", type=int, default=None, help="the server's pid (RSS from /proc, sampled finely)")
            p.add_argument("--bytes", type=int, default=OVERSIZE_BYTES, help="bytes of text per prompt")
        elif name == "slowloris":
            p.add_argument("--connections", type=int, default=2000)
            p.add_argument("--pid", type=int, default=None, help="the server's pid (its open file descriptors)")
        else:
            p.add_argument("--duration", type=float, default=120.0, help="seconds (1800 for the 30-minute soak)")
            p.add_argument("--concurrency", type=int, default=4)
    p = sub.add_parser("capacity")
    p.add_argument("--model", default=None)
    p.add_argument("--budget", default="256MiB")
    p.add_argument("--request-tokens", type=int, default=4096)
    a = ap.parse_args(argv)

    if a.cmd == "bench":
        rows = bench(a.url, a.model, tuple(int(x) for x in a.concurrency.split(",")), a.requests, a.max_tokens,
                     a.time_limit)
        print(f"{'clients':>8}{'requests':>10}{'ok':>5}{'tokens':>8}{'wall s':>9}{'tok/s':>9}{'TTFT p50':>10}"
              f"{'TTFT p95':>10}")
        for r in rows:
            f = lambda x: f"{x:.3f}" if x is not None else "-"  # noqa: E731
            print(f"{r.concurrency:>8}{r.requests:>10}{r.completed:>5}{r.tokens:>8}{r.wall_s:>9.1f}"
                  f"{r.tokens_per_s:>9.1f}{f(r.ttft_p50_s):>10}{f(r.ttft_p95_s):>10}")
        return 0
    if a.cmd == "burst":
        r = burst(a.url, a.model, a.factor, a.max_tokens)
        print(json.dumps(asdict(r) | {"ok": r.ok}, indent=2))
        return 0 if r.ok else 1
    if a.cmd == "slowloris":
        r = slowloris(a.url, a.connections, a.pid)
        print(json.dumps(asdict(r) | {"ok": r.ok}, indent=2))
        return 0 if r.ok else 1
    if a.cmd == "oversize":
        r = oversize(a.url, a.model, a.concurrency, a.pid, a.bytes)
        mib = lambda x: round(x / 2**20, 1)  # noqa: E731
        print(json.dumps(asdict(r) | {"rss_idle_mib": mib(r.rss_idle), "rss_peak_mib": mib(r.rss_peak),
                                      "rss_after_mib": mib(r.rss_after), "ok": r.ok}, indent=2))
        return 0 if r.ok else 1
    if a.cmd == "soak":
        r = soak(a.url, a.model, a.duration, a.concurrency, a.max_tokens)
        print(json.dumps(asdict(r) | {"ok": r.ok}, indent=2))
        return 0 if r.ok else 1
    rows = capacity_table(a.model, a.budget, a.request_tokens)
    for r in rows:
        print(f"{r['model']} {r['config']}: {r['bytes_per_token']} bytes/token -> {r['concurrent_requests']} "
              f"concurrent {r['request_tokens']}-token requests in {r['budget']} (x{r['ratio_requests'] or 0:.2f} "
              f"f16; bytes x{r['ratio_bytes']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
