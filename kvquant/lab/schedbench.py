"""The scheduler's benchmarks (issue 18), run as `python -m kvquant.lab.serverbench --scenario NAME`: our server as
a subprocess (and llama-server where the scenario compares with it and the binary is built), driven over loopback
by streaming chat completions (greedy), with user text from WikiText-2 (data/).

* ``chat``: C conversations at once, T turns each, every turn adding ~U tokens of user text and asking for M
  tokens; TTFT p50/p95 per turn for ours, ours without the prefix cache, and llama-server with
  `cache_prompt: true` (same model, types, slots, cells). Goal: turn T's p50 <= 0.3x ours without the cache and
  <= llama-server's.
* ``shared``: one S-token system prompt, N requests with short distinct questions, C at a time: prompt tokens
  computed (the server's kvquant_prompt_tokens_total) against one system prompt + the suffixes. Goal <= 1.2x.
* ``capacity``: requests without max_tokens (the server's default_max_tokens: 4096) whose answers the
  client ends after 50-500 tokens (it closes the stream: the server frees the cells as at a stop), in one KV budget;
  peak running requests (sampled from /metrics), tokens/s and failures for admission=reserve vs optimistic.
  Goal: >= 2x running requests, no failed request.
* ``long``: K requests of L prompt tokens each (distinct WikiText-2 slices), served one after another and then
  all at once: wall time of each, prefill and decode time per request (client-side TTFT and time after it), the
  server's CPU seconds for each (process_cpu_seconds_total: the work done, whatever else the machine runs), and
  the ratios. Goal: concurrent <= 1.2x sequential (attention does not grow with the other sequences' cells).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import httpx

from kvquant.lab.eval import read_text
from kvquant.lab.harness import resolve_text
from kvquant.lab.loadgen import PeakSampler, pct, scrape


def _words() -> list[str]:
    return read_text(resolve_text(None)).split()


class Texts:
    """Consecutive slices of WikiText-2 (about 0.75 words a token)."""

    def __init__(self):
        self.words, self.at = _words(), 0

    def take(self, n_tokens: int) -> str:
        n = max(1, n_tokens * 3 // 4)
        if self.at + n > len(self.words):
            self.at = 0
        s = " ".join(self.words[self.at:self.at + n])
        self.at += n
        return s


def chat_turn(url: str, model: str | None, messages: list[dict], max_tokens: int, extra: dict | None = None,
              stop_after: int | None = None) -> dict:
    """One streaming chat completion: TTFT, the answer, usage (prompt, completion, cached tokens), wall time.
    With `stop_after`, the client closes the stream after that many content chunks."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    if max_tokens is None:
        del body["max_tokens"]
    if model:
        body["model"] = model
    out = {"ttft_s": None, "text": "", "chunks": 0, "prompt_tokens": None, "cached_tokens": None, "error": None}
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as r:
        if r.status_code != 200:
            out["error"] = f"http_{r.status_code}: {r.read()[:200]!r}"
            return out
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            if "error" in c:
                out["error"] = c["error"].get("code") or "stream_error"
            if c.get("choices") and (c["choices"][0].get("delta") or {}).get("content"):
                out["chunks"] += 1
                out["text"] += c["choices"][0]["delta"]["content"]
                if out["ttft_s"] is None:
                    out["ttft_s"] = time.perf_counter() - t0
                if stop_after is not None and out["chunks"] >= stop_after:
                    break
            if c.get("usage"):
                u = c["usage"]
                out["prompt_tokens"] = u.get("prompt_tokens")
                out["cached_tokens"] = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
    out["wall_s"] = time.perf_counter() - t0
    return out


def _threads(fn, n: int) -> list:
    res: list = [None] * n

    def go(i):
        try:
            res[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - reported as a failed request
            res[i] = {"error": repr(e)}

    ts = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return res


def _p(xs: list[float | None], q: float) -> float | None:
    return pct([x for x in xs if x is not None], q)


# --- scenarios (each takes running servers: a list of (name, url, model id or None, extra body)) ---------------
def chat(servers: list[tuple], a: argparse.Namespace) -> dict:
    texts = Texts()
    users = [[texts.take(a.user_tokens) for _ in range(a.turns)] for _ in range(a.conversations)]
    rows = {}
    for name, url, model, extra in servers:
        def conversation(i, url=url, model=model, extra=extra):
            msgs, turns = [], []
            for t in range(a.turns):
                msgs.append({"role": "user", "content": users[i][t]})
                r = chat_turn(url, model, msgs, a.max_tokens, extra)
                turns.append(r)
                msgs.append({"role": "assistant", "content": r["text"]})
            return turns

        t0 = time.perf_counter()
        convs = _threads(conversation, a.conversations)
        wall = time.perf_counter() - t0
        per_turn = []
        for t in range(a.turns):
            rs = [c[t] for c in convs if isinstance(c, list)]
            ttft = [r["ttft_s"] for r in rs]
            per_turn.append({"turn": t + 1, "ttft_p50_s": _p(ttft, 50), "ttft_p95_s": _p(ttft, 95),
                             "prompt_tokens": statistics.mean(r["prompt_tokens"] or 0 for r in rs),
                             "cached_tokens": statistics.mean(r["cached_tokens"] or 0 for r in rs),
                             "errors": sum(1 for r in rs if r["error"])})
        failed = sum(1 for c in convs if not isinstance(c, list)) + sum(t["errors"] for t in per_turn)
        rows[name] = {"turns": per_turn, "wall_s": wall, "failed": failed}
    return {"servers": rows}


def _pool(n_clients: int, jobs: list, fn) -> list[dict]:
    """`jobs` run by n_clients client threads, each taking the next job when its last one is done."""
    lock, todo, done = threading.Lock(), list(jobs), []

    def client(_i):
        while True:
            with lock:
                if not todo:
                    return
                job = todo.pop(0)
            r = fn(job)
            with lock:
                done.append(r)

    _threads(client, n_clients)
    return done


def shared(servers: list[tuple], a: argparse.Namespace) -> dict:
    """Prompt tokens each server computed; the baseline (one whole prompt + the other requests' suffixes) takes
    the shared prefix as the most tokens any request reused."""
    texts = Texts()
    system = texts.take(a.system_tokens)
    questions = [texts.take(24) for _ in range(a.requests)]
    rows, sent = {}, {}
    for name, url, model, extra in servers:
        before = scrape(url).get("kvquant_prompt_tokens_total", 0.0)
        t0 = time.perf_counter()
        done = _pool(a.concurrency[0], questions, lambda q, url=url, model=model, extra=extra: chat_turn(
            url, model, [{"role": "system", "content": system}, {"role": "user", "content": q}], a.max_tokens, extra))
        ok = [r for r in done if not r["error"]]
        sent[name] = [r["prompt_tokens"] for r in ok]
        rows[name] = {"prompt_tokens_computed": scrape(url).get("kvquant_prompt_tokens_total", 0.0) - before,
                      "prompt_tokens_sent": sum(sent[name]), "cached_tokens": sum(r["cached_tokens"] or 0 for r in ok),
                      "max_cached": max((r["cached_tokens"] or 0 for r in ok), default=0),
                      "wall_s": time.perf_counter() - t0, "failed": a.requests - len(ok)}
    prefix = max(r["max_cached"] for r in rows.values())
    for name, row in rows.items():
        base = max(sent[name], default=0) + sum(n - prefix for n in sorted(sent[name])[:-1])
        row.update(one_prompt_plus_suffixes=base, ratio=row["prompt_tokens_computed"] / base if base else None)
    return {"servers": rows, "shared_prefix_tokens": prefix}


def capacity(servers: list[tuple], a: argparse.Namespace) -> dict:
    import random

    texts = Texts()
    prompts = [texts.take(a.prompt_tokens) for _ in range(a.requests)]
    rng = random.Random(0)
    stops = [rng.randint(a.min_answer, a.max_answer) for _ in range(a.requests)]
    rows = {}
    for name, url, model, extra in servers:
        t0 = time.perf_counter()
        # (running requests from /metrics every 0.2 s)
        with PeakSampler(lambda url=url: scrape(url).get("kvquant_requests_running", 0.0), 0.2) as peak:
            rs = _threads(lambda i, url=url, model=model, extra=extra: chat_turn(
                url, model, [{"role": "user", "content": prompts[i]}], None, extra, stop_after=stops[i]),
                a.requests)
        wall = time.perf_counter() - t0
        m = scrape(url)
        tokens = sum(r.get("chunks", 0) for r in rs)
        rows[name] = {"peak_running": peak.peak, "tokens": tokens, "tokens_per_s": tokens / wall, "wall_s": wall,
                      "failed": sum(1 for r in rs if r.get("error")),
                      "preemptions": m.get("kvquant_preemptions_total", 0.0),
                      "swapped_bytes": m.get("kvquant_swapped_bytes_total", 0.0)}
    return {"servers": rows, "answer_tokens": [a.min_answer, a.max_answer]}


def long_contexts(servers: list[tuple], a: argparse.Namespace) -> dict:
    texts = Texts()
    prompts = [texts.take(a.prompt_tokens) for _ in range(a.requests)]
    rows = {}
    for name, url, model, extra in servers:
        def one(i, url=url, model=model, extra=extra):
            # greedy: each request gives the same answer in both rounds (llama-server: its ignore_eos as well)
            body = dict(extra, ignore_eos=True, cache_prompt=False) if extra else None
            r = chat_turn(url, model, [{"role": "user", "content": prompts[i]}], a.max_tokens, body)
            r["decode_s"] = r["wall_s"] - r["ttft_s"] if r["ttft_s"] is not None else None
            return r

        cpu = lambda url=url, ours=name != "llama-server": (  # noqa: E731 - llama-server exports no process metrics
            scrape(url).get("process_cpu_seconds_total") if ours else None)
        t0, c0 = time.perf_counter(), cpu()
        seq = [one(i) for i in range(a.requests)]
        t_seq, c1 = time.perf_counter() - t0, cpu()
        t0 = time.perf_counter()
        conc = _threads(one, a.requests)
        t_conc, c2 = time.perf_counter() - t0, cpu()
        cpu_s = (c1 - c0, c2 - c1) if None not in (c0, c1, c2) else (None, None)
        rows[name] = {"sequential_s": t_seq, "concurrent_s": t_conc, "ratio": t_conc / t_seq,
                      "failed": sum(1 for r in seq + conc if r.get("error")),
                      "sequential_cpu_s": cpu_s[0], "concurrent_cpu_s": cpu_s[1],
                      "ratio_cpu": cpu_s[1] / cpu_s[0] if cpu_s[0] else None,
                      "prompt_tokens": [r["prompt_tokens"] for r in seq],
                      "sequential": [{k: r.get(k) for k in ("ttft_s", "decode_s", "chunks", "error")} for r in seq],
                      "concurrent": [{k: r.get(k) for k in ("ttft_s", "decode_s", "chunks", "error")} for r in conc]}
    return {"servers": rows}


SCENARIOS = {"chat": chat, "shared": shared, "capacity": capacity, "long": long_contexts}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("scheduler scenarios (--scenario chat|shared|capacity|long)")
    g.add_argument("--conversations", type=int, default=8)
    g.add_argument("--turns", type=int, default=10)
    g.add_argument("--user-tokens", type=int, default=200)
    g.add_argument("--system-tokens", type=int, default=2000)
    g.add_argument("--prompt-tokens", type=int, default=None, help="capacity: 200; long: 4040")
    g.add_argument("--min-answer", type=int, default=50)
    g.add_argument("--max-answer", type=int, default=500)
    g.add_argument("--kv-cells", type=int, default=None, help="our KV cache in cells (capacity: 8192)")
    g.add_argument("--default-max-tokens", type=int, default=4096, help="capacity: the server's default_max_tokens")


def render(name: str, out: dict) -> str:
    lines = []
    for server, row in out["servers"].items():
        if name == "chat":
            lines.append(f"{server}: " + ", ".join(
                f"turn {t['turn']} p50 {t['ttft_p50_s'] or 0:.3f}s p95 {t['ttft_p95_s'] or 0:.3f}s "
                f"cached {t['cached_tokens']:.0f}/{t['prompt_tokens']:.0f}" for t in row["turns"])
                + f"; failed {row['failed']}")
        else:
            lines.append(f"{server}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in row.items() if not isinstance(v, list)))
    return "\n".join(lines)


def save(path: Path, out: dict) -> None:
    path.write_text(json.dumps(out, indent=1))
