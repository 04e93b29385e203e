"""Draft token trees: growth, re-rooting, merging, masks and positions.

Theory of operation
-------------------
A `DraftTree` is five parallel integer/float arrays indexed by *tree index*. Index 0 is the root:
the token sampled last, not yet in any stage's KV. Three invariants hold for every tree this module
builds or returns, and `DraftTree.__post_init__` asserts them:

1. Topological order: `parents[0] == -1` and `parents[i] < i` for every other node, so every prefix
   of the node order is an ancestor-closed subtree containing the root.
2. Positions are absolute: `positions[i] == positions[parents[i]] + 1`, the root sits at the
   committed length. Re-rooting and merging never rewrite a position.
3. Node ids are stable and strictly increasing along the tree order. Stages key their KV entries by
   id, so an id never changes meaning and is never reused within a request.

Rule: nothing here knows about stages, segments or time. These are pure functions on arrays; the
only model-dependent step, "top-k next tokens for these nodes", is the `Drafter` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

IntArray = np.ndarray  # int64 arrays; a named alias keeps the shape comments readable
FloatArray = np.ndarray


class Drafter(Protocol):
    """The draft model, as the core sees it."""

    def propose(
        self, context: IntArray, pool: DraftTree, frontier: IntArray, k: int
    ) -> tuple[IntArray, FloatArray]:
        """Top-k next tokens [n, k] and their log-probs [n, k] for each of the n frontier nodes.

        `context` holds the committed tokens before `pool`'s root; a frontier node's full context is
        `context` followed by the tokens on its path from the root. Tokens in a row must be distinct.
        """
        ...


@dataclass(frozen=True, slots=True, eq=False)
class DraftTree:
    ids: IntArray  # [n] stable node ids, strictly increasing
    tokens: IntArray  # [n]
    parents: IntArray  # [n] tree index of the parent; -1 for the root
    positions: IntArray  # [n] absolute positions; the root's is the committed length
    scores: FloatArray  # [n] cumulative draft log-prob from the root (root: 0)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        assert n >= 1, "a tree has at least its root"
        for name in ("ids", "parents", "positions", "scores"):
            assert len(getattr(self, name)) == n, f"{name} has {len(getattr(self, name))} rows, tokens {n}"
        assert self.parents[0] == -1, "node 0 must be the root"
        if n > 1:
            idx = np.arange(1, n)
            assert ((self.parents[1:] >= 0) & (self.parents[1:] < idx)).all(), "not topological"
            assert (self.positions[1:] == self.positions[self.parents[1:]] + 1).all(), "bad positions"
            assert (np.diff(self.ids) > 0).all(), "ids must increase along the tree order"

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depths(self) -> IntArray:
        """[n] depth below the root (root 0)."""
        return self.positions - self.positions[0]

    def children(self, i: int) -> IntArray:
        """Tree indices of node i's children, in tree order."""
        return np.flatnonzero(self.parents == i)

    def path(self, i: int) -> IntArray:
        """Tree indices from the root to node i, root first."""
        out = []
        while i >= 0:
            out.append(i)
            i = int(self.parents[i])
        return np.array(out[::-1], dtype=np.int64)

    def take(self, idx: IntArray) -> DraftTree:
        """The sub-tree of nodes `idx` (ascending, ancestor-closed, starting at the new root).

        Parents are remapped to the new indices and scores made relative to the new root.
        """
        idx = np.asarray(idx, dtype=np.int64)
        remap = np.full(len(self), -1, dtype=np.int64)
        remap[idx] = np.arange(len(idx))
        parents = remap[self.parents[idx]]
        parents[0] = -1
        assert (parents[1:] >= 0).all(), "take() needs an ancestor-closed index set"
        return DraftTree(
            ids=self.ids[idx],
            tokens=self.tokens[idx],
            parents=parents,
            positions=self.positions[idx],
            scores=self.scores[idx] - self.scores[idx[0]],
        )


def root_only(token: int, position: int, node_id: int) -> DraftTree:
    """A tree holding just its root (what `ar-pp` verifies every step)."""
    return DraftTree(
        ids=np.array([node_id], dtype=np.int64),
        tokens=np.array([token], dtype=np.int64),
        parents=np.array([-1], dtype=np.int64),
        positions=np.array([position], dtype=np.int64),
        scores=np.zeros(1),
    )


def _level_order(depths: IntArray) -> list[IntArray]:
    """Tree indices grouped by depth: parents of level d all lie in level d-1."""
    return [np.flatnonzero(depths == d) for d in range(1, int(depths.max(initial=0)) + 1)]


def ancestor_mask(parents: IntArray) -> np.ndarray:
    """[n, n] bool: row i marks node i and all its ancestors (the tree attention mask).

    >>> ancestor_mask(np.array([-1, 0, 0, 1])).astype(int).tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    """
    n = len(parents)
    mask = np.eye(n, dtype=bool)
    # Rows in topological order: a parent's row is final before any child reads it.
    for i in range(1, n):
        mask[i] |= mask[parents[i]]
    return mask


def descendant_mask(parents: IntArray, node: int) -> np.ndarray:
    """[n] bool: `node` and every node below it."""
    out = np.zeros(len(parents), dtype=bool)
    out[node] = True
    for i in range(node + 1, len(parents)):
        out[i] = out[parents[i]]
    return out


def _checked(tokens: IntArray, logp: FloatArray, n: int, k: int) -> tuple[IntArray, FloatArray]:
    """A drafter's answer as arrays, after checking the protocol: [n, k], distinct rows, log-probs <= 0."""
    tokens = np.asarray(tokens, dtype=np.int64)
    logp = np.asarray(logp, dtype=np.float64)
    assert tokens.shape == (n, k) and logp.shape == (n, k), (tokens.shape, logp.shape, (n, k))
    assert (logp <= 0).all(), "log-probs must be <= 0"
    for row in tokens:
        assert len(set(row.tolist())) == k, f"duplicate proposals {row.tolist()}"
    return tokens, logp


def grow(
    drafter: Drafter,
    context: IntArray,
    root_token: int,
    root_position: int,
    *,
    depth: int,
    topk: int,
    total: int,
    order: str = "score",
) -> DraftTree:
    """Grow an EAGLE-2 tree from `root_token`: a beam of `topk` per depth, re-ranked to `total` nodes.

    Layer 1 is the root's top-k. Then `depth` times: each of the k frontier nodes proposes its top-k
    children (k² candidates, all kept in the pool, scored by cumulative log-prob) and the best k
    form the next frontier. Finally the root and the best `total` pool nodes are kept. Scores never
    increase along a path and ties go to the lower pool index (a parent precedes its children), so
    the kept set is ancestor-closed. `order="score"` sorts it by score (FlowSpec's verification
    order); `order="pool"` keeps layer order (EAGLE's, used by the chunked baselines). Both are
    topological. Ids are 0..n-1; the caller renumbers them.

    Example with k=2, depth=1, total=3 and a drafter that proposes (a: -0.1, b: -1.0) at the root,
    (c: -0.2, d: -3.0) under a and (e: -0.5, f: -0.6) under b: the pool scores are a -0.1, b -1.0,
    ac -0.3, ad -3.1, be -1.5, bf -1.6; the best three are a, ac, b, giving tokens
    [root, a, ac, b] in score order with parents [-1, 0, 1, 0].
    """
    assert topk >= 1 and depth >= 0 and total >= 0
    tokens = [root_token]
    parents = [-1]
    positions = [root_position]
    scores = [0.0]
    if total > 0:
        frontier = np.array([0], dtype=np.int64)
        for _ in range(depth + 1):
            pool = DraftTree(
                ids=np.arange(len(tokens), dtype=np.int64),
                tokens=np.array(tokens, dtype=np.int64),
                parents=np.array(parents, dtype=np.int64),
                positions=np.array(positions, dtype=np.int64),
                scores=np.array(scores),
            )
            cand_tokens, cand_logp = drafter.propose(context, pool, frontier, topk)
            cand_tokens, cand_logp = _checked(cand_tokens, cand_logp, len(frontier), topk)  # [f, k]
            first = len(tokens)
            cand_scores = pool.scores[frontier][:, None] + cand_logp  # [f, k]
            tokens.extend(cand_tokens.ravel().tolist())
            parents.extend(np.repeat(frontier, topk).tolist())
            positions.extend(np.repeat(pool.positions[frontier] + 1, topk).tolist())
            scores.extend(cand_scores.ravel().tolist())
            # Beam: stable sort on -score keeps the lower pool index first on ties.
            best = np.argsort(-cand_scores.ravel(), kind="stable")[:topk]
            frontier = first + np.sort(best)
    score_arr = np.array(scores)
    rank = np.lexsort((np.arange(len(score_arr)), -score_arr))  # score desc, pool index asc
    assert rank[0] == 0, "the root ranks first"
    kept = rank[: total + 1]
    if order == "pool":
        kept = np.sort(kept)
    else:
        assert order == "score", order
    parents_arr = np.array(parents, dtype=np.int64)
    chosen = np.zeros(len(score_arr), dtype=bool)
    chosen[kept] = True
    assert chosen[parents_arr[kept[1:]]].all(), "selection must be ancestor-closed"
    remap = np.full(len(score_arr), -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    new_parents = remap[parents_arr[kept]]
    new_parents[0] = -1
    # In score order a parent always ranks before its child, so this stays topological.
    return DraftTree(
        ids=np.arange(len(kept), dtype=np.int64),
        tokens=np.array(tokens, dtype=np.int64)[kept],
        parents=new_parents,
        positions=np.array(positions, dtype=np.int64)[kept],
        scores=score_arr[kept],
    )


def grow_layer(
    drafter: Drafter, context: IntArray, tree: DraftTree, *, width: int, next_id: int
) -> tuple[DraftTree, int]:
    """PipeDec's step: append the `width` best children of the tree's deepest layer.

    Every node of the deepest layer proposes `width` children; the best `width` of them by
    cumulative score (ties to the lower candidate index) are appended in score order, with ids from
    `next_id` on. The deepest layer has no children yet, so nothing can duplicate an existing path.
    Returns the grown tree and the number of appended nodes.

    Example: a root-only tree and a drafter proposing (a: -0.1, b: -0.7) with width 2 appends
    [a, b] under the root; one more call with (c: -0.2, d: -0.3) under a and (e: -0.1, f: -0.9)
    under b keeps ac (-0.3) and ad (-0.4).
    """
    depths = tree.depths
    frontier = np.flatnonzero(depths == depths.max())
    cand_tokens, cand_logp = drafter.propose(context, tree, frontier, width)
    cand_tokens, cand_logp = _checked(cand_tokens, cand_logp, len(frontier), width)  # [f, width]
    cand_scores = tree.scores[frontier][:, None] + cand_logp
    best = np.argsort(-cand_scores.ravel(), kind="stable")[:width]
    parents = np.repeat(frontier, width)[best]
    return (
        DraftTree(
            ids=np.concatenate([tree.ids, next_id + np.arange(len(best))]),
            tokens=np.concatenate([tree.tokens, cand_tokens.ravel()[best]]),
            parents=np.concatenate([tree.parents, parents]),
            positions=np.concatenate([tree.positions, tree.positions[parents] + 1]),
            scores=np.concatenate([tree.scores, cand_scores.ravel()[best]]),
        ),
        len(best),
    )


def grow_best(
    drafter: Drafter, context: IntArray, tree: DraftTree, *, width: int, next_id: int
) -> tuple[DraftTree, int]:
    """SpecPipe's step: append the `width` best new nodes found anywhere in the tree.

    Every node with fewer than `width` children proposes its `width` best children; the candidates
    already in the tree are dropped, and the best `width` of the rest by cumulative score (ties to
    the lower candidate index: tree order, then rank) are appended in score order, with ids from
    `next_id` on. Unlike `grow_layer`, a shallow node's second-best child can beat a deep node's
    best, so the window is not one layer per step. Returns the grown tree and the number appended.

    Example, width 2: a root-only tree, the root proposing (a: -0.1, b: -0.7), appends [a, b]. Then
    a proposes (c: -0.2, d: -0.9) and b (e: -0.1, f: -0.9): ac (-0.3) and be (-0.8) are appended.
    Then the root (two children) is not asked; a proposes (c, d) again, but ac is in the tree, so
    ad (-1.0) is its candidate; with e proposing (j: -0.1, k: -0.5) and c (h: -0.9, i: -1.2),
    the best new nodes are bej (-0.9) and ad (-1.0): a depth-2 node beside a depth-3 one.
    """
    n_children = np.bincount(tree.parents[1:], minlength=len(tree))
    frontier = np.flatnonzero(n_children < width)
    cand_tokens, cand_logp = drafter.propose(context, tree, frontier, width)
    cand_tokens, cand_logp = _checked(cand_tokens, cand_logp, len(frontier), width)  # [f, width]
    cand_scores = (tree.scores[frontier][:, None] + cand_logp).ravel()
    parents = np.repeat(frontier, width)
    tokens = cand_tokens.ravel()
    present = set(zip(tree.parents[1:].tolist(), tree.tokens[1:].tolist()))
    new = np.fromiter(((p, t) not in present for p, t in zip(parents.tolist(), tokens.tolist())), bool, len(tokens))
    ranked = np.argsort(-cand_scores, kind="stable")
    best = ranked[new[ranked]][:width]
    parents = parents[best]
    return (
        DraftTree(
            ids=np.concatenate([tree.ids, next_id + np.arange(len(best))]),
            tokens=np.concatenate([tree.tokens, tokens[best]]),
            parents=np.concatenate([tree.parents, parents]),
            positions=np.concatenate([tree.positions, tree.positions[parents] + 1]),
            scores=np.concatenate([tree.scores, cand_scores[best]]),
        ),
        len(best),
    )


def reroot(tree: DraftTree, new_root: int) -> tuple[DraftTree, IntArray]:
    """The sub-tree under `new_root`, and the old indices it kept (ascending, new root first).

    >>> t = DraftTree(ids=np.arange(5), tokens=np.array([7, 8, 9, 10, 11]),
    ...               parents=np.array([-1, 0, 0, 1, 2]), positions=np.array([5, 6, 6, 7, 7]),
    ...               scores=np.array([0.0, -0.1, -0.2, -0.3, -0.4]))
    >>> sub, kept = reroot(t, 2)
    >>> kept.tolist(), sub.parents.tolist(), sub.positions.tolist(), sub.scores.tolist()
    ([2, 4], [-1, 0], [6, 7], [0.0, -0.2])
    """
    kept = np.flatnonzero(descendant_mask(tree.parents, new_root))
    return tree.take(kept), kept


def merge(base: DraftTree, fresh: DraftTree, next_id: int) -> tuple[DraftTree, int]:
    """Append `fresh`'s nodes whose token path is not already in `base`; existing nodes never move.

    Both trees share the root. A fresh node whose path from the root exists in `base` maps onto that
    base node; every other fresh node is appended after all base nodes, in `fresh` order, with ids
    from `next_id` on. Returns the merged tree and the number of appended nodes (the next segment).

    Example: base = root→a, root→b; fresh = root→a→c, root→d (fresh order a, d, c).
    a maps onto base's a; d and c are appended: tokens [r, a, b, d, c], parents [-1, 0, 0, 0, 1].
    """
    assert base.tokens[0] == fresh.tokens[0] and base.positions[0] == fresh.positions[0], (
        "merge needs a shared root"
    )
    n_base = len(base)
    child_of = {(int(p), int(t)): i for i, (p, t) in enumerate(zip(base.parents, base.tokens))}
    where = np.full(len(fresh), -1, dtype=np.int64)  # fresh index -> merged index
    where[0] = 0
    appended: list[int] = []
    new_parents: list[int] = []
    for i in range(1, len(fresh)):
        parent = int(where[fresh.parents[i]])
        hit = child_of.get((parent, int(fresh.tokens[i]))) if parent < n_base else None
        if hit is not None:
            where[i] = hit
        else:
            where[i] = n_base + len(appended)
            appended.append(i)
            new_parents.append(parent)
    if not appended:
        return base, 0
    add = np.array(appended, dtype=np.int64)
    merged = DraftTree(
        ids=np.concatenate([base.ids, next_id + np.arange(len(add))]),
        tokens=np.concatenate([base.tokens, fresh.tokens[add]]),
        parents=np.concatenate([base.parents, np.array(new_parents, dtype=np.int64)]),
        positions=np.concatenate([base.positions, fresh.positions[add]]),
        scores=np.concatenate([base.scores, fresh.scores[add]]),
    )
    return merged, len(add)
