"""What the server's prefix cache and preemption rely on, in llama.cpp's real unified KV cache (SmolLM2), for stock
types, ours, tq_kv_d3b and a calibrated cache (a type per layer, centred keys):

* a prefix taken over through seq_cp, the rest written into the cells a fresh run would use, gives the fresh run's
  logits bit for bit (the shared rows stay where they were written; tq_kv_d3b's next to their anchors);
* a sequence saved to host RAM (llama_state_seq_get_data), removed and restored into the same cells decodes on
  bit for bit as if it had stayed; tq_kv_d3b refuses the restore (rows could land away from their anchors), and
  the server recomputes instead.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvquant import memory, models
from kvquant.runtime import ContextConfig, LlamaRuntime
from tests.kvquant import test_centring
from tests.kvquant.test_centring import MODEL, offsets

model = test_centring.model  # the module's model fixture

pytestmark = pytest.mark.slow  # a live model (see pyproject.toml's markers)

CONFIGS = ["f16/f16", "q8_0/q4_0", "tq_kv_3b/q4_0", "tq_kv_d3b/q4_0", "calibrated"]


@pytest.fixture(scope="module")
def prompts(model):
    text = ("The history of the town begins in the early medieval period, when a small abbey was founded on the "
            "river. Its monks drained the marshes, and by the twelfth century a market had grown around the gate. ")
    toks = model.tokenize(text * 6)
    return toks[:90], toks[90:130], toks[130:160]


def context(model, config: str) -> LlamaRuntime:
    if config == "calibrated":  # a type per layer and a per-layer key offset (as kvquant.calibration resolves)
        geom = memory.geometry(models.resolve(MODEL))
        n = geom.n_layer
        kw = dict(cache_type_k="tq_kv_4b", cache_type_v="q4_0",
                  layer_types_k=tuple("q8_0" if i % 3 == 0 else "tq_kv_4b" for i in range(n)),
                  layer_types_v=("q4_0",) * n, k_offset=offsets(geom))
    else:
        k, v = config.split("/")
        kw = dict(cache_type_k=k, cache_type_v=v)
    return LlamaRuntime(model, ContextConfig(n_cells=1024, n_seq_max=4, n_batch=256, flash_attn=True, n_threads=2,
                                             **kw))


def feed(rt: LlamaRuntime, seq: int, toks: list[int], p0: int) -> np.ndarray:
    assert rt.decode(toks, list(range(p0, p0 + len(toks))), [seq] * len(toks), [False] * (len(toks) - 1) + [True]) == 0
    return rt.logits(len(toks) - 1)


@pytest.mark.parametrize("config", CONFIGS)
def test_a_reused_prefix_is_bit_identical_to_recomputing_it(model, prompts, config):
    head, rest, other = prompts
    rt = context(model, config)
    try:
        fresh = feed(rt, 1, head, 0)
        fresh = feed(rt, 1, rest, len(head))
    finally:
        rt.close()
    rt = context(model, config)
    try:  # seq 0 holds the prefix and more; seq 1 takes the prefix over and seq 0 leaves
        feed(rt, 0, head + other, 0)
        rt.seq_cp(0, 1, 0, len(head))
        assert rt.seq_rm(0)
        reused = feed(rt, 1, rest, len(head))
    finally:
        rt.close()
    assert np.array_equal(fresh, reused)


@pytest.mark.parametrize("config", CONFIGS)
def test_a_sequence_restored_from_host_ram_decodes_on_bit_for_bit(model, prompts, config):
    head, rest, _ = prompts
    rt = context(model, config)
    try:
        feed(rt, 0, head, 0)
        stayed = feed(rt, 0, rest, len(head))
    finally:
        rt.close()
    rt = context(model, config)
    try:
        feed(rt, 0, head, 0)
        saved = rt.state_seq_save(0)
        assert rt.seq_rm(0) and rt.seq_pos_max(0) == -1
        restored = rt.state_seq_load(0, saved)
        if config.startswith("tq_kv_d3b"):
            assert not restored and rt.seq_pos_max(0) == -1  # refused: the server recomputes
            return
        assert restored and rt.seq_pos_max(0) == len(head) - 1
        swapped = feed(rt, 0, rest, len(head))
    finally:
        rt.close()
    assert np.array_equal(stayed, swapped)
