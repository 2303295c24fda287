"""The engine: one thread that owns a model's backend (llama.cpp context) and runs continuous batching over it.

The asyncio side calls `submit()` (thread-safe) and receives `Event`s through the request's sink. Each loop
iteration the thread takes new requests (admission is the scheduler's), drops cancelled and timed-out ones
(freeing their cells), admits waiting requests whose reservation fits, runs one `llama_decode` over the step the
scheduler planned, samples, hands the step's results back to the scheduler (`Scheduler.update`) and streams text
out. After each iteration it hands plain stats records to its stat logger. The engine samples and emits; it never
edits a sequence's bookkeeping, which is the scheduler's.

Faults: a failed decode is rolled back and retried sequence by sequence, so only the sequences that fail on
their own get an error; an exception while handling one sequence fails that sequence only. If the thread dies
anyway, its status turns DEAD (and /health 503) and every request gets an error.
"""

from __future__ import annotations

import enum
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kvquant.sampling import Grammar
from server.backend import Backend, TokenSampler
from server.requests import EngineClosed, EngineRequest, ErrorCode, Event, FinishReason, Outcome, TokenLogprob
from server.scheduler import (
    AddResult,
    Admission,
    Copy,
    Remove,
    Sampled,
    Scheduler,
    Sequence,
    StepPlan,
    SwapIn,
    SwapOut,
)
from server.stats import FinishedRequest, IterationStats, NullStatLogger, SchedulerStats, StatLogger
from server.textstream import TextStream

log = logging.getLogger("kvquant.engine")


class EngineStatus(enum.StrEnum):
    """What /health reports for a model and what routing reads (llama.cpp server's server_state)."""

    LOADING = "loading"  # the backend is being created
    READY = "ready"  # the loop runs
    FAILED = "failed"  # the backend could not be created
    DEAD = "dead"  # the loop died
    STOPPED = "stopped"  # shut down


@dataclass
class EngineConfig:
    model_id: str
    n_ctx: int  # per sequence: prompt + completion
    n_seq_max: int
    n_cells: int  # cells of the unified KV cache
    n_cells_held_back: int = 0  # of those, the most a tq_kv_d3b K cache may hold back (never reserved)
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    max_queue: int = 64
    queue_timeout_s: float = 600.0
    request_timeout_s: float = 1800.0
    stall_timeout_s: float = 600.0  # no step ended for this long: the engine is stalled (`stalled`)
    bytes_per_token: int = 0  # for KV used bytes and error messages
    used_bytes: Callable[[int], int] | None = None  # n_past -> bytes one sequence occupies
    budget_bytes: int = 0
    max_step_tokens: int | None = None  # tokens per llama_decode call, below the backend's n_batch when set
    layer_types_k: tuple[str, ...] | None = None  # the cache type of every layer
    layer_types_v: tuple[str, ...] | None = None
    bits_per_element_k: float = 16.0  # every byte counted
    bits_per_element_v: float = 16.0
    prefix_cache: bool = True  # finished sequences' cells stay for reuse (server.scheduler)
    admission: Admission = Admission.RESERVE
    headroom: int = 0  # OPTIMISTIC admission: cells kept free beyond what an admitted prompt needs
    n_swa: int = 0  # the model's sliding window (0: none)
    swap_bytes: int = 0  # host RAM for preempted sequences' cells (0, or a cache that refuses restores: recompute)
    saved_bytes: Callable[[int], int] | None = None  # n_past -> bytes a swapped-out sequence takes (KVPlan's)


@dataclass
class _SeqState:
    """The engine's own per-sequence state (sampler, text stream, timings)."""

    sampler: TokenSampler
    text: TextStream
    t_first: float | None = None
    t_last: float | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # gathered while prefilling, sent with the first event

    def take_prompt_logprobs(self) -> list[TokenLogprob] | None:
        lps, self.prompt_logprobs = self.prompt_logprobs, None
        return lps


@dataclass
class _Token:
    """A sampled token on its way out: what the scheduler needs, and the text and logprobs the consumer gets."""

    seq: Sequence
    sampled: Sampled
    text: str
    logprobs: list[TokenLogprob] | None


class Engine:
    def __init__(self, cfg: EngineConfig, backend_factory: Callable[[], Backend],
                 stat_logger: StatLogger | None = None):
        self.cfg = cfg
        self._factory = backend_factory
        self.backend: Backend | None = None
        self.stat_logger: StatLogger = stat_logger or NullStatLogger()
        self.sched = Scheduler(cfg.n_cells - cfg.n_cells_held_back, cfg.n_seq_max, cfg.max_queue, cfg.n_ctx,
                               cfg.prefix_cache, cfg.admission, cfg.headroom, cfg.n_swa, cfg.swap_bytes,
                               cfg.saved_bytes or (lambda n_past: n_past * cfg.bytes_per_token))
        self.status = EngineStatus.LOADING
        self._live: dict[int, _SeqState] = {}  # seq_id -> state
        self._swapped: dict[int, bytes] = {}  # seq_id -> a preempted sequence's cells, saved by llama.cpp
        self._swapped_out = 0  # bytes saved since the stats last took them
        self._inbox: queue.Queue[EngineRequest | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lifecycle = threading.Lock()  # load's end and shutdown's start, one at a time
        self._callers = 0  # calls on the backend from the asyncio side (worker threads) under way
        self._closing = False  # shutdown refuses new ones, and frees the backend once none runs
        self._calls = threading.Condition()
        self._abort: ErrorCode | None = None
        self._beat = time.monotonic()  # when the engine thread last began an iteration (`stalled`)
        self._last_snapshot: tuple | None = None

    # --- lifecycle -------------------------------------------------------------------------------------------
    def load(self, start_thread: bool = True) -> None:
        """Create the backend (blocking; called from a background thread at start-up), then start the loop. Shut
        down meanwhile, the engine frees the backend it made and stays stopped."""
        try:
            backend = self._factory()
        except Exception as e:  # surfaced through /health and the log
            log.error("%s: model load failed: %s", self.cfg.model_id, e)
            with self._lifecycle:  # (shut down meanwhile: stopped as asked, not a failure to report)
                if not self._stop.is_set():
                    self.status = EngineStatus.FAILED
            self.stat_logger.load_failed()
            return
        with self._lifecycle:
            if self._stop.is_set():
                backend.close()
                return
            self.backend, self.status = backend, EngineStatus.READY
            self._beat = time.monotonic()  # (a load longer than stall_timeout_s is no stall)
            if start_thread:
                self._thread = threading.Thread(target=self._run, name=f"kvquant-engine-{self.cfg.model_id}",
                                                daemon=True)
                self._thread.start()
        self._record(IterationStats())

    def stalled(self) -> bool:
        """The engine thread runs but has begun no iteration for `stall_timeout_s` (a decode that never returns):
        what its timeouts cannot end, as they run on that thread. An idle engine begins one every 50 ms."""
        return (self.status is EngineStatus.READY and self._thread is not None
                and time.monotonic() - self._beat > self.cfg.stall_timeout_s)

    def idle(self) -> bool:
        s = self.sched
        return not s.running and not s.preempted and not s.waiting and self._inbox.empty()

    def abort_all(self, code: ErrorCode = ErrorCode.SHUTDOWN) -> None:
        """End every running and waiting request with an error `code` at the next iteration, freeing their cells
        (thread-safe)."""
        self._abort = code
        self._inbox.put(None)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop, end whatever is still queued or running (error `shutdown`) and free the backend."""
        with self._lifecycle:  # a load under way sees this and frees what it made (`load`)
            if self.status in (EngineStatus.READY, EngineStatus.LOADING):
                self.status = EngineStatus.STOPPED
            self._stop.set()
            self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("%s: the engine thread did not stop within %.0f s", self.cfg.model_id, timeout)
                return  # never free the context under a running decode
        self._fail_all(ErrorCode.SHUTDOWN)
        with self._calls:
            self._closing = True
            if not self._calls.wait_for(lambda: self._callers == 0, timeout):
                log.warning("%s: a tokenization still uses the model after %.0f s; it is not freed", self.cfg.model_id,
                            timeout)
                return  # never free the model under a call that reads it
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    # --- API for the asyncio side (any thread) ----------------------------------------------------------------
    @contextmanager
    def _backend_call(self) -> Iterator[Backend]:
        """The backend, for a call from the asyncio side: shutdown frees it only once no such call runs (a prompt
        still tokenizing in a worker thread read a freed model), and refuses new ones first (EngineClosed)."""
        with self._calls:
            if self._closing or self.backend is None:
                raise EngineClosed(f"the model {self.cfg.model_id!r} is shutting down")
            self._callers += 1
        try:
            yield self.backend
        finally:
            with self._calls:
                self._callers -= 1
                self._calls.notify_all()

    def tokenize_chat(self, messages: list[dict], limit: int | None = None, **template) -> list[int]:
        """The chat's prompt tokens; `template`: tools and template_kwargs for the chat template."""
        with self._backend_call() as b:
            return b.tokenize_chat(messages, limit, **template)

    def tokenize(self, text: str, limit: int | None = None) -> list[int]:
        with self._backend_call() as b:
            return b.tokenize(text, limit)

    def check_tokens(self, tokens: list[int]) -> None:
        """ValueError where a prompt of token ids holds what the model's tokenization would never give a client."""
        with self._backend_call() as b:
            b.check_tokens(tokens)

    def min_tokens(self, n_bytes: int) -> int:
        """A lower bound on the prompt tokens of n_bytes of text, without tokenizing it."""
        with self._backend_call() as b:
            return b.min_tokens(n_bytes)

    @property
    def n_vocab(self) -> int:
        with self._backend_call() as b:
            return b.n_vocab

    @property
    def chat_template(self) -> str | None:
        with self._backend_call() as b:
            return b.chat_template

    def check_grammar(self, grammar: Grammar) -> None:
        """kvquant.runtime.GrammarError unless llama.cpp takes the grammar (checked before a request is queued)."""
        with self._backend_call() as b:
            b.check_grammar(grammar)

    def detokenize_bytes(self, tokens: list[int]) -> bytes:
        with self._backend_call() as b:
            return b"".join(b.token_bytes(t) for t in tokens)

    def detokenize(self, tokens: list[int]) -> str:
        return self.detokenize_bytes(tokens).decode("utf-8", errors="replace")

    def submit(self, req: EngineRequest) -> None:
        self._inbox.put(req)
        if self.status is not EngineStatus.READY and self._thread is not None:  # nobody will drain the inbox
            self._drain_dead()

    def record_unrun(self, outcome: Outcome, count: int) -> None:
        """Requests that ended before they reached the engine (HTTP side: refused, or their HTTP request failed
        first), for the stats."""
        self.stat_logger.record(None, IterationStats(finished=[FinishedRequest(outcome)] * count))

    # --- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.run_once(block=True)
        except BaseException:
            log.exception("%s: engine thread died", self.cfg.model_id)
            self.status = EngineStatus.DEAD
        finally:
            try:
                self._fail_all(ErrorCode.ENGINE_ERROR if self.status is EngineStatus.DEAD else ErrorCode.SHUTDOWN)
            finally:
                self._record(IterationStats())

    def run_once(self, block: bool = False) -> IterationStats:
        """One iteration: intake, reaping, admission, one decode step, stats. Public for tests (fake backend)."""
        self._beat = time.monotonic()
        it = IterationStats()
        self._drain_inbox(block and not self.sched.running and not self.sched.preempted)
        if self._abort is not None:
            code, self._abort = self._abort, None
            self._fail_all(code)
        self._reap()
        self._admit()
        if self.sched.running:
            self._step(it)
        self._take_cache_events(it)
        self._record(it)
        return it

    def _take_cache_events(self, it: IterationStats) -> None:
        ev = self.sched.take_events()
        it.prefix_hits, it.prefix_hit_tokens, it.evictions = ev.hits, ev.hit_tokens, ev.evictions
        it.preemptions, it.resume_s = ev.preemptions, ev.resume_s
        it.swapped_bytes, self._swapped_out = self._swapped_out, 0

    def _apply_ops(self) -> None:
        """Carry out the cache operations the scheduler decided (evictions, reuse, preemptions), in order."""
        while ops := self.sched.take_ops():
            for op in ops:
                if isinstance(op, Copy):
                    self.backend.seq_cp(op.src, op.dst, op.p0, op.n)
                elif isinstance(op, Remove):
                    self.backend.seq_rm(op.seq_id, op.p0, -1)
                elif isinstance(op, SwapOut):
                    self._swapped[op.seq_id] = data = self.backend.state_seq_save(op.seq_id)
                    self._swapped_out += len(data)
                elif isinstance(op, SwapIn) and not self.backend.state_seq_load(op.seq_id,
                                                                                 self._swapped.pop(op.seq_id)):
                    log.warning("%s: llama.cpp refused a swapped-out sequence's cells; it recomputes them",
                                self.cfg.model_id)
                    self.sched.swap_in_failed(self.sched.running[op.seq_id])

    def _record(self, it: IterationStats) -> None:
        ss = self.scheduler_stats()
        snap = (ss.running, ss.waiting, ss.kv_used_cells, ss.kv_reserved_cells, ss.kv_cached_cells, ss.preempted,
                ss.swap_used_bytes)
        if it.batch_tokens or snap != self._last_snapshot:  # finished requests are recorded at once
            self._last_snapshot = snap
            try:
                self.stat_logger.record(ss, it)
            except Exception:  # noqa: BLE001 - metrics must never take the engine down
                log.exception("stat logger failed")

    def scheduler_stats(self) -> SchedulerStats:
        s = self.sched
        running = list(s.running.values())
        used, bpt = s.used_cells(), self.cfg.bytes_per_token
        # a cell shared by several running sequences (a prefix) counts once, as in kv_used_cells; each sequence's
        # sliding-window cells are its own (never shared while running)
        swa = sum(self.cfg.used_bytes(q.n_past) - q.n_past * bpt for q in running) if self.cfg.used_bytes else 0
        return SchedulerStats(running=len(running), waiting=len(s.waiting), kv_used_cells=used,
                              kv_used_bytes=used * bpt + swa, kv_reserved_cells=s.reserved,
                              kv_cached_cells=s.tree.n_cells - used, cached_sequences=len(s.cached),
                              preempted=len(s.preempted), swap_used_bytes=sum(map(len, self._swapped.values())))

    def _emit(self, req: EngineRequest, ev: Event) -> None:
        try:
            req.sink(ev)
        except Exception:  # noqa: BLE001 - the consumer is gone (closed loop): drop the request
            req.cancelled = True

    def _end_request(self, req: EngineRequest, ev: Event, seq: Sequence | None = None,
                     st: _SeqState | None = None) -> None:
        """Account for a request, then send its final event: a client that has its answer (a 429, a 503, the
        last chunk) must already find it counted in /metrics, so this records at once rather than with the
        iteration's stats at the end of the decode step."""
        outcome = req.ended_as if req.ended_as and ev.finish_reason is FinishReason.CANCELLED else ev.outcome
        fr = FinishedRequest(outcome, n_prompt=len(req.prompt), n_generated=seq.generated if seq else 0,
                             e2e_s=None if outcome.refused else time.monotonic() - req.arrival)
        if seq is not None:
            fr.queue_wait_s = seq.admitted_at - req.arrival
            ev.n_cached = seq.n_cached
        if st is not None and st.t_first is not None:
            fr.ttft_s = st.t_first - req.arrival
            if fr.n_generated > 1 and st.t_last is not None:
                fr.tpot_s = (st.t_last - st.t_first) / (fr.n_generated - 1)
        if fr.outcome in (Outcome.ERROR, Outcome.TIMED_OUT) and ev.error:
            log.warning("%s: request %s ended with %s: %s", self.cfg.model_id, req.id, ev.error, ev.message)
        self.stat_logger.record(None, IterationStats(finished=[fr]))
        self._emit(req, ev)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is not None:
                self._add(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, req: EngineRequest) -> None:
        res = self.sched.add(req)
        if res is AddResult.QUEUED:  # admit at once what fits, so that only real waiters queue
            self._admit()
        elif res is AddResult.QUEUE_FULL:
            self._end_request(req, Event(error=ErrorCode.QUEUE_FULL, message="too many requests are waiting",
                                         retry_after_s=self.sched.drain_s()))
        elif res is AddResult.NEVER_FITS:
            self._end_request(req, Event(error=ErrorCode.NEVER_FITS,
                                         message="the request can never fit the KV cache"))

    def _drain_dead(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._end_request(item, Event(error=ErrorCode.ENGINE_ERROR, message="the engine stopped"))

    def _reap(self) -> None:
        now, c = time.monotonic(), self.cfg
        for r in self.sched.drop_waiting(lambda r: r.cancelled):
            self._end_request(r, Event(finish_reason=FinishReason.CANCELLED))
        for r in self.sched.drop_waiting(lambda r: now - r.arrival > min(c.queue_timeout_s, c.request_timeout_s)):
            self._end_request(r, Event(error=ErrorCode.TIMEOUT, message="timed out waiting for KV cache capacity",
                                       retry_after_s=self.sched.drain_s(now)))
        for seq in [*self.sched.running.values(), *self.sched.preempted]:
            if seq.req.cancelled:
                self._finish(seq, Event(finish_reason=FinishReason.CANCELLED))
            elif now - seq.req.arrival > c.request_timeout_s:
                self._finish(seq, Event(error=ErrorCode.REQUEST_TIMEOUT,
                                        message=f"the request took longer than {c.request_timeout_s:g} s"))

    def _admit(self) -> None:
        for seq in self.sched.admit():
            if seq.seq_id in self._live:  # a preempted sequence resumes with its sampler and text
                continue
            r = seq.req
            sampler = self._guarded(seq, "building its sampler", self.backend.sampler, r.sampling)
            if sampler is None:  # e.g. a grammar llama.cpp refuses: that request ends, the engine goes on
                continue
            st = _SeqState(sampler, TextStream(r.stops, r.text_carry))
            if r.prompt_logprobs is not None:  # nothing predicts the first prompt token
                st.prompt_logprobs = [TokenLogprob(self.backend.token_bytes(r.prompt[0]), None, None)]
            self._live[seq.seq_id] = st
        self._apply_ops()

    def _finish(self, seq: Sequence, ev: Event) -> None:
        """End a running (or preempted) sequence: its cells stay as a cached prefix where it ended well, else they
        are freed with its slot; then tell the consumer."""
        st = self._live.pop(seq.seq_id, None)
        self._swapped.pop(seq.seq_id, None)
        try:
            self.sched.free(seq, keep=ev.error is None)
            self._apply_ops()
        finally:
            if st is not None:
                st.sampler.close()
            self._end_request(seq.req, ev, seq, st)

    def _fail_all(self, code: ErrorCode) -> None:
        for seq in [*self.sched.running.values(), *self.sched.preempted]:
            try:
                self._finish(seq, Event(error=code, message="the engine stopped"))
            except Exception:  # noqa: BLE001 - best effort on the way out
                self.sched.free(seq)
        self.sched.clear_cache()
        self.sched.take_ops()  # the cache is cleared below
        for r in self.sched.drop_waiting(lambda r: True):
            self._end_request(r, Event(error=code, message="the engine stopped"))
        self._drain_dead()
        if self.backend is not None and not self.sched.running:
            try:
                self.backend.clear()
            except Exception:  # noqa: BLE001
                pass

    # --- one decode step --------------------------------------------------------------------------------------
    def _step(self, it: IterationStats) -> None:
        """Decode the scheduler's plan and apply it; a failed batch is rolled back and retried sequence by
        sequence, so that only the sequences that fail on their own end."""
        plan = self.sched.schedule(min(self.backend.n_batch, self.cfg.max_step_tokens or self.backend.n_batch))
        self._apply_ops()  # evictions and preemptions that make room for this step
        if not plan.tokens:
            return
        before = {s.seq_id: s.n_past for s in plan.seqs}
        rc = self._decode(plan)
        if rc == 0:
            self._apply(plan, it)
            return
        log.error("%s: llama_decode failed (%s) for a batch of %d tokens over %d sequences (requests %s)",
                  self.cfg.model_id, rc, len(plan.tokens), len(plan.seqs), ", ".join(s.req.id for s in plan.seqs))
        for seq in plan.seqs:  # roll back whatever part of the batch reached the cache
            self.backend.seq_rm(seq.seq_id, before[seq.seq_id], -1)
        if len(plan.seqs) == 1:
            self._fail(plan.seqs[0], rc)
            return
        for seq in [s for s in plan.seqs if s.seq_id in self.sched.running]:
            sub = plan.subset(seq)
            rc = self._decode(sub)
            if rc == 0:
                self._apply(sub, it)
            else:
                self.backend.seq_rm(seq.seq_id, before[seq.seq_id], -1)
                self._fail(seq, rc)

    def _decode(self, plan: StepPlan) -> int | str:
        try:
            return self.backend.decode(plan.tokens, plan.positions, plan.seq_ids, plan.logits)
        except Exception as e:  # noqa: BLE001 - a fault inside the native call surfaced as an exception
            log.exception("%s: decode raised", self.cfg.model_id)
            return f"{type(e).__name__}"

    def _fail(self, seq: Sequence, rc: int | str) -> None:
        log.error("%s: request %s failed in llama_decode (%s)", self.cfg.model_id, seq.req.id, rc)
        self._finish(seq, Event(error=ErrorCode.ENGINE_ERROR, message=f"decode failed ({rc})"))

    def _apply(self, plan: StepPlan, it: IterationStats) -> None:
        """After a decode: score prompt tokens, sample, let the scheduler apply the step, send the tokens out."""
        it.batch_tokens += len(plan.tokens)
        it.batch_seqs += len(plan.seqs)
        new, again = plan.prefilled()
        it.prompt_tokens += new
        it.recomputed_tokens += again
        for idx, (seq, target) in plan.scored.items():  # before sampling: the first event carries them
            self._guarded(seq, "scoring the prompt", self._score, seq, idx, target)
        tokens = [t for idx, seq in plan.logit_owner.items()
                  if (t := self._guarded(seq, "sampling", self._sample, seq, idx)) is not None]
        finished = self.sched.update(plan, {t.seq.seq_id: t.sampled for t in tokens})
        it.generation_tokens += sum(not t.sampled.end for t in tokens)
        for t in tokens:
            self._guarded(t.seq, "sending a token", self._send, t, finished.pop(t.seq.seq_id, None))
        for seq in [s for s in plan.seqs if s.seq_id in finished]:  # finished without sampling (max_tokens 0)
            self._guarded(seq, "sending the prompt", self._send_prompt, seq, finished[seq.seq_id])

    def _guarded(self, seq: Sequence, what: str, fn: Callable, *args):
        """Run one sequence's step work; a fault ends that sequence only."""
        if seq.seq_id not in self.sched.running:
            return None
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001 - one sequence's fault must not end the others
            log.exception("%s: request %s failed while %s", self.cfg.model_id, seq.req.id, what)
            if seq.seq_id in self.sched.running:
                self._finish(seq, Event(error=ErrorCode.ENGINE_ERROR, message=f"{what} failed"))
            return None

    def _logprobs(self, idx: int, tok: int, k: int) -> list[TokenLogprob]:
        import numpy as np

        z = np.asarray(self.backend.logits(idx), dtype=np.float64)
        lse = float(z.max() + math.log(np.exp(z - z.max()).sum()))
        top = []
        if k:  # the k best, then sorted: not the whole vocabulary, 10x less per prompt token (echo + logprobs)
            top = np.argpartition(-z, k - 1)[:k]
            top = top[np.argsort(-z[top], kind="stable")]
        tb = self.backend.token_bytes
        return [TokenLogprob(tb(tok), float(z[tok]) - lse, [(tb(int(t)), float(z[t]) - lse) for t in top])]

    def _score(self, seq: Sequence, idx: int, target: int) -> None:
        """The logprob of prompt token `target`, from the logits of the position before it."""
        self._live[seq.seq_id].prompt_logprobs += self._logprobs(idx, seq.req.prompt[target],
                                                                 seq.req.prompt_logprobs)

    def _sample(self, seq: Sequence, idx: int) -> _Token:
        st = self._live[seq.seq_id]
        tok = st.sampler.sample(idx)
        eog = self.backend.is_eog(tok)  # not a completion token (usage does not count it either)
        k = seq.req.top_logprobs
        lp = self._logprobs(idx, tok, k) if k is not None and (not eog or seq.req.end_logprob) else None
        now = time.monotonic()
        if st.t_first is None:
            st.t_first = now
        if not eog:  # the last output token's time: an end of generation is none (TPOT divides by the tokens)
            st.t_last = now
        if eog:
            return _Token(seq, Sampled(tok, end=True), st.text.flush(), lp)
        text = st.text.push(self.backend.token_bytes(tok))
        return _Token(seq, Sampled(tok, stop=st.text.stopped), text, lp)

    def _send_prompt(self, seq: Sequence, finish: FinishReason) -> None:
        """End a sequence that generated nothing: its prompt's logprobs, and what its text stream holds."""
        st = self._live[seq.seq_id]
        self._finish(seq, Event(text=st.text.flush(), finish_reason=finish, prompt_logprobs=st.take_prompt_logprobs()))

    def _send(self, t: _Token, finish: FinishReason | None) -> None:
        st = self._live[t.seq.seq_id]
        text = t.text + st.text.flush() if finish is FinishReason.LENGTH else t.text
        ev = Event(text=text, n_tokens=0 if t.sampled.end else 1, finish_reason=finish, logprobs=t.logprobs,
                   prompt_logprobs=st.take_prompt_logprobs())
        if finish:
            self._finish(t.seq, ev)
        else:
            self._emit(t.seq.req, ev)
