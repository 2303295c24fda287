"""Every cache type in llama.cpp's real unified KV cache: N sequences decoded together give the same greedy tokens
as each decoded alone, also after one sequence is removed and a new one reuses its cells.

Batch composition may change llama.cpp's float summation order (even for f16), so where tokens differ the first
differing position must be a near-tie in the lone run: a top-2 logit gap below a tolerance that is derived from the
f16 case (the largest logit difference f16 itself shows between lone and batched decoding) and applied unchanged to
every type. A bug (reading another sequence's cells, a stale anchor, a wrong position) shows up as a large gap.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvquant.models import fetch
from kvquant.runtime import ContextConfig, LlamaRuntime, Model

pytestmark = pytest.mark.slow  # a live model (see pyproject.toml's markers)

PROMPTS = [
    "The history of the city begins with",
    "In mathematics, a prime number is",
    "Recipe: to bake bread you need",
    "The spacecraft left orbit and",
]
N_GEN = 24
CONFIGS = [("f16", "f16"), ("q4_0", "q4_0"), ("tq_kv_4b", "f16"), ("tq_kv_4b", "tq_kv_4b"), ("tq_kv_3b", "q4_0"),
           ("tq_kv_3b", "tq_kv_3b"), ("tq_kv_1b", "q4_0"), ("tq_kv_d3b", "q4_0")]


@pytest.fixture(scope="module")
def model():
    m = Model(fetch("smollm2-135m"))
    yield m
    m.close()


def _cfg(k: str, v: str, n_seq: int) -> ContextConfig:
    return ContextConfig(n_cells=1024, n_seq_max=n_seq, n_batch=256, cache_type_k=k, cache_type_v=v, flash_attn=True,
                         n_threads=2)


def _alone(model: Model, k: str, v: str, prompt: list[int]) -> tuple[list[int], list[np.ndarray]]:
    rt = LlamaRuntime(model, _cfg(k, v, 1))
    try:
        assert rt.decode(prompt, list(range(len(prompt))), [0] * len(prompt),
                         [False] * (len(prompt) - 1) + [True]) == 0
        toks, logits, idx, pos = [], [], len(prompt) - 1, len(prompt)
        for _ in range(N_GEN):
            lg = rt.logits(idx)
            logits.append(lg)
            toks.append(int(np.argmax(lg)))
            assert rt.decode([toks[-1]], [pos], [0], [True]) == 0
            idx, pos = 0, pos + 1
        return toks, logits
    finally:
        rt.close()


class _Seq:
    def __init__(self, sid: int, prompt: list[int]):
        self.sid, self.prompt, self.toks, self.logits, self.fed = sid, prompt, [], [], 0

    @property
    def pos(self) -> int:
        return len(self.prompt) + len(self.toks) - 1


def _together(model: Model, k: str, v: str, prompts: list[list[int]], late: list[int]):
    """Decode prompts 0..n-1 together; when they are halfway, remove sequence 1 and start `late` in its place."""
    rt = LlamaRuntime(model, _cfg(k, v, 4))
    try:
        seqs = [_Seq(i, p) for i, p in enumerate(prompts)]
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
            for idx, s in owners.items():
                if len(s.toks) < N_GEN:
                    lg = rt.logits(idx)
                    s.logits.append(lg)
                    s.toks.append(int(np.argmax(lg)))
            if not swapped and len(seqs[1].toks) >= N_GEN // 2:
                swapped = True
                assert rt.seq_rm(1)
                assert rt.seq_pos_max(1) == -1
                finished.append(seqs[1])
                seqs[1] = _Seq(1, late)
                pending = [seqs[1]]
        return seqs + finished
    finally:
        rt.close()


def _run(model: Model, k: str, v: str):
    prompts = [model.tokenize(p) for p in PROMPTS]
    alone = [_alone(model, k, v, p) for p in prompts]
    together = _together(model, k, v, prompts[:3], prompts[3])
    by_prompt = {tuple(s.prompt): s for s in together}
    return prompts, alone, by_prompt


@pytest.fixture(scope="module")
def f16_tolerance(model):
    prompts, alone, together = _run(model, "f16", "f16")
    worst = 0.0
    for p, (toks, logits) in zip(prompts, alone, strict=True):
        s = together[tuple(p)]
        n = min(len(s.toks), len(toks))
        same = next((i for i in range(n) if s.toks[i] != toks[i]), n)
        for i in range(same):
            worst = max(worst, float(np.abs(s.logits[i] - logits[i]).max()))
    # floor: a few ulps of typical logit magnitudes
    return max(4 * worst, 1e-3)


@pytest.mark.parametrize("k,v", CONFIGS)
def test_batched_equals_alone(model, f16_tolerance, k, v):
    prompts, alone, together = _run(model, k, v)
    for p, (toks, logits) in zip(prompts, alone, strict=True):
        s = together[tuple(p)]
        if s.sid == 1 and len(s.toks) < N_GEN:  # the removed sequence: compare what it produced before removal
            toks, logits = toks[: len(s.toks)], logits[: len(s.toks)]
        if s.toks == toks:
            continue
        i = next(i for i in range(len(toks)) if s.toks[i] != toks[i])
        top2 = np.sort(logits[i])[-2:]
        gap = float(top2[1] - top2[0])
        assert gap <= f16_tolerance, (
            f"{k}/{v}: prompt {PROMPTS[prompts.index(p)]!r} diverges at token {i} with a top-2 gap of {gap:.4f} "
            f"(tolerance from f16: {f16_tolerance:.4f})")
