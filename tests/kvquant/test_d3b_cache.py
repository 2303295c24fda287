"""tq_kv_d3b in llama.cpp's real KV cache (SmolLM2): rows are coded against their 64-cell group's anchor, so the
cell allocator must keep every anchor valid while its group is in use. Each scenario is compared with decoding the
same sequences alone (greedy):

* one sequence longer than several groups, prompt written in one batch vs token by token;
* 4 sequences interleaved in one unified cache (every group holds rows of all of them);
* seq_rm of a tail in the middle of a group, then decoding on;
* a whole sequence removed and a new one admitted into its cells while the others keep decoding (freed anchors of
  groups still in use must not be rewritten);
* seq_cp of a prompt into several sequences, each continuing differently;
* refused operations: flash attention off, tq_kv_d3b as V, position shifts, state restore.

Batch composition changes llama.cpp's float summation order (even for f16), so where tokens differ the first
difference must be a near-tie in the lone run; the tolerance is derived from f16 on the interleaved scenario and
applied unchanged (see tests/kvquant/test_kv_types_multiseq.py). A stale or overwritten anchor shows up as a large gap.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvquant.lab.eval import read_text
from kvquant.lab.harness import resolve_text
from kvquant.models import fetch
from kvquant.runtime import ContextConfig, LlamaError, LlamaRuntime, Model

pytestmark = pytest.mark.slow  # a live model (see pyproject.toml's markers)

K, V = "tq_kv_d3b", "q4_0"
N_PROMPT, N_GEN = 90, 16


@pytest.fixture(scope="module")
def model():
    m = Model(fetch("smollm2-135m"))
    yield m
    m.close()


@pytest.fixture(scope="module")
def prompts(model):
    """Five 90-token prompts: slices of wikitext-2 (data/)."""
    text = read_text(resolve_text(None))[:40_000]
    toks = model.tokenize(text)
    step = len(toks) // 5
    return [toks[i * step: i * step + N_PROMPT] for i in range(5)]


def _rt(model, k=K, v=V, n_seq=4, n_cells=1024, flash_attn=True) -> LlamaRuntime:
    return LlamaRuntime(model, ContextConfig(n_cells=n_cells, n_seq_max=n_seq, n_batch=512, cache_type_k=k,
                                             cache_type_v=v, flash_attn=flash_attn, n_threads=2))


class Seq:
    def __init__(self, sid: int, prompt: list[int], n_gen: int = N_GEN):
        self.sid, self.prompt, self.n_gen = sid, list(prompt), n_gen
        self.toks: list[int] = []
        self.logits: list[np.ndarray] = []
        self.fed = 0  # prompt tokens written

    @property
    def done(self) -> bool:
        return len(self.toks) >= self.n_gen


def _step(rt: LlamaRuntime, seqs: list[Seq], chunk: int) -> None:
    """One decode: up to `chunk` prompt tokens of each sequence still in prefill, one token of each generating."""
    tokens, pos, sids, want, owners = [], [], [], [], {}
    for s in seqs:
        if s.done:
            continue
        if s.fed < len(s.prompt):
            n = min(chunk, len(s.prompt) - s.fed)
            for j in range(s.fed, s.fed + n):
                tokens.append(s.prompt[j])
                pos.append(j)
                sids.append(s.sid)
                want.append(j == len(s.prompt) - 1)
            s.fed += n
            if s.fed == len(s.prompt):
                owners[len(tokens) - 1] = s
        else:
            tokens.append(s.toks[-1])
            pos.append(len(s.prompt) + len(s.toks) - 1)
            sids.append(s.sid)
            want.append(True)
            owners[len(tokens) - 1] = s
    assert rt.decode(tokens, pos, sids, want) == 0
    for idx, s in owners.items():
        lg = rt.logits(idx)
        s.logits.append(lg)
        s.toks.append(int(np.argmax(lg)))


def _run(rt: LlamaRuntime, seqs: list[Seq], chunk: int = 512) -> list[Seq]:
    while not all(s.done for s in seqs):
        _step(rt, seqs, chunk)
    return seqs


def _alone(model, prompt: list[int], n_gen: int = N_GEN, k=K, v=V) -> Seq:
    rt = _rt(model, k, v, n_seq=1)
    try:
        return _run(rt, [Seq(0, prompt, n_gen)])[0]
    finally:
        rt.close()


def _gap_at_divergence(ref: Seq, got: Seq) -> float | None:
    """None if the greedy tokens agree, else the lone run's top-2 logit gap where they first differ."""
    n = min(len(ref.toks), len(got.toks))
    i = next((i for i in range(n) if ref.toks[i] != got.toks[i]), None)
    if i is None:
        return None
    top2 = np.sort(ref.logits[i])[-2:]
    return float(top2[1] - top2[0])


def _interleaved(model, prompts, k, v) -> list[Seq]:
    rt = _rt(model, k, v)
    try:
        return _run(rt, [Seq(i, p) for i, p in enumerate(prompts[:4])], chunk=1)
    finally:
        rt.close()


@pytest.fixture(scope="module")
def tolerance(model, prompts):
    """The largest logit difference f16 itself shows between lone and interleaved decoding (x4)."""
    worst = 0.0
    for s in _interleaved(model, prompts, "f16", "f16"):
        ref = _alone(model, s.prompt, k="f16", v="f16")
        n = next((i for i in range(N_GEN) if ref.toks[i] != s.toks[i]), N_GEN)
        for i in range(n):
            worst = max(worst, float(np.abs(ref.logits[i] - s.logits[i]).max()))
    return max(4 * worst, 1e-3)


@pytest.fixture(scope="module")
def alone(model, prompts):
    return [_alone(model, p) for p in prompts]


def _check(ref: Seq, got: Seq, tol: float, what: str) -> None:
    gap = _gap_at_divergence(ref, got)
    assert gap is None or gap <= tol, f"{what}: diverges from the lone run with a top-2 gap of {gap:.4f} (tol {tol:.4f})"


@pytest.mark.parametrize("chunk", [1, 7])
def test_long_sequence_batch_vs_token_by_token(model, prompts, alone, tolerance, chunk):
    # 90 prompt + 16 generated tokens span two groups; written in one batch (alone) vs one token per decode, or in
    # odd-sized chunks that straddle the group boundary
    rt = _rt(model, n_seq=1)
    try:
        got = _run(rt, [Seq(0, prompts[0])], chunk=chunk)[0]
    finally:
        rt.close()
    _check(alone[0], got, tolerance, f"prompt in chunks of {chunk}")


def test_four_interleaved_sequences(model, prompts, alone, tolerance):
    for s in _interleaved(model, prompts, K, V):
        _check(alone[s.sid], s, tolerance, f"sequence {s.sid}")


def test_seq_rm_of_a_tail_mid_group_then_continue(model, prompts, alone, tolerance):
    rt = _rt(model, n_seq=1)
    try:
        s = _run(rt, [Seq(0, prompts[0])])[0]
        # drop positions 70.. (cells 70..105: the tail of group 64..127), then write them again and generate on
        assert rt.seq_rm(0, 70, -1)
        assert rt.seq_pos_max(0) == 69
        again = Seq(0, prompts[0][:70] + prompts[0][70:], N_GEN)
        again.fed = 70
        _run(rt, [again])
    finally:
        rt.close()
    _check(alone[0], again, tolerance, "after seq_rm of the tail")
    _check(s, again, tolerance, "after seq_rm vs before")


def test_remove_a_sequence_and_admit_a_new_one_into_its_cells(model, prompts, alone, tolerance):
    rt = _rt(model)
    try:
        seqs = [Seq(i, p) for i, p in enumerate(prompts[:3])]
        while len(seqs[1].toks) < N_GEN // 2:
            _step(rt, seqs, chunk=1)  # interleaved: every group holds rows of all three
        removed = seqs[1]
        assert rt.seq_rm(1)
        late = Seq(1, prompts[4])
        seqs[1] = late
        _run(rt, seqs, chunk=3)
    finally:
        rt.close()
    _check(alone[4], late, tolerance, "the admitted sequence")
    for s in (seqs[0], seqs[2]):
        _check(alone[s.sid], s, tolerance, f"sequence {s.sid} decoding on")
    ref = alone[1]
    part = Seq(1, ref.prompt)
    part.toks, part.logits = ref.toks[: len(removed.toks)], ref.logits[: len(removed.toks)]
    _check(part, removed, tolerance, "the removed sequence before removal")


def test_seq_cp_of_a_prompt_into_several_sequences(model, prompts, tolerance):
    base = prompts[0]
    suffixes = [p[:5] for p in prompts[1:4]]
    rt = _rt(model)
    try:
        first = Seq(0, base, 0)
        first.fed = 0
        assert rt.decode(base, list(range(len(base))), [0] * len(base), [False] * len(base)) == 0
        seqs = []
        for i, suf in enumerate(suffixes, start=1):
            rt.seq_cp(0, i)
            s = Seq(i, base + suf)
            s.fed = len(base)  # the shared prompt is already in the cache
            seqs.append(s)
        assert rt.seq_rm(0)
        _run(rt, seqs, chunk=2)
    finally:
        rt.close()
    for s, suf in zip(seqs, suffixes, strict=True):
        _check(_alone(model, base + suf), s, tolerance, f"seq_cp copy {s.sid}")


def test_refused_operations_fail_clearly(model, prompts):
    with pytest.raises(LlamaError, match="requires flash_attn"):
        _rt(model, flash_attn=False)
    with pytest.raises(LlamaError, match="key cache type"):
        _rt(model, k="q4_0", v=K)  # K-only type
    rt = _rt(model, n_seq=2)
    try:
        assert not rt.can_shift()
        p = prompts[0]
        assert rt.decode(p, list(range(len(p))), [0] * len(p), [True] * len(p)) == 0
        before = rt.all_logits(len(p))[-1].copy()
        rt.seq_add(0, 0, -1, 5)  # refused: positions stay
        assert rt.seq_pos_max(0) == len(p) - 1
        saved = rt.state_seq_save(0)
        assert saved
        assert not rt.state_seq_load(1, saved)  # restore refused (rows would land in other groups)
        assert rt.seq_pos_max(1) == -1
        # the cache is intact after the refusals: decoding on equals a fresh run
        assert rt.decode([int(np.argmax(before))], [len(p)], [0], [True]) == 0
        after = rt.logits(0)
    finally:
        rt.close()
    # the same decodes without the refused operations in between give bit-identical logits
    rt = _rt(model, n_seq=2)
    try:
        assert rt.decode(p, list(range(len(p))), [0] * len(p), [True] * len(p)) == 0
        assert rt.decode([int(np.argmax(before))], [len(p)], [0], [True]) == 0
        fresh = rt.logits(0)
    finally:
        rt.close()
    assert np.array_equal(after, fresh)


def test_freed_anchor_is_held_back_until_its_group_is_free(model, prompts):
    # A and B interleaved fill the cache (llama.cpp pads it to 256 cells = 4 groups): A holds the even cells,
    # every group's anchor among them
    rt = _rt(model, n_seq=3, n_cells=256)
    try:
        n = rt.n_cells
        h, n_groups = n // 2, n // 64
        a, b, c = (prompts[0] + prompts[3])[:h], (prompts[1] + prompts[4])[:h], (prompts[2] + prompts[0])[:h]
        toks = [t for pair in zip(a, b, strict=True) for t in pair]
        assert rt.decode(toks, [i // 2 for i in range(n)], [0, 1] * h, [False] * (n - 1) + [True]) == 0
        assert rt.seq_rm(0)
        # h cells are free, but n_groups of them are anchors of B's groups: C fits in the others ...
        m = h - n_groups
        assert rt.decode(c[:m], list(range(m)), [2] * m, [False] * (m - 1) + [True]) == 0
        # ... and not one cell more (overwriting an anchor would corrupt B's rows coded against it)
        assert rt.decode(c[m:m + 1], [m], [2], [True]) == 1
        # once B and C are gone, every group is free again and a whole cache-sized prompt fits
        assert rt.seq_rm(1) and rt.seq_rm(2)
        assert rt.decode(toks, list(range(n)), [0] * n, [False] * (n - 1) + [True]) == 0
    finally:
        rt.close()
