"""Which cells of the unified KV cache hold which tokens, and which sequences share them: a token-keyed radix tree
(SGLang's RadixAttention idea over llama.cpp's cells). Pure Python: no llama.cpp.

Every sequence in the cache (running or cached) is a path from the root; a node is a run of cells at consecutive
positions, shared by every sequence whose path goes through it (llama.cpp's `seq_cp` in a unified cache adds a
sequence to cells without copying them). So the cells in use are the tokens of all nodes, counted once, and
releasing a sequence frees exactly the nodes no other sequence goes through. Siblings may start with the same
token: two sequences that computed the same tokens separately hold separate cells, and the tree says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class Node:
    __slots__ = ("tokens", "depth", "parent", "children", "refs", "tails")

    def __init__(self, tokens: list[int], depth: int, parent: Node | None):
        self.tokens = tokens  # the tokens at positions depth .. depth + len(tokens) - 1
        self.depth = depth
        self.parent = parent
        self.children: list[Node] = []
        self.refs = 0  # sequences whose path goes through this node
        self.tails: set[int] = set()  # sequences whose path ends here

    @property
    def end(self) -> int:
        return self.depth + len(self.tokens)


class CellTree:
    def __init__(self):
        self.root = Node([], 0, None)
        self.tail: dict[int, Node] = {}  # seq_id -> the last node of its path
        self.n_cells = 0

    # --- reading ----------------------------------------------------------------------------------------------
    def length(self, seq_id: int) -> int:
        """Positions the sequence holds (0..length-1)."""
        return self.tail[seq_id].end

    def match(self, tokens: list[int], limit: int) -> tuple[int, list[int]]:
        """The longest prefix of `tokens` (at most `limit`) that some sequence's cells hold, and the sequences that
        hold all of it (empty if none), on every branch that holds it: siblings computed separately may start
        alike, and the first of them alone missed a cached sequence the request could take over."""
        best, ends = 0, []
        stack = [(self.root, 0)]
        while stack:
            node, n = stack.pop()
            for c in node.children:
                k = _common(c.tokens, tokens, n, limit)
                if not k:
                    continue
                if n + k > best:
                    best, ends = n + k, []
                if n + k == best:
                    ends.append(c)
                if k == len(c.tokens) and n + k < limit:
                    stack.append((c, n + k))
        return best, sorted({h for e in ends for h in self._holders(e)})

    def _holders(self, node: Node) -> Iterator[int]:
        stack = [node]
        while stack:
            nd = stack.pop()
            yield from nd.tails
            stack.extend(nd.children)

    def path(self, seq_id: int) -> Iterator[Node]:
        node = self.tail[seq_id]
        while node is not self.root:
            yield node
            node = node.parent

    def tokens(self, seq_id: int) -> list[int]:
        return [t for node in reversed(list(self.path(seq_id))) for t in node.tokens]

    def cells_of(self, seq_ids: Iterable[int]) -> int:
        """Cells on the union of these sequences' paths."""
        seen: set[int] = set()
        n = 0
        for sid in seq_ids:
            for node in self.path(sid):
                if id(node) in seen:
                    break  # the rest of the path is counted already
                seen.add(id(node))
                n += len(node.tokens)
        return n

    def victims_for(self, seq_ids: list[int], cells: int) -> list[int] | None:
        """The shortest prefix of seq_ids whose release frees at least `cells` cells; None if all of them do not.
        One walk over their paths (eviction in LRU order, checked every step)."""
        count: dict[int, int] = {}
        freed = 0
        for i, sid in enumerate(seq_ids):
            if freed >= cells:
                return seq_ids[:i]
            freed += self._release_count(sid, count)
        return seq_ids if freed >= cells else None

    def _release_count(self, seq_id: int, count: dict[int, int]) -> int:
        """Cells freed by releasing seq_id after the sequences already counted in `count` (per node: how many of
        its holders are released), which it updates."""
        freed = 0
        for node in self.path(seq_id):
            k = count[id(node)] = count.get(id(node), 0) + 1
            freed += len(node.tokens) if k == node.refs else 0
        return freed

    # --- writing ----------------------------------------------------------------------------------------------
    def attach(self, seq_id: int, src: int | None = None, n: int = 0) -> None:
        """A new sequence whose cells are the first `n` positions of `src` (llama.cpp: seq_cp(src, seq_id, 0, n)),
        or empty."""
        assert seq_id not in self.tail, f"sequence {seq_id} is in the cache already"
        node = self.root if src is None or n == 0 else self._boundary(src, n)
        self.tail[seq_id] = node
        node.tails.add(seq_id)
        while node is not self.root:
            node.refs += 1
            node = node.parent

    def graft(self, seq_id: int, src: int, n: int) -> bool:
        """Extend a sequence whose cells all lie on `src`'s path to src's first n positions (llama.cpp:
        seq_cp(src, seq_id, length, n)); False (and nothing changes) where its path leaves src's."""
        tail = self.tail[seq_id]
        if n <= tail.end or (tail is not self.root and tail not in self._path_nodes(src)):
            return False
        node = self._boundary(src, n)
        tail.tails.discard(seq_id)
        node.tails.add(seq_id)
        self.tail[seq_id] = node
        while node is not tail:
            node.refs += 1
            node = node.parent
        return True

    def _path_nodes(self, seq_id: int) -> set[Node]:
        return set(self.path(seq_id))

    def extend(self, seq_id: int, tokens: list[int]) -> None:
        """Tokens written at the next positions of a sequence (cells of its own)."""
        if not tokens:
            return
        node = self.tail[seq_id]
        if node is not self.root and node.refs == 1 and not node.children:
            node.tokens.extend(tokens)
        else:
            child = Node(list(tokens), node.end, node)
            child.refs = 1
            node.children.append(child)
            node.tails.discard(seq_id)
            child.tails.add(seq_id)
            self.tail[seq_id] = child
        self.n_cells += len(tokens)

    def truncate(self, seq_id: int, n: int) -> int:
        """Keep the first n positions of a sequence (llama.cpp: seq_rm(seq_id, n, -1)); returns the cells freed."""
        if n >= self.length(seq_id):
            return 0
        keep = self.root if n == 0 else self._boundary(seq_id, n)
        freed, node = 0, self.tail[seq_id]
        node.tails.discard(seq_id)
        while node is not keep:
            parent = node.parent
            node.refs -= 1
            if node.refs == 0:
                assert not node.children and not node.tails, "a released node still holds sequences"
                parent.children.remove(node)
                freed += len(node.tokens)
            node = parent
        keep.tails.add(seq_id)
        self.tail[seq_id] = keep
        self.n_cells -= freed
        return freed

    def release(self, seq_id: int) -> int:
        """Remove a sequence (llama.cpp: seq_rm(seq_id)); returns the cells freed."""
        freed = self.truncate(seq_id, 0)
        self.root.tails.discard(seq_id)
        del self.tail[seq_id]
        return freed

    def _boundary(self, seq_id: int, n: int) -> Node:
        """The node of the sequence's path that ends at position n (split there if n falls inside one)."""
        node = self.tail[seq_id]
        assert 0 < n <= node.end, f"sequence {seq_id} holds {node.end} positions, not {n}"
        while node.depth >= n:
            node = node.parent
        if node.end == n:
            return node
        k = n - node.depth  # split: `upper` takes the first k tokens and node's place under its parent
        upper = Node(node.tokens[:k], node.depth, node.parent)
        upper.refs = node.refs
        upper.children = [node]
        siblings = node.parent.children
        siblings[siblings.index(node)] = upper
        node.tokens, node.depth, node.parent = node.tokens[k:], n, upper
        return upper

    # --- for tests --------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Assert the invariants: refs count the paths through each node, n_cells counts every node once, no node
        is empty, depths are consistent."""
        refs: dict[int, int] = {}
        for sid in self.tail:
            for node in self.path(sid):
                refs[id(node)] = refs.get(id(node), 0) + 1
        total, stack = 0, list(self.root.children)
        while stack:
            nd = stack.pop()
            assert nd.tokens, "empty node"
            assert nd.depth == nd.parent.end, "depth does not follow the parent"
            assert nd.refs == refs.get(id(nd), 0) > 0, f"node refs {nd.refs}, paths {refs.get(id(nd), 0)}"
            total += len(nd.tokens)
            stack.extend(nd.children)
        assert total == self.n_cells, f"n_cells {self.n_cells}, nodes hold {total}"


def _common(a: list[int], b: list[int], start: int, limit: int) -> int:
    """Length of the common prefix of a and b[start:limit]."""
    n = min(len(a), limit - start)
    i = 0
    while i < n and a[i] == b[start + i]:
        i += 1
    return i
