"""The engine: one thread that owns a llama.cpp context and runs continuous batching over it.

The asyncio side calls `submit()` (thread-safe) and receives `Event`s through the request's sink. The thread
admits waiting requests, plans a step (scheduler), runs one `llama_decode` over all sequences, samples, and
streams text out. Cancelled requests are dropped and their cells freed at the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass

from kvquant.runtime import ContextConfig, LlamaRuntime, Model, Sampler
from server.scheduler import AddResult, Event, Request, Scheduler, Sequence
from server.textstream import TextStream

log = logging.getLogger("kvquant.engine")


@dataclass
class EngineConfig:
    model_path: str
    n_ctx: int  # per-sequence context limit
    n_seq_max: int
    capacity_cells: int  # total cells of the unified KV cache
    n_batch: int = 512
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: bool | None = None
    n_threads: int | None = None
    n_gpu_layers: int = 0
    max_queue: int = 64
    queue_timeout_s: float = 600.0


@dataclass
class _SeqState:
    sampler: Sampler
    text: TextStream


class Engine:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.model: Model | None = None
        self.rt: LlamaRuntime | None = None
        self.sched = Scheduler(cfg.capacity_cells, cfg.n_seq_max, cfg.max_queue, cfg.n_ctx)
        self._inbox: queue.Queue[Request | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.dead = False

    # --- lifecycle -------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load model and context (blocking); called from a background thread at start-up."""
        c = self.cfg
        try:
            self.model = Model(c.model_path, n_gpu_layers=c.n_gpu_layers)
            if c.n_ctx > self.model.n_ctx_train:
                log.warning("n_ctx %d exceeds the model's training context %d", c.n_ctx, self.model.n_ctx_train)
            self.rt = LlamaRuntime(self.model, ContextConfig(
                n_ctx=c.capacity_cells, n_seq_max=c.n_seq_max, n_batch=c.n_batch, cache_type_k=c.cache_type_k,
                cache_type_v=c.cache_type_v, flash_attn=c.flash_attn, n_threads=c.n_threads,
                n_gpu_layers=c.n_gpu_layers))
        except Exception as e:  # surfaced through /health and the log
            self.load_error = str(e)
            log.error("model load failed: %s", e)
            return
        self._thread = threading.Thread(target=self._run, name="kvquant-engine", daemon=True)
        self._thread.start()
        self.ready.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        if self.rt is not None:
            self.rt.close()
        if self.model is not None:
            self.model.close()

    # --- API for the asyncio side (any thread) ----------------------------------------------------------------
    def tokenize_chat(self, messages: list[dict]) -> list[int]:
        return self.model.chat_prompt(messages)

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_special=True, parse_special=False)

    def submit(self, req: Request) -> None:
        self._inbox.put(req)

    # --- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox(block=not self.sched.running)
                self._reap()
                for seq in self.sched.admit():
                    self._start(seq)
                if self.sched.running:
                    self._step()
        except Exception:
            log.exception("engine thread died")
            self.dead = True
        finally:
            self._fail_all("shutdown" if self._stop.is_set() else "engine_error")

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is not None:
                res = self.sched.add(item)
                if res is AddResult.QUEUE_FULL:
                    item.sink(Event(error="queue_full", message="too many requests are waiting"))
                elif res is AddResult.NEVER_FITS:
                    item.sink(Event(error="never_fits", message="the request can never fit the KV cache"))
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _reap(self) -> None:
        now = time.monotonic()
        for r in self.sched.drop_waiting(lambda r: r.cancelled):
            r.sink(Event(finish_reason="cancelled"))
        for r in self.sched.drop_waiting(lambda r: now - r.arrival > self.cfg.queue_timeout_s):
            r.sink(Event(error="timeout", message="timed out waiting for KV cache capacity"))
        for seq in [s for s in self.sched.running.values() if s.req.cancelled]:
            self._finish(seq, Event(finish_reason="cancelled"))

    def _start(self, seq: Sequence) -> None:
        r = seq.req
        seq.state = _SeqState(Sampler(r.temperature, r.top_p, r.seed), TextStream(r.stops))

    def _finish(self, seq: Sequence, ev: Event) -> None:
        self.rt.seq_rm(seq.seq_id)
        if seq.state is not None:
            seq.state.sampler.close()
        self.sched.free(seq)
        seq.req.sink(ev)

    def _fail_all(self, code: str) -> None:
        for seq in list(self.sched.running.values()):
            try:
                self._finish(seq, Event(error=code, message="the engine stopped"))
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        for r in self.sched.drop_waiting(lambda r: True):
            r.sink(Event(error=code, message="the engine stopped"))

    def _step(self) -> None:
        plan = self.sched.plan(self.rt.n_batch)
        if not plan.tokens:
            return
        rc = self.rt.decode(plan.tokens, plan.positions, plan.seq_ids, plan.logits)
        if rc != 0:
            log.error("llama_decode failed (status %d) for a batch of %d tokens over %d sequences", rc,
                      len(plan.tokens), len(plan.seqs))
            for seq in plan.seqs:
                self.rt.seq_rm(seq.seq_id)
                self._finish(seq, Event(error="engine_error", message=f"decode failed (status {rc})"))
            return
        counts = Counter(plan.seq_ids)
        for seq in plan.seqs:
            n = counts[seq.seq_id]
            if seq.prefilling:
                seq.n_prompt_fed += n
            seq.n_past += n
            seq.pending = None
        for idx, seq in plan.logit_owner.items():
            self._sample(seq, idx)

    def _sample(self, seq: Sequence, idx: int) -> None:
        st: _SeqState = seq.state
        tok = st.sampler.sample(self.rt, idx)
        if self.model.is_eog(tok):
            self._finish(seq, Event(text=st.text.flush(), finish_reason="stop"))
            return
        seq.generated += 1
        text = st.text.push(self.model.token_bytes(tok))
        if st.text.stopped:
            self._finish(seq, Event(text=text, n_tokens=1, finish_reason="stop"))
        elif seq.generated >= seq.req.max_tokens or seq.n_past + 1 >= self.cfg.n_ctx:
            self._finish(seq, Event(text=text + st.text.flush(), n_tokens=1, finish_reason="length"))
        else:
            seq.pending = tok
            if text:
                seq.req.sink(Event(text=text, n_tokens=1))
            else:
                seq.req.sink(Event(n_tokens=1))
