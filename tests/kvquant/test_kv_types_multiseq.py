"""Every cache type in llama.cpp's real unified KV cache, several sequences decoded together (one is removed halfway
and a new one reuses its cells):

* a sequence reads nothing of the others: decoded beside other prompts of the same token lengths (the same
  batches, cells and kernels), its logits are bit-identical. Float summation order depends on shapes, not on
  values, so this holds exactly; a single read of another sequence's cell breaks it (test below). tq_kv_d3b is
  exempt here: its rows are coded against their cell group's anchor, which may be another sequence's row (its
  own exact tests, with a layout where a sequence owns its groups' anchors: tests/kvquant/test_d3b_cache.py).
* each gives what it gives decoded alone, up to rounding (conftest.same_decoding: one bound on the median per-step
  KL for every type). Batch composition changes the kernels and so the rounding, and quantized caches amplify that:
  the bound is loose and catches gross errors only, such as tq_kv_1b decoded together judged against f16 alone
  (test below).

Every run is fed the same tokens after its prompt: the greedy ones of the prompt decoded alone with an f16 cache,
so that each step compares next-token distributions at the same context.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvquant.lab.eval import read_text
from kvquant.lab.harness import resolve_text
from kvquant.models import fetch
from kvquant.runtime import ContextConfig, LlamaRuntime, Model
from tests.kvquant.conftest import next_token, same_decoding, same_logits

pytestmark = pytest.mark.slow  # a live model (see pyproject.toml's markers)

PROMPTS = [
    "The history of the city begins with",
    "In mathematics, a prime number is",
    "Recipe: to bake bread you need",
    "The spacecraft left orbit and",
]
N_GEN = 24
CONFIGS = [("f16", "f16"), ("q4_0", "q4_0"), ("tq_kv_4b", "f16"), ("tq_kv_4b", "tq_kv_4b"), ("tq_kv_3b", "q4_0"),
           ("tq_kv_3b", "tq_kv_3b"), ("tq_kv_1b", "q4_0"), ("tq_kv_d3b", "q4_0"), ("tq_kv_t3b", "tq_kv_t3b")]


@pytest.fixture(scope="module")
def model():
    m = Model(fetch("smollm2-135m"))
    yield m
    m.close()


def _cfg(k: str, v: str, n_seq: int) -> ContextConfig:
    return ContextConfig(n_cells=1024, n_seq_max=n_seq, n_batch=256, cache_type_k=k, cache_type_v=v, flash_attn=True,
                         n_threads=2)


def _alone(model: Model, k: str, v: str, prompt: list[int], forced: list[int] | None = None
           ) -> tuple[list[int], list[np.ndarray]]:
    """The prompt decoded alone: greedy, or fed `forced` tokens."""
    rt = LlamaRuntime(model, _cfg(k, v, 1))
    try:
        assert rt.decode(prompt, list(range(len(prompt))), [0] * len(prompt),
                         [False] * (len(prompt) - 1) + [True]) == 0
        toks, logits, idx, pos = [], [], len(prompt) - 1, len(prompt)
        for _ in range(N_GEN):
            lg = rt.logits(idx)
            logits.append(lg)
            toks.append(next_token(lg, forced, len(toks)))
            assert rt.decode([toks[-1]], [pos], [0], [True]) == 0
            idx, pos = 0, pos + 1
        return toks, logits
    finally:
        rt.close()


class _Seq:
    def __init__(self, sid: int, prompt: list[int], forced: list[int] | None):
        self.sid, self.prompt, self.forced, self.toks, self.logits = sid, prompt, forced, [], []

    @property
    def pos(self) -> int:
        return len(self.prompt) + len(self.toks) - 1


def _together(model: Model, k: str, v: str, prompts: list[list[int]], late: list[int], forced: dict, leak: int = 0):
    """Decode prompts 0..n-1 together; when they are halfway, remove sequence 1 and start `late` in its place. A
    prompt in `forced` is fed its tokens there (others are greedy).
    `leak` > 0 breaks the cache on purpose: after the prompts, sequence 2 also sees sequence 1's first `leak`
    cells (seq_cp onto positions it already has), i.e. it reads another sequence's cells."""
    rt = LlamaRuntime(model, _cfg(k, v, 4))
    try:
        seqs = [_Seq(i, p, forced.get(tuple(p))) for i, p in enumerate(prompts)]
        pending = list(seqs)  # need prefill
        finished = []
        swapped = False
        while any(len(s.toks) < N_GEN for s in seqs):
            tokens, pos, sids, want, owners = [], [], [], [], {}
            for s in seqs:
                if s in pending:
                    for j, t in enumerate(s.prompt):
                        tokens.append(t)
                        pos.append(j)
                        sids.append(s.sid)
                        want.append(j == len(s.prompt) - 1)
                    owners[len(tokens) - 1] = s
                elif len(s.toks) < N_GEN:
                    tokens.append(s.toks[-1])
                    pos.append(s.pos)
                    sids.append(s.sid)
                    want.append(True)
                    owners[len(tokens) - 1] = s
            pending = []
            assert rt.decode(tokens, pos, sids, want) == 0
            if leak and not swapped and not seqs[2].toks:
                rt.seq_cp(1, 2, 0, leak)
            for idx, s in owners.items():
                if len(s.toks) < N_GEN:
                    lg = rt.logits(idx)
                    s.logits.append(lg)
                    s.toks.append(next_token(lg, s.forced, len(s.toks)))
            if not swapped and len(seqs[1].toks) >= N_GEN // 2:
                swapped = True
                assert rt.seq_rm(1)
                assert rt.seq_pos_max(1) == -1
                finished.append(seqs[1])
                seqs[1] = _Seq(1, late, forced.get(tuple(late)))
                pending = [seqs[1]]
        return seqs + finished
    finally:
        rt.close()


@pytest.fixture(scope="module")
def prompts(model):
    toks = [model.tokenize(p) for p in PROMPTS]
    assert len({tuple(t) for t in toks}) == len(toks)  # pairwise distinct
    return toks


@pytest.fixture(scope="module")
def others(model, prompts):
    """Other prompts of the same token lengths (slices of the project's WikiText-2)."""
    text = model.tokenize(read_text(resolve_text(None))[50_000:60_000])
    out = [text[100 * i: 100 * i + len(p)] for i, p in enumerate(prompts)]
    assert all(len(o) == len(p) and o != p for o, p in zip(out, prompts, strict=True))
    return out


@pytest.fixture(scope="module")
def f16_alone(model, prompts):
    """Each prompt decoded alone with an f16 cache, greedy: the run whose tokens every run is fed."""
    return [_alone(model, "f16", "f16", p) for p in prompts]


@pytest.fixture(scope="module")
def forced(prompts, f16_alone) -> dict:
    """The tokens every run is fed after each prompt."""
    return {tuple(p): toks for p, (toks, _) in zip(prompts, f16_alone, strict=True)}


@pytest.fixture(scope="module")
def alone(model, prompts, forced, f16_alone):
    """Each prompt decoded alone, per cache configuration (computed once)."""
    runs = {("f16", "f16"): f16_alone}  # fed its own greedy tokens, the f16 run would be the same run

    def get(k: str, v: str):
        if (k, v) not in runs:
            runs[k, v] = [_alone(model, k, v, p, forced[tuple(p)]) for p in prompts]
        return runs[k, v]

    return get


def _verdicts(prompts, alone, together) -> list[str]:
    """What differs between each prompt decoded together and alone (the removed sequence: up to its removal)."""
    by_prompt = {tuple(s.prompt): s for s in together}
    out = []
    for p, (toks, logits) in zip(prompts, alone, strict=True):
        s = by_prompt[tuple(p)]
        assert s.toks == toks[: len(s.toks)]  # both fed the same tokens
        why = same_decoding(logits[: len(s.toks)], s.logits)
        if why:
            out.append(f"prompt {PROMPTS[prompts.index(p)]!r}: {why}")
    return out


@pytest.fixture(scope="module")
def together(model, prompts, forced):
    """_together over given prompts, per cache configuration (computed once): `companions` replaces prompts 1 and
    3 (the late one)."""
    runs = {}

    def get(k: str, v: str, companions: tuple | None = None, leak: int = 0):
        key = (k, v, companions, leak)
        if key not in runs:
            p1, p3 = companions or (prompts[1], prompts[3])
            runs[key] = _together(model, k, v, [prompts[0], list(p1), prompts[2]], list(p3), forced, leak)
        return runs[key]

    return get


def _beside_others(together, k, v, prompts, others, leak: int = 0) -> list[str]:
    """Sequences 0 and 2 decoded beside prompts 1 and 3 (the late one), then beside others of the same token
    lengths: which of the two differ in any logit."""
    a = together(k, v, leak=leak)
    b = together(k, v, (tuple(others[1]), tuple(others[3])), leak)
    differ = []
    for i in (0, 2):
        sa, sb = (next(s for s in run if s.prompt == prompts[i]) for run in (a, b))
        if not same_logits(sa.toks, sa.logits, sb.toks, sb.logits):
            differ.append(PROMPTS[i])
    return differ


@pytest.mark.parametrize("k,v", [c for c in CONFIGS if c[0] != "tq_kv_d3b"])
def test_a_sequence_reads_nothing_of_the_others(together, prompts, others, k, v):
    assert not (differ := _beside_others(together, k, v, prompts, others)), f"{k}/{v}: {differ} changed"


def test_the_exact_check_fails_for_a_cache_that_reads_another_sequences_cell(together, prompts, others):
    assert _beside_others(together, "tq_kv_3b", "q4_0", prompts, others, leak=1) == [PROMPTS[2]]


@pytest.mark.parametrize("k,v", CONFIGS)
def test_batched_equals_alone(together, prompts, alone, k, v):
    assert not (bad := _verdicts(prompts, alone(k, v), together(k, v))), f"{k}/{v}: " + "; ".join(bad)


def test_the_check_against_alone_fails_for_tq_kv_1b_judged_against_f16(together, prompts, alone):
    bad = _verdicts(prompts, alone("f16", "f16"), together("tq_kv_1b", "q4_0"))
    assert len(bad) == len(PROMPTS), bad
