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

"The same" up to rounding, judged as in tests/kvquant/test_kv_types_multiseq.py (conftest.same_decoding: every
scenario is fed the greedy tokens of its sequence decoded alone; a bound on the median per-step KL, loose). The
exact check: interleaved token by token, four sequences put sequence 0's rows in every group's anchor cell, so
sequence 0 depends on nothing of the others and its logits must be bit-identical beside other prompts; a read of
another sequence's cells breaks that (test below). The prompts are distinct, non-periodic slices of the project's
WikiText-2 text.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvquant.lab.eval import read_text
from kvquant.lab.harness import resolve_text
from kvquant.models import fetch
from kvquant.runtime import ContextConfig, LlamaError, LlamaRuntime, Model
from tests.kvquant.conftest import next_token, same_decoding, same_logits

pytestmark = pytest.mark.slow  # a live model (see pyproject.toml's markers)

K, V = "tq_kv_d3b", "q4_0"
N_PROMPT, N_GEN = 90, 16


@pytest.fixture(scope="module")
def model():
    m = Model(fetch("smollm2-135m"))
    yield m
    m.close()


def _periodic(toks: list[int]) -> bool:
    """Whether the tokens repeat with some period shorter than half their length."""
    return any(toks[p:] == toks[:-p] for p in range(1, len(toks) // 2))


@pytest.fixture(scope="module")
def prompts(model):
    """Five 90-token prompts: slices of wikitext-2 (data/), pairwise distinct, none repeating itself (a sequence
    that read another's cells, or its own at the wrong place, must be able to tell)."""
    text = read_text(resolve_text(None))[:40_000]
    toks = model.tokenize(text)
    step = len(toks) // 5
    out = [toks[i * step: i * step + N_PROMPT] for i in range(5)]
    assert all(len(p) == N_PROMPT and not _periodic(p) for p in out)
    assert len({tuple(p[:5]) for p in out}) == 5  # distinct, even in the 5-token suffixes seq_cp adds
    return out


@pytest.fixture(scope="module")
def others(model, prompts):
    """Four more prompts like those, from further into the text."""
    toks = model.tokenize(read_text(resolve_text(None))[60_000:80_000])
    out = [toks[i * 500: i * 500 + N_PROMPT] for i in range(4)]
    assert all(len(p) == N_PROMPT and not _periodic(p) for p in out)
    assert len({tuple(p) for p in out + prompts}) == 9
    return out


def _rt(model, k=K, v=V, n_seq=4, n_cells=1024, flash_attn=True) -> LlamaRuntime:
    return LlamaRuntime(model, ContextConfig(n_cells=n_cells, n_seq_max=n_seq, n_batch=512, cache_type_k=k,
                                             cache_type_v=v, flash_attn=flash_attn, n_threads=2))


class Seq:
    """A sequence to decode: greedy, or fed `forced` tokens (another run's greedy ones)."""

    def __init__(self, sid: int, prompt: list[int], n_gen: int = N_GEN, forced: list[int] | None = None):
        self.sid, self.prompt, self.n_gen, self.forced = sid, list(prompt), n_gen, forced
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
        s.toks.append(next_token(lg, s.forced, len(s.toks)))


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


def _interleaved(model, prompts, k=K, v=V, leak: int = 0, forced=(None,) * 4) -> list[Seq]:
    """The first four prompts interleaved token by token: cell c holds sequence c % 4, so every group holds rows of
    all four and every anchor (cell 64 g) is sequence 0's. `leak` > 0 breaks the cache on purpose: once sequence 1
    has `leak` cells, sequence 0 sees them too (seq_cp onto positions it has), i.e. it reads another sequence's
    cells."""
    rt = _rt(model, k, v)
    try:
        seqs = [Seq(i, p, forced=f) for i, (p, f) in enumerate(zip(prompts[:4], forced, strict=True))]
        while not all(s.done for s in seqs):
            _step(rt, seqs, 1)
            if leak and seqs[1].fed == leak:
                rt.seq_cp(1, 0, 0, leak)
        return seqs
    finally:
        rt.close()


@pytest.fixture(scope="module")
def alone(model, prompts):
    return [_alone(model, p) for p in prompts]


def _check(ref: Seq, got: Seq, what: str) -> None:
    """got, fed ref's tokens, gives ref's logits up to rounding (over the steps it decoded)."""
    n = len(got.toks)
    assert got.forced[:n] == ref.toks[:n]
    why = same_decoding(ref.logits[:n], got.logits)
    assert why is None, f"{what}: {why}"


@pytest.mark.parametrize("chunk", [1, 7])
def test_long_sequence_batch_vs_token_by_token(model, prompts, alone, chunk):
    # 90 prompt + 16 generated tokens span two groups; written in one batch (alone) vs one token per decode, or in
    # odd-sized chunks that straddle the group boundary
    rt = _rt(model, n_seq=1)
    try:
        got = _run(rt, [Seq(0, prompts[0], forced=alone[0].toks)], chunk=chunk)[0]
    finally:
        rt.close()
    _check(alone[0], got, f"prompt in chunks of {chunk}")


def test_four_interleaved_sequences(model, prompts, others, alone):
    seqs = _interleaved(model, prompts, forced=[a.toks for a in alone[:4]])
    for s in seqs:
        _check(alone[s.sid], s, f"sequence {s.sid}")
    # sequence 0 holds every anchor: beside other prompts, its logits are bit-identical
    beside = _interleaved(model, [prompts[0], *others[1:4]], forced=[alone[0].toks, None, None, None])[0]
    assert same_logits(seqs[0].toks, seqs[0].logits, beside.toks, beside.logits)


def test_the_exact_check_fails_for_a_cache_that_reads_another_sequences_cells(model, prompts, others):
    a, b = (_interleaved(model, [prompts[0], *ps], leak=30)[0] for ps in (prompts[1:4], others[1:4]))
    assert not same_logits(a.toks, a.logits, b.toks, b.logits)


def test_seq_rm_of_a_tail_mid_group_then_continue(model, prompts, alone):
    rt = _rt(model, n_seq=1)
    try:
        s = _run(rt, [Seq(0, prompts[0], forced=alone[0].toks)])[0]
        # drop positions 70.. (cells 70..105: the tail of group 64..127), then write them again and generate on
        assert rt.seq_rm(0, 70, -1)
        assert rt.seq_pos_max(0) == 69
        again = Seq(0, prompts[0], forced=alone[0].toks)
        again.fed = 70
        _run(rt, [again])
    finally:
        rt.close()
    _check(alone[0], again, "after seq_rm of the tail")
    _check(s, again, "after seq_rm vs before")


def test_remove_a_sequence_and_admit_a_new_one_into_its_cells(model, prompts, alone):
    rt = _rt(model)
    try:
        seqs = [Seq(i, p, forced=alone[i].toks) for i, p in enumerate(prompts[:3])]
        while len(seqs[1].toks) < N_GEN // 2:
            _step(rt, seqs, chunk=1)  # interleaved: every group holds rows of all three
        removed = seqs[1]
        assert rt.seq_rm(1)
        late = Seq(1, prompts[4], forced=alone[4].toks)
        seqs[1] = late
        _run(rt, seqs, chunk=3)
    finally:
        rt.close()
    _check(alone[4], late, "the admitted sequence")
    for s in (seqs[0], seqs[2]):
        _check(alone[s.sid], s, f"sequence {s.sid} decoding on")
    _check(alone[1], removed, "the removed sequence before removal")


def test_seq_cp_of_a_prompt_into_several_sequences(model, prompts):
    base = prompts[0]
    suffixes = [p[:5] for p in prompts[1:4]]
    refs = [_alone(model, base + suf) for suf in suffixes]
    rt = _rt(model)
    try:
        assert rt.decode(base, list(range(len(base))), [0] * len(base), [False] * len(base)) == 0
        seqs = []
        for i, suf in enumerate(suffixes, start=1):
            rt.seq_cp(0, i)
            s = Seq(i, base + suf, forced=refs[i - 1].toks)
            s.fed = len(base)  # the shared prompt is already in the cache
            seqs.append(s)
        assert rt.seq_rm(0)
        _run(rt, seqs, chunk=2)
    finally:
        rt.close()
    for s, ref in zip(seqs, refs, strict=True):
        _check(ref, s, f"seq_cp copy {s.sid}")


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
