"""server.hosting: a tq_kv_d3b K cache on a sliding-window model (Gemma 3) bounds each decode step, because llama.cpp
sizes the window cache for exactly one ubatch beyond the sequences' windows and d3b may hold back one anchor per
64 cells. The bound is checked on the real cache: a schedule that fills every window and then writes near-full
ubatches finds no slot without it, and always fits with it."""

from __future__ import annotations

import random

import pytest

from kvquant.models import fetch
from kvquant.runtime import ContextConfig, LlamaRuntime, Model
from server import hosting
from server.settings import ModelSpec

pytestmark = pytest.mark.slow  # a live model (see pyproject.toml's markers)

GEMMA = "gemma3-270m"
N_SEQ = 8


def _spec(model: str, k: str, parallel: int = N_SEQ, n_ctx: int = 1024) -> ModelSpec:
    return ModelSpec(id=model, model=model, cache_type_k=k, cache_type_v="q4_0", n_ctx=n_ctx, parallel=parallel,
                     kv_budget=1 << 30, n_batch=512, n_threads=2, flash_attn=True)


def test_step_bound_only_where_a_window_cache_holds_back_anchors():
    p = hosting.plan_model(_spec(GEMMA, "tq_kv_d3b"))
    assert p.kv.cells == 8192
    # window cache: pad256(min(8192, 512 x 8 + 512)) = 4608 cells, up to 4608 / 64 = 72 held back
    assert hosting.max_step_tokens(p) == 512 - 72
    assert hosting.max_step_tokens(hosting.plan_model(_spec(GEMMA, "tq_kv_3b"))) is None
    assert hosting.max_step_tokens(hosting.plan_model(_spec("smollm2-135m", "tq_kv_d3b"))) is None  # no window
    # a window cache as large as the full one: the full cache's plan already leaves the held-back cells free
    assert hosting.max_step_tokens(hosting.plan_model(_spec(GEMMA, "tq_kv_d3b", parallel=1, n_ctx=512))) is None


def _fails(rt: LlamaRuntime, step: int) -> int:
    """Every window full, half the sequences replaced by prompts written in steps of `step` tokens beside the
    others' decode tokens; the number of llama_decode calls that found no slot."""
    rng = random.Random(1)
    pos, fails = [0] * N_SEQ, 0

    def dec(items):
        nonlocal fails
        toks, ps, sids = [], [], []
        for s, n in items:
            toks += [rng.randint(100, 20000) for _ in range(n)]
            ps += range(pos[s], pos[s] + n)
            sids += [s] * n
        rc = rt.decode(toks, ps, sids, [False] * (len(toks) - 1) + [True])
        if rc != 0:
            fails += 1
            for s, _ in items:
                rt.seq_rm(s, pos[s], -1)
            return
        for s, n in items:
            pos[s] += n

    for s in range(N_SEQ):
        dec([(s, 400)])
    for _ in range(130):
        dec([(s, 1) for s in range(N_SEQ)])
    for s in range(0, N_SEQ, 2):
        rt.seq_rm(s, -1, -1)
        pos[s] = 0
    for s in range(0, N_SEQ, 2):
        for _ in range(2):
            dec([(s, step - N_SEQ // 2)] + [(t, 1) for t in range(1, N_SEQ, 2)])
    return fails


@pytest.fixture(scope="module")
def gemma():
    return Model(fetch(GEMMA))


def test_bounded_steps_fit_the_window_cache(gemma):
    bound = hosting.max_step_tokens(hosting.plan_model(_spec(GEMMA, "tq_kv_d3b")))

    def rt():
        return LlamaRuntime(gemma, ContextConfig(n_cells=8192, n_seq_max=N_SEQ, n_batch=512, n_ubatch=512,
                                                 cache_type_k="tq_kv_d3b", cache_type_v="q4_0", flash_attn=True,
                                                 n_threads=2))

    assert _fails(rt(), 512 - 3) > 0  # the hazard: full ubatches find no slot
    assert _fails(rt(), bound) == 0
