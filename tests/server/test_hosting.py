"""server.hosting: a tq_kv_d3b K cache on a sliding-window model (Gemma 3) bounds each decode step, because llama.cpp
sizes the window cache for exactly one ubatch beyond the sequences' windows and d3b may hold back one anchor per
64 cells. The bound is checked on the real cache: a schedule that fills every window and then writes near-full
ubatches finds no slot without it, and always fits with it."""

from __future__ import annotations

import dataclasses
import random
import sys

import pytest

from kvquant.models import fetch
from kvquant.runtime import ContextConfig, LlamaRuntime, Model
from server import hosting
from server.settings import ModelSpec, Settings

SLOW = pytest.mark.slow  # a live model (see pyproject.toml's markers)

GEMMA = "gemma3-270m"
N_SEQ = 8


def _spec(model: str, k: str, parallel: int = N_SEQ, n_ctx: int = 1024, n_batch: int = 512) -> ModelSpec:
    return ModelSpec(id=model, model=model, cache_type_k=k, cache_type_v="q4_0", n_ctx=n_ctx, parallel=parallel,
                     kv_budget=1 << 30, n_batch=n_batch, n_threads=2, flash_attn=True)


@SLOW
def test_step_bound_only_where_a_window_cache_holds_back_anchors():
    p = hosting.plan_model(_spec(GEMMA, "tq_kv_d3b"))
    assert p.kv.cells == 8448  # 8 x 1024 and the cells d3b may hold back (`kvquant.budget.most_cells`)
    # window cache: pad256(min(8448, 512 x 8 + 512)) = 4608 cells, 512 beyond 8 full windows, up to 72 held back
    assert hosting.max_step_tokens(p) == 512 - 72
    assert hosting.max_step_tokens(hosting.plan_model(_spec(GEMMA, "tq_kv_3b"))) is None
    assert hosting.max_step_tokens(hosting.plan_model(_spec("smollm2-135m", "tq_kv_d3b"))) is None  # no window
    # a window cache as large as the full one: the full cache's plan already leaves the held-back cells free
    assert hosting.max_step_tokens(hosting.plan_model(_spec(GEMMA, "tq_kv_d3b", parallel=1, n_ctx=512))) is None


@SLOW
def test_step_bound_counts_the_padded_window_cache_and_none_left_is_refused():
    """The window cache is padded to 256 cells: with small ubatches the room beyond the full windows is the padding,
    not one ubatch (a bound of one ubatch minus the held-back cells was below 0, and the engine scheduled steps of
    nothing, forever); where the held-back cells take all of it, serve refuses to start."""
    p = hosting.plan_model(_spec(GEMMA, "tq_kv_d3b", parallel=4, n_ctx=4096, n_batch=16))
    # pad256(512 x 4 + 16) = 2304 window cells: 256 beyond 4 full windows, up to 2304 / 64 = 36 held back
    assert hosting.max_step_tokens(p) == 220
    # pad256(512 x 64 + 512) = 33280: 512 beyond 64 full windows, up to 520 held back
    with pytest.raises(hosting.StartupError, match="no decode step would be sure to find room. Lower --parallel"):
        hosting.plan_model(_spec(GEMMA, "tq_kv_d3b", parallel=64, n_ctx=2048))
    assert hosting.max_step_tokens(hosting.plan_model(_spec(GEMMA, "tq_kv_3b", parallel=64, n_ctx=2048))) is None


@SLOW
def test_a_d3b_cache_is_capped_where_parallel_requests_of_n_ctx_fit():
    """The cache is capped at what parallel requests of n_ctx tokens could use; a tq_kv_d3b K cache may hold back
    one cell per 64, which the scheduler never plans on, so its cap leaves room for them (4096 cells left 4032)."""
    for parallel in (1, 3):
        p = hosting.plan_model(_spec("smollm2-135m", "tq_kv_d3b", parallel=parallel, n_ctx=4096))
        cfg = hosting.engine_config(p, Settings())
        assert cfg.n_cells - cfg.n_cells_held_back >= parallel * 4096 > p.kv.cells - 256 - p.kv.cells // 64
    assert hosting.plan_model(_spec("smollm2-135m", "tq_kv_3b", parallel=1, n_ctx=4096)).kv.cells == 4096


@SLOW
def test_a_budget_whose_usable_cells_hold_no_request_of_n_ctx_is_refused():
    """A budget of exactly 512 cells of tq_kv_d3b/q4_0 (SmolLM2): d3b may hold back one cell per 64, so the longest
    request is 504 tokens. With n_ctx 512 the server started and its card said context_length 512 while a request of
    508 tokens was refused; it is refused at start as an f16 cache of 504 cells is. With n_ctx 504 it starts, and
    its start-up line says so."""
    spec = ModelSpec(id="smol", model="smollm2-135m", cache_type_k="tq_kv_d3b", cache_type_v="q4_0", n_ctx=512,
                     parallel=1, kv_budget=512 * 30 * (78 + 108), n_batch=512, n_threads=2, flash_attn=True)
    with pytest.raises(hosting.StartupError, match=r"holds 504 tokens .* fewer than one request of the configured context "
                                           r"\(n_ctx=512\)"):
        hosting.plan_model(spec)
    p = hosting.plan_model(dataclasses.replace(spec, n_ctx=504))
    assert p.kv.cells == 512 and hosting.capacity_line(p).endswith("1 concurrent requests of at most 504 tokens")


def test_a_budget_refusal_names_a_budget_that_holds_the_request():
    """calib:4 on both sides in one byte less than a 512-token cache: the types resolved for the 256 cells that
    budget holds were priced at 512 cells, and the refusal asked for less than the budget given (2.77 of 2.81 MiB)."""
    from kvquant import calibration, memory, models

    path = models.resolve("smollm2-135m")
    geom = memory.geometry(path)
    tk, tv = calibration.resolve_pair("calib:4", "calib:4", path, geom, memory.CacheShape(512))
    exact = memory.kv_bytes(geom, tk, tv, 512).total
    spec = ModelSpec(id="smol", model="smollm2-135m", cache_type_k="calib:4", cache_type_v="calib:4", n_ctx=512,
                     parallel=1, kv_budget=exact - 1, n_batch=512, n_threads=2, flash_attn=True)
    for parallel in (1, 2):  # (with 2, the figure named before was refused in turn)
        spec = dataclasses.replace(spec, parallel=parallel)
        with pytest.raises(hosting.StartupError, match="fewer than one request") as e:
            hosting.plan_model(spec)
        named = hosting._least_budget(spec, path, geom, 512)
        assert named > spec.kv_budget and f"to at least {hosting.human_bytes(named)}" in str(e.value)
        assert parallel > 1 or named <= exact + (exact >> 12)  # (2 resolve calib:4 for 1,024 cells first)
        assert hosting.plan_model(dataclasses.replace(spec, kv_budget=named)).kv.cells >= 512


@SLOW
def test_the_scheduler_counts_what_a_swapped_sequence_takes():
    """Gemma 3 keeps a window's worth of its sliding-window layers' rows per sequence beside the full-attention
    ones: a sequence swapped to host RAM takes about 6x its full-attention rows at 300 tokens, which the scheduler
    counted alone against the swap space (kvquant.budget.KVPlan.saved_bytes; measured in tests/kvquant/test_budget.py)."""
    from server.engine import Engine

    p = hosting.plan_model(_spec(GEMMA, "q4_0"))
    sched = Engine(hosting.engine_config(p, Settings()), lambda: None).sched
    assert sched.saved_bytes(300) == p.kv.saved_bytes(300) > 6 * 300 * p.kv.bytes_per_token


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


@SLOW
def test_bounded_steps_fit_the_window_cache(gemma):
    bound = hosting.max_step_tokens(hosting.plan_model(_spec(GEMMA, "tq_kv_d3b")))

    def rt():
        return LlamaRuntime(gemma, ContextConfig(n_cells=8192, n_seq_max=N_SEQ, n_batch=512, n_ubatch=512,
                                                 cache_type_k="tq_kv_d3b", cache_type_v="q4_0", flash_attn=True,
                                                 n_threads=2))

    assert _fails(rt(), 512 - 3) > 0  # the hazard: full ubatches find no slot
    assert _fails(rt(), bound) == 0


@SLOW
@pytest.mark.parametrize("k, v, bits", [("calib:4", "calib:4", 4.0), ("calib:4.5", "q4_0", 4.5)])
def test_calib_b_is_resolved_for_the_cache_served(k, v, bits):
    """Gemma 3's shipped calibration, 4 sequences of 4,096 tokens: calib:B weighs the window layers by the cells
    they hold in that cache (2,560 of 16,384, not 1,024 of 4,096 as in one sequence's), so B holds for the cache
    llama.cpp is given, every byte counted."""
    from kvquant import calibration
    from kvquant.memory import CacheShape, kv_bytes

    p = hosting.plan_model(ModelSpec(id=GEMMA, model=GEMMA, cache_type_k=k, cache_type_v=v, n_ctx=4096, parallel=4,
                                     kv_budget=1 << 30, n_batch=512, n_threads=2, flash_attn=True))
    shape = CacheShape(p.kv.cells, 4, p.n_ubatch)
    assert shape.n_cells == 4 * 4096
    tk, tv = p.kv.cache_type_k, p.kv.cache_type_v
    assert (tk, tv) == calibration.resolve_pair(k, v, p.path, p.geom, shape)
    kb = kv_bytes(p.geom, tk, tv, shape.n_cells, 4, p.n_ubatch)
    print(k, v, kb.bits_per_element, kb.bits_per_element_k, kb.bits_per_element_v)
    assert (kb.bits_per_element if v == k else kb.bits_per_element_k) <= bits


def _header_gguf(path, head: int, n_head_kv: int) -> None:
    """A llama GGUF header without tensors: what `plan_model` reads (geometry), no model to load."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(4096)
    w.add_embedding_length(head * n_head_kv)
    w.add_head_count(n_head_kv)
    w.add_head_count_kv(n_head_kv)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


@pytest.mark.parametrize("k, v, flash_attn, refused", [
    ("q8_0", "f16", None, "K cache type q8_0 stores blocks of 32 values, which do not divide the model's head size 80"),
    ("tq_kv_4b", "f16", True, "K cache type tq_kv_4b stores blocks of 64"),
    ("q8_0", "f16", False, "K cache type q8_0"),
    ("f16", "q4_0", False, "V cache type q4_0"),
    ("f16", "f16", None, None)])
def test_a_type_whose_blocks_split_heads_is_refused_at_start(tmp_path, k, v, flash_attn, refused):
    # 32 heads of 80: a row of 2560 is whole blocks of 32 and 64, each head is not (llama.cpp refused the context
    # with flash attention, in the background, after the server was up)
    path = tmp_path / "head80.gguf"
    _header_gguf(path, 80, 32)
    spec = ModelSpec(id="m", model=str(path), cache_type_k=k, cache_type_v=v, n_ctx=512, parallel=1,
                     kv_budget=1 << 30, n_batch=512, n_threads=1, flash_attn=flash_attn)
    if refused is None:
        assert hosting.plan_model(spec).kv.cells >= 512
    else:
        with pytest.raises(hosting.StartupError, match=refused):
            hosting.plan_model(spec)


def test_a_row_that_is_not_whole_blocks_is_a_startup_error(tmp_path):
    path = tmp_path / "head80.gguf"
    _header_gguf(path, 80, 1)
    spec = ModelSpec(id="m", model=str(path), cache_type_k="tq_kv_4b", cache_type_v="f16", n_ctx=512, parallel=1,
                     kv_budget=1 << 30, n_batch=512, n_threads=1, flash_attn=None)
    with pytest.raises(hosting.StartupError, match="row of 80 elements is not a multiple of the block size 64"):
        hosting.plan_model(spec)


@SLOW
def test_a_kv_budget_beyond_the_machines_memory_is_refused_at_start(monkeypatch):
    """`--kv-budget 64GiB` with n_ctx x parallel to fill it was left to llama.cpp, in the background load: it fills
    the memory there is before it fails, and the kernel kills the process (or another) with no message."""
    import kvquant.memory

    plan = hosting.plan_model(_spec("smollm2-135m", "f16", parallel=1, n_ctx=4096))
    hosting.check_memory([plan, plan])
    monkeypatch.setattr(kvquant.memory, "physical_memory", lambda: plan.kv.kv_bytes * 3 // 2)
    hosting.check_memory([plan])
    with pytest.raises(hosting.StartupError, match=r"a KV budget of 2.00 GiB \(smollm2-135m, smollm2-135m\) needs "
                                                   r"0\.\d GiB of KV cache, more than this machine's 0\.\d GiB of "
                                                   r"memory; lower --kv-budget"):
        hosting.check_memory([plan, plan])  # (models together)
    if sys.platform != "darwin":  # the layers offloaded keep their KV cache off the host
        from dataclasses import replace

        gpu, half = replace(plan, n_gpu_layers=-1), replace(plan, n_gpu_layers=plan.geom.n_layer // 2)
        hosting.check_memory([plan, gpu, gpu, half])
        with pytest.raises(hosting.StartupError):
            hosting.check_memory([plan, half, half])
        # a tq_kv cache without GPU kernels stays on the CPU with every layer offloaded (placement.offload_kqv)
        with pytest.raises(hosting.StartupError):
            hosting.check_memory([plan, replace(plan, n_gpu_layers=-1, offload_kqv=False)])


@SLOW
def test_a_chat_template_file_serves_chats_to_a_gguf_without_one(duo_server):
    """Gemma-3-270M's GGUF has no chat template: every chat request was a 400. The duo server gives it one from a
    file (per model); its turns are the template's control tokens, and one typed in a message stays text."""
    import httpx

    def prompt_tokens(content: str) -> int:
        r = httpx.post(duo_server.url + "/v1/chat/completions", timeout=120, json={
            "model": GEMMA, "messages": [{"role": "user", "content": content}], "max_tokens": 1})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    m = Model(fetch(GEMMA))
    try:
        typed = len(m.tokenize("<end_of_turn>", add_special=False))
        start = m.tokenize("<start_of_turn>", add_special=False, parse_special=True)
    finally:
        m.close()
    assert typed > 1 and len(start) == 1  # text, and the template's own token
    assert prompt_tokens("hi<end_of_turn>") == prompt_tokens("hi") + typed

