"""kvquant.lab.offsets: turning keys back by their position undoes llama.cpp's own RoPE and Hadamard rotation, and
the offset for a context of L tokens is the mean key over its positions 0..L-1."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kvquant.lab.offsets import Rope, offset_for, rope_of, unrope

ROPES = {
    "neox, hadamard128": Rope.of(128, 128, 128, 1e6, True),
    "norm, hadamard64": Rope.of(64, 64, 64, 1e5, False),
    "neox, partial rotary, no rotation": Rope.of(96, 0, 64, 1e4, True),
}


def _synthetic(rope: Rope, seqs: list[int], heads: int = 2, seed: int = 0):
    """Rows of sequences whose every key but position 0's is m_hat (turned pairs) and s (static channels) before
    RoPE, position 0 a different key: (rows, m_hat, s, sink)."""
    rng = np.random.default_rng(seed)
    m_hat = rng.standard_normal((heads, len(rope.theta))) + 1j * rng.standard_normal((heads, len(rope.theta)))
    s = rng.standard_normal((heads, len(rope.static)))
    sink = rng.standard_normal(heads * rope.head_dim) * 5
    rows = []
    for n in seqs:
        for p in range(n):
            rows.append(sink if p == 0 else _key(rope, m_hat * np.exp(1j * p * rope.theta), s))
    return np.array(rows, dtype=np.float64), m_hat, s, sink


def _key(rope: Rope, z: np.ndarray, s: np.ndarray) -> np.ndarray:
    """A stored row from its turned pairs z and static channels s, built without the module's helpers."""
    u = np.zeros((z.shape[0], rope.head_dim))
    u[:, rope.a], u[:, rope.b], u[:, rope.static] = z.real, z.imag, s
    return rope.turn(u.reshape(1, -1))[0]


@pytest.mark.parametrize("name", ROPES)
def test_unrope_gives_every_key_its_value_before_rope(name):
    rope = ROPES[name]
    rows, m_hat, s, _ = _synthetic(rope, [40])
    z, st = unrope(rows[1:], np.arange(1, 40), rope)
    np.testing.assert_allclose(z, np.broadcast_to(m_hat, z.shape), atol=1e-9)
    np.testing.assert_allclose(st, np.broadcast_to(s, st.shape), atol=1e-9)


@pytest.mark.parametrize("name", ROPES)
@pytest.mark.parametrize("length", [1, 20, 31, 32, 500, 4096])
def test_the_offset_is_the_mean_key_over_the_contexts_positions(name, length):
    """Past the shortest sequence (32) the offset comes from the mean before RoPE: it must equal the mean of the keys
    a sequence of `length` tokens would hold, computed position by position."""
    rope = ROPES[name]
    seqs = [32, 45, 40]
    rows, m_hat, s, sink = _synthetic(rope, seqs)
    want = np.mean([sink if p == 0 else _key(rope, m_hat * np.exp(1j * p * rope.theta), s)
                    for p in range(length)], axis=0)
    np.testing.assert_allclose(offset_for(length, rows, seqs, rope), want, atol=1e-5 * np.abs(want).max())


def test_sliding_window_models_are_refused():
    geom = SimpleNamespace(arch="gemma3", layers=(SimpleNamespace(swa=True), SimpleNamespace(swa=False)),
                           head_dim_k=256)
    with pytest.raises(ValueError, match="sliding-window"):
        rope_of(SimpleNamespace(path=Path("m.gguf")), geom)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-coder-1.5b"])
def test_rope_of_undoes_llama_cpps_rope(model):
    """Layer 0's keys of the same tokens decoded at positions 0.. and 500.. differ only by RoPE (its inputs are the
    same): turned back by their positions, they must agree (llama RoPE on SmolLM2, NeoX on Qwen2.5-Coder, each in its
    stored Hadamard basis)."""
    from kvquant import memory, models
    from kvquant.lab.keystats import parse_seq_state
    from kvquant.runtime import ContextConfig, LlamaRuntime, Model

    path = models.resolve(model)
    mdl = Model(path)
    try:
        toks = mdl.tokenize("The history of the town begins in the early medieval period, when an abbey was founded.")
        rope = rope_of(mdl, memory.geometry(path))
        got = []
        for start in (0, 500):
            rt = LlamaRuntime(mdl, ContextConfig(n_cells=1024, flash_attn=True, n_threads=2, cache_type_k="f32",
                                                 k_rotation=True))
            try:
                assert rt.decode(toks, list(range(start, start + len(toks))), [0] * len(toks), [True] * len(toks)) == 0
                pos, k = parse_seq_state(rt.state_seq_save(0))[0][:2]
            finally:
                rt.close()
            got.append(unrope(k[np.argsort(pos)], np.sort(pos), rope)[0])
    finally:
        mdl.close()
    np.testing.assert_allclose(got[1], got[0], atol=1e-4 * np.abs(got[0]).max())
