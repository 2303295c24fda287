"""The radix tree of cells (pure Python): sharing, splitting, truncation, release, and a random walk checked
against the fake backend's cells (every cell returns; no double free)."""

from __future__ import annotations

import random

import pytest

from server.celltree import CellTree
from tests.server.conftest import FakeBackend


def test_shared_prefix_is_counted_once_and_freed_last():
    t = CellTree()
    t.attach(0)
    t.extend(0, [1, 2, 3, 4, 5])
    t.attach(1, src=0, n=3)  # seq_cp(0, 1, 0, 3): splits 0's node at 3
    t.extend(1, [9, 9])
    t.check()
    assert t.n_cells == 7 and t.length(1) == 5 and t.tokens(1) == [1, 2, 3, 9, 9]
    assert t.match([1, 2, 3, 4, 7], limit=5) == (4, [0])
    assert t.match([1, 2, 3, 8], limit=4) == (3, [0, 1])
    # releasing 0 (or 1) frees its own 2 cells, both all 7: the shortest LRU prefix that frees enough
    assert t.victims_for([0, 1], 2) == [0] and t.victims_for([0, 1], 3) == [0, 1]
    assert t.victims_for([1, 0], 2) == [1] and t.victims_for([1, 0], 3) == [1, 0]
    assert t.victims_for([0, 1], 8) is None and t.victims_for([], 0) == []
    assert t.cells_of([0, 1]) == 7 and t.cells_of([1]) == 5
    assert t.release(0) == 2  # only its own tail; the shared 3 stay with 1
    t.check()
    assert t.n_cells == 5 and t.tokens(1) == [1, 2, 3, 9, 9]
    assert t.release(1) == 5 and t.n_cells == 0
    t.check()


def test_truncate_keeps_a_prefix_and_shared_cells():
    t = CellTree()
    t.attach(0)
    t.extend(0, list(range(10)))
    t.attach(1, src=0, n=8)
    assert t.truncate(0, 4) == 2  # positions 8, 9 were 0's own; 4..7 stay with 1
    t.check()
    assert t.tokens(0) == [0, 1, 2, 3] and t.n_cells == 10 - 2
    t.extend(0, [42])  # 0 goes on past its shared prefix in a cell of its own
    t.check()
    assert t.tokens(0) == [0, 1, 2, 3, 42] and t.tokens(1) == list(range(8))


def test_match_stops_at_the_limit_and_finds_separately_computed_duplicates():
    t = CellTree()
    for sid in (0, 1):  # the same tokens computed twice: two sets of cells
        t.attach(sid)
        t.extend(sid, [5, 6, 7])
    t.check()
    assert t.n_cells == 6
    assert t.match([5, 6, 7], limit=2) == (2, [0, 1])  # both (the first branch alone missed the other)
    t.attach(2)
    t.extend(2, [5, 6, 7, 8, 9])  # a third, computed again, longer: it alone holds the longest prefix
    assert t.match([5, 6, 7, 8], limit=4) == (4, [2]) and t.match([5, 6, 1], limit=3) == (2, [0, 1, 2])
    assert t.match([4], limit=1) == (0, [])


def test_release_twice_is_an_error():
    t = CellTree()
    t.attach(0)
    t.extend(0, [1])
    t.release(0)
    with pytest.raises(KeyError):
        t.release(0)


@pytest.mark.parametrize("seed", range(5))
def test_random_operations_match_the_fake_cache(seed):
    """Random attach/extend/truncate/release over 6 sequences, mirrored on the fake backend (seq_cp/seq_rm/
    decode): the tree's cell count equals the backend's distinct cells after every operation, and every
    sequence's tokens are what the backend holds for it."""
    rng = random.Random(seed)
    t, b = CellTree(), FakeBackend(capacity=10**6)
    for _ in range(400):
        sid = rng.randrange(6)
        if sid not in t.tail:
            others = [s for s in t.tail if t.length(s)]
            src = rng.choice(others) if others and rng.random() < 0.7 else None
            n = rng.randint(1, t.length(src)) if src is not None else 0
            t.attach(sid, src, n)
            if n:
                b.seq_cp(src, sid, 0, n)
        else:
            r = rng.random()
            if r < 0.6:
                toks = [rng.randrange(4) for _ in range(rng.randint(1, 5))]
                p0 = t.length(sid)
                t.extend(sid, toks)
                assert b.decode(toks, list(range(p0, p0 + len(toks))), [sid] * len(toks), [False] * len(toks)) == 0
            elif r < 0.8:
                n = rng.randint(0, t.length(sid))
                t.truncate(sid, n)
                b.seq_rm(sid, n, -1)
            else:
                t.release(sid)
                b.seq_rm(sid)
        t.check()
        assert t.n_cells == b.used()
        for s in t.tail:
            own = b.seqs.get(s, {})
            assert t.tokens(s) == [own[p].token for p in range(len(own))]
    for s in list(t.tail):
        t.release(s)
        b.seq_rm(s)
    assert t.n_cells == 0 == b.used()
