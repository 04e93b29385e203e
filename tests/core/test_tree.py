"""Draft trees: literal arrays worked out by hand, then properties over random trees.

Literal tests use dyadic log-probs (multiples of 1/16) wherever a score is compared, so every sum is
exact in float64 and a tie in the test is a tie in the code. Property tests draw random topological
trees and check the invariants `flowspec/tree.py` promises: topological order, ancestor-closed
prefixes, absolute positions that never move, stable ids, and exactly-once token paths.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowspec.tree import (
    DraftTree,
    ancestor_mask,
    descendant_mask,
    grow,
    grow_best,
    grow_layer,
    merge,
    reroot,
    root_only,
)

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

Script = dict[tuple[int, ...], list[tuple[int, float]]]


class ScriptedDrafter:
    """Proposals looked up by the frontier node's token path (root token first).

    A path missing from the script raises KeyError, so a test fails loudly if the code expands a
    node it should have cut from the beam. Every call is logged as (context, [paths]).
    """

    def __init__(self, script: Script) -> None:
        self.script = script
        self.calls: list[tuple[np.ndarray, list[tuple[int, ...]]]] = []

    def propose(
        self, context: np.ndarray, pool: DraftTree, frontier: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        paths = [tuple(pool.tokens[pool.path(int(i))].tolist()) for i in frontier]
        self.calls.append((context, paths))
        rows = [self.script[p][:k] for p in paths]
        tokens = np.array([[t for t, _ in row] for row in rows], dtype=np.int64)  # [n, k]
        logp = np.array([[lp for _, lp in row] for row in rows], dtype=np.float64)  # [n, k]
        return tokens, logp


def tree(
    tokens: list[int],
    parents: list[int],
    root_position: int,
    scores: list[float] | None = None,
    ids: list[int] | None = None,
) -> DraftTree:
    """A DraftTree from literal lists; positions derived from parents (root_position + depth)."""
    positions = [root_position]
    for p in parents[1:]:
        positions.append(positions[p] + 1)
    n = len(tokens)
    return DraftTree(
        ids=np.array(ids if ids is not None else range(n), dtype=np.int64),
        tokens=np.array(tokens, dtype=np.int64),
        parents=np.array(parents, dtype=np.int64),
        positions=np.array(positions, dtype=np.int64),
        scores=np.array(scores if scores is not None else [0.0] * n, dtype=np.float64),
    )


def token_path(t: DraftTree, i: int) -> tuple[int, ...]:
    return tuple(t.tokens[t.path(i)].tolist())


def all_paths(t: DraftTree) -> list[tuple[int, ...]]:
    return [token_path(t, i) for i in range(len(t))]


def is_ancestor_closed(parents: np.ndarray, idx: np.ndarray) -> bool:
    """True iff `idx` contains the root and the parent of each of its non-root nodes."""
    chosen = set(np.asarray(idx).tolist())
    return 0 in chosen and all(int(parents[i]) in chosen for i in chosen if i != 0)


def rows(t: DraftTree) -> list[tuple[int, int, int, int, float]]:
    """(id, token, parent, position, score) per node, for whole-tree comparisons."""
    return list(
        zip(
            t.ids.tolist(), t.tokens.tolist(), t.parents.tolist(), t.positions.tolist(),
            t.scores.tolist(), strict=True,
        )
    )


# ---------------------------------------------------------------------------------------------
# DraftTree basics
# ---------------------------------------------------------------------------------------------

# The running example for the basics: six nodes, two branches.
#
#   0 (tok 40, pos 7)
#   ├── 1 (tok 41)
#   │   └── 3 (tok 43)
#   │       └── 4 (tok 44)
#   └── 2 (tok 42)
#       └── 5 (tok 45)
PARENTS6 = [-1, 0, 0, 1, 3, 2]


def six() -> DraftTree:
    return tree([40, 41, 42, 43, 44, 45], PARENTS6, root_position=7,
                scores=[0.0, -0.25, -0.5, -0.75, -1.0, -1.5], ids=[3, 5, 6, 9, 10, 12])


def test_path_children_depths_on_literal_tree() -> None:
    """path() walks root→node, children() lists tree order, depths are positions minus the root's."""
    t = six()
    assert t.path(0).tolist() == [0]
    assert t.path(4).tolist() == [0, 1, 3, 4]
    assert t.path(5).tolist() == [0, 2, 5]
    assert t.children(0).tolist() == [1, 2]
    assert t.children(1).tolist() == [3]
    assert t.children(4).tolist() == []
    # positions = 7 + depth: [7, 8, 8, 9, 10, 9]
    assert t.positions.tolist() == [7, 8, 8, 9, 10, 9]
    assert t.depths.tolist() == [0, 1, 1, 2, 3, 2]
    assert len(t) == 6


def test_take_remaps_parents_and_rebases_scores() -> None:
    """take() of an ancestor-closed index set renumbers parents and makes scores root-relative.

    take([1, 3, 4]): remap 1→0, 3→1, 4→2; old parents [0, 1, 3] → [-1, 0, 1].
    Scores [-0.25, -0.75, -1.0] minus the new root's -0.25 → [0.0, -0.5, -0.75].
    Ids, tokens and (absolute) positions are copied unchanged.
    """
    sub = six().take(np.array([1, 3, 4]))
    assert rows(sub) == [(5, 41, -1, 8, 0.0), (9, 43, 0, 9, -0.5), (10, 44, 1, 10, -0.75)]


def test_take_rejects_a_set_that_is_not_ancestor_closed() -> None:
    """take([0, 3]) drops node 3's parent 1, so the sub-tree would be disconnected."""
    with pytest.raises(AssertionError):
        six().take(np.array([0, 3]))


def test_root_only() -> None:
    """root_only is the one-node tree with score 0 at the given position and id."""
    t = root_only(token=9, position=12, node_id=4)
    assert rows(t) == [(4, 9, -1, 12, 0.0)]
    assert t.depths.tolist() == [0]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("parents", [-1, 0, 2]),  # node 2 is its own parent: not topological
        ("parents", [0, 0, 1]),  # node 0 is not a root
        ("positions", [5, 6, 6]),  # node 2 sits at its parent's position, not parent + 1
        ("ids", [0, 2, 2]),  # ids must strictly increase
        ("scores", [0.0, -1.0]),  # wrong row count
    ],
)
def test_draft_tree_asserts_its_invariants(field: str, value: list[float]) -> None:
    """The constructor refuses trees that break topology, positions, id order or row counts."""
    good = {
        "ids": [0, 1, 2], "tokens": [1, 2, 3], "parents": [-1, 0, 1],
        "positions": [5, 6, 7], "scores": [0.0, -1.0, -2.0],
    }
    DraftTree(**{k: np.array(v) for k, v in good.items()})  # the baseline is valid
    good[field] = value
    with pytest.raises(AssertionError):
        DraftTree(**{k: np.array(v) for k, v in good.items()})


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def test_ancestor_mask_docstring_example() -> None:
    """Row i marks i and its ancestors: parents [-1, 0, 0, 1]."""
    assert ancestor_mask(np.array([-1, 0, 0, 1])).astype(int).tolist() == [
        [1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1],
    ]


def test_ancestor_mask_literal_matrix() -> None:
    """The tree attention mask of the six-node example, row by row.

    Paths: 0:[0]  1:[0,1]  2:[0,2]  3:[0,1,3]  4:[0,1,3,4]  5:[0,2,5].
    """
    assert ancestor_mask(np.array(PARENTS6)).astype(int).tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 1, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ]


def test_ancestor_mask_root_only() -> None:
    """A one-node tree attends to itself only."""
    assert ancestor_mask(np.array([-1])).tolist() == [[True]]


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        (0, [1, 1, 1, 1, 1, 1]),  # everything hangs below the root
        (1, [0, 1, 0, 1, 1, 0]),  # 1 → 3 → 4
        (2, [0, 0, 1, 0, 0, 1]),  # 2 → 5
        (3, [0, 0, 0, 1, 1, 0]),
        (5, [0, 0, 0, 0, 0, 1]),  # a leaf: itself only
    ],
)
def test_descendant_mask_literal(node: int, expected: list[int]) -> None:
    """descendant_mask marks the node and its whole sub-tree (what reroot keeps)."""
    assert descendant_mask(np.array(PARENTS6), node).astype(int).tolist() == expected


# ---------------------------------------------------------------------------------------------
# grow
# ---------------------------------------------------------------------------------------------

# Tokens of the docstring example: r=0, a=1, b=2, c=3, d=4, e=5, f=6.
DOC_SCRIPT: Script = {
    (0,): [(1, -0.1), (2, -1.0)],
    (0, 1): [(3, -0.2), (4, -3.0)],
    (0, 2): [(5, -0.5), (6, -0.6)],
}


def test_grow_docstring_example_score_order() -> None:
    """grow's docstring: k=2, depth=1, total=3 keeps a, ac, b, in score order.

    Pool scores: a -0.1, b -1.0, ac -0.3, ad -3.1, be -1.5, bf -1.6.
    Best three: a (-0.1), ac (-0.3), b (-1.0) → tokens [r, a, c, b], parents [-1, 0, 1, 0].
    Root at position 10: positions [10, 11, 12, 11]. Ids are 0..3.
    """
    drafter = ScriptedDrafter(DOC_SCRIPT)
    context = np.array([7, 7, 7])
    t = grow(drafter, context, 0, 10, depth=1, topk=2, total=3)
    assert t.tokens.tolist() == [0, 1, 3, 2]
    assert t.parents.tolist() == [-1, 0, 1, 0]
    assert t.positions.tolist() == [10, 11, 12, 11]
    assert t.ids.tolist() == [0, 1, 2, 3]
    assert t.scores.tolist() == pytest.approx([0.0, -0.1, -0.3, -1.0])
    # Two drafter calls: the root, then the beam {a, b}; the context is passed through untouched.
    assert [paths for _, paths in drafter.calls] == [[(0,)], [(0, 1), (0, 2)]]
    assert all(ctx is context for ctx, _ in drafter.calls)


def test_grow_docstring_example_pool_order() -> None:
    """order="pool" keeps the same set in pool (layer) order: r, a, b, ac; parents [-1, 0, 0, 1]."""
    t = grow(ScriptedDrafter(DOC_SCRIPT), np.array([7]), 0, 10, depth=1, topk=2, total=3,
             order="pool")
    assert t.tokens.tolist() == [0, 1, 2, 3]
    assert t.parents.tolist() == [-1, 0, 0, 1]
    assert t.positions.tolist() == [10, 11, 11, 12]
    assert t.scores.tolist() == pytest.approx([0.0, -0.1, -1.0, -0.3])


# A three-layer script (depth=2, topk=2) with a zero log-prob tie and a beam cut. Root token 100.
#
# pool idx  token  parent  score                         note
#   0        100    -1      0
#   1          1     0      0        (logp 0: ties the root)
#   2          2     0     -0.5
#   3          3     1      0        (logp 0: ties its parent 1 and the root)
#   4          4     1     -2.0      beam cut at layer 2: not expanded
#   5          5     2     -0.625    = -0.5 - 0.125
#   6          6     2     -0.75     = -0.5 - 0.25; beam cut at layer 2: not expanded
#   7          7     3     -0.25
#   8          8     3     -0.375
#   9          9     5     -0.6875   = -0.625 - 0.0625
#  10         10     5     -1.625    = -0.625 - 1.0
#
# Layer-2 beam: candidates 3 (0), 4 (-2), 5 (-0.625), 6 (-0.75) → top two are 3 and 5.
# The script has no entry for paths (100, 1, 4) or (100, 2, 6): expanding them raises KeyError.
# Rank by (score desc, pool index asc): 0, 1, 3, 7, 8, 2, 5, 9, 6, 10, 4.
TIE_SCRIPT: Script = {
    (100,): [(1, 0.0), (2, -0.5)],
    (100, 1): [(3, 0.0), (4, -2.0)],
    (100, 2): [(5, -0.125), (6, -0.25)],
    (100, 1, 3): [(7, -0.25), (8, -0.375)],
    (100, 2, 5): [(9, -0.0625), (10, -1.0)],
}


def test_grow_tie_and_beam_cut_score_order() -> None:
    """Score order with a parent/child tie at score 0 and a beam that skips a kept node.

    total=8 keeps pool indices [0, 1, 3, 7, 8, 2, 5, 9, 6] (the first nine of the rank above).
    New index of each: 0→0, 1→1, 3→2, 7→3, 8→4, 2→5, 5→6, 9→7, 6→8.
    Parents (pool) [-, 0, 1, 3, 3, 0, 2, 5, 2] → new [-1, 0, 1, 2, 2, 0, 5, 6, 5].
    Positions (root 20): depths [0, 1, 2, 3, 3, 1, 2, 3, 2] → [20, 21, 22, 23, 23, 21, 22, 23, 22].
    Node 6 (token 6) is kept although the beam never expanded it.
    """
    drafter = ScriptedDrafter(TIE_SCRIPT)
    t = grow(drafter, np.array([1]), 100, 20, depth=2, topk=2, total=8)
    assert t.tokens.tolist() == [100, 1, 3, 7, 8, 2, 5, 9, 6]
    assert t.parents.tolist() == [-1, 0, 1, 2, 2, 0, 5, 6, 5]
    assert t.positions.tolist() == [20, 21, 22, 23, 23, 21, 22, 23, 22]
    assert t.scores.tolist() == [0.0, 0.0, 0.0, -0.25, -0.375, -0.5, -0.625, -0.6875, -0.75]
    assert t.ids.tolist() == list(range(9))
    assert [paths for _, paths in drafter.calls] == [
        [(100,)], [(100, 1), (100, 2)], [(100, 1, 3), (100, 2, 5)],
    ]


def test_grow_tie_and_beam_cut_pool_order() -> None:
    """The same nine nodes in pool order: kept pool indices sorted, [0, 1, 2, 3, 5, 6, 7, 8, 9].

    New index: 0→0, 1→1, 2→2, 3→3, 5→4, 6→5, 7→6, 8→7, 9→8.
    Parents (pool) [-, 0, 0, 1, 2, 2, 3, 3, 5] → new [-1, 0, 0, 1, 2, 2, 3, 3, 4].
    """
    t = grow(ScriptedDrafter(TIE_SCRIPT), np.array([1]), 100, 20, depth=2, topk=2, total=8,
             order="pool")
    assert t.tokens.tolist() == [100, 1, 2, 3, 5, 6, 7, 8, 9]
    assert t.parents.tolist() == [-1, 0, 0, 1, 2, 2, 3, 3, 4]
    assert t.positions.tolist() == [20, 21, 21, 22, 22, 22, 23, 23, 23]
    assert t.scores.tolist() == [0.0, 0.0, -0.5, 0.0, -0.625, -0.75, -0.25, -0.375, -0.6875]


@pytest.mark.parametrize(
    ("total", "tokens", "parents"),
    [
        # Three nodes tie at score 0 (root, 1, 3); the lower pool index wins, so a parent always
        # precedes its child and a cut inside the tie keeps the parent, never the orphan child.
        (1, [100, 1], [-1, 0]),
        (2, [100, 1, 3], [-1, 0, 1]),
        (3, [100, 1, 3, 7], [-1, 0, 1, 2]),
    ],
)
def test_grow_tie_goes_to_the_parent(total: int, tokens: list[int], parents: list[int]) -> None:
    """A child whose log-prob is 0 ties its parent; the cut keeps the parent first."""
    for order in ("score", "pool"):
        t = grow(ScriptedDrafter(TIE_SCRIPT), np.array([1]), 100, 20, depth=2, topk=2,
                 total=total, order=order)
        # Here score order and pool order coincide: the kept nodes are 0, 1, 3, 7 in both.
        assert t.tokens.tolist() == tokens
        assert t.parents.tolist() == parents


def test_grow_total_zero_is_root_only_without_drafting() -> None:
    """total=0 returns the bare root and never calls the drafter."""
    drafter = ScriptedDrafter({})
    t = grow(drafter, np.array([1]), 100, 20, depth=2, topk=2, total=0)
    assert rows(t) == [(0, 100, -1, 20, 0.0)]
    assert drafter.calls == []


def test_grow_total_beyond_pool_keeps_whole_pool() -> None:
    """The pool has 1 + k + depth·k² = 1 + 2 + 2·4 = 11 nodes; total=50 keeps all of them."""
    t = grow(ScriptedDrafter(TIE_SCRIPT), np.array([1]), 100, 20, depth=2, topk=2, total=50)
    # Full rank: 0, 1, 3, 7, 8, 2, 5, 9, 6, 10, 4.
    assert t.tokens.tolist() == [100, 1, 3, 7, 8, 2, 5, 9, 6, 10, 4]
    assert t.scores.tolist() == [
        0.0, 0.0, 0.0, -0.25, -0.375, -0.5, -0.625, -0.6875, -0.75, -1.625, -2.0,
    ]


def test_grow_depth_zero_is_one_layer() -> None:
    """depth=0 drafts only the root's top-k: k=2 gives a (-0.1) and b (-1.0)."""
    t = grow(ScriptedDrafter(DOC_SCRIPT), np.array([1]), 0, 3, depth=0, topk=2, total=5)
    assert t.tokens.tolist() == [0, 1, 2]
    assert t.parents.tolist() == [-1, 0, 0]
    assert t.positions.tolist() == [3, 4, 4]


# ---------------------------------------------------------------------------------------------
# grow_layer
# ---------------------------------------------------------------------------------------------


def test_grow_layer_docstring_example() -> None:
    """grow_layer's docstring: two calls of width 2 from a root-only tree.

    Call 1 (root r=0 at position 5, id 7, next_id 8): candidates a -0.1, b -0.7 → append [a, b]
    with ids [8, 9], parents [0, 0]. Call 2 (next_id 10): frontier is the deepest layer {a, b};
    candidates ac -0.3, ad -0.4, be -0.8, bf -1.6 → append [c, d] under a, ids [10, 11].
    """
    script: Script = {
        (0,): [(1, -0.1), (2, -0.7)],
        (0, 1): [(3, -0.2), (4, -0.3)],
        (0, 2): [(5, -0.1), (6, -0.9)],
    }
    drafter = ScriptedDrafter(script)
    t0 = root_only(token=0, position=5, node_id=7)
    t1, n1 = grow_layer(drafter, np.array([1]), t0, width=2, next_id=8)
    assert n1 == 2
    assert t1.ids.tolist() == [7, 8, 9]
    assert t1.tokens.tolist() == [0, 1, 2]
    assert t1.parents.tolist() == [-1, 0, 0]
    assert t1.positions.tolist() == [5, 6, 6]
    assert t1.scores.tolist() == pytest.approx([0.0, -0.1, -0.7])

    t2, n2 = grow_layer(drafter, np.array([1]), t1, width=2, next_id=10)
    assert n2 == 2
    assert t2.ids.tolist() == [7, 8, 9, 10, 11]
    assert t2.tokens.tolist() == [0, 1, 2, 3, 4]
    assert t2.parents.tolist() == [-1, 0, 0, 1, 1]
    assert t2.positions.tolist() == [5, 6, 6, 7, 7]
    assert t2.scores.tolist() == pytest.approx([0.0, -0.1, -0.7, -0.3, -0.4])
    # Only the deepest layer is expanded: the root is not asked again in call 2.
    assert [paths for _, paths in drafter.calls] == [[(0,)], [(0, 1), (0, 2)]]


def test_grow_layer_appends_in_score_order_across_parents() -> None:
    """The best children of the deepest layer are appended by score, whichever parent they have.

    Layer 1: a (-0.25), b (-0.5). Layer 2 candidates: ac -0.75, ad -1.25, be -0.625, bf -2.5.
    Best two by score: be (-0.625), then ac (-0.75) → appended [e, c] with parents [2, 1].
    """
    script: Script = {
        (0,): [(1, -0.25), (2, -0.5)],
        (0, 1): [(3, -0.5), (4, -1.0)],
        (0, 2): [(5, -0.125), (6, -2.0)],
    }
    drafter = ScriptedDrafter(script)
    t1, _ = grow_layer(drafter, np.array([1]), root_only(0, 5, 0), width=2, next_id=1)
    t2, n2 = grow_layer(drafter, np.array([1]), t1, width=2, next_id=3)
    assert n2 == 2
    assert rows(t2)[3:] == [(3, 5, 2, 7, -0.625), (4, 3, 1, 7, -0.75)]
    assert rows(t2)[:3] == rows(t1)  # existing nodes never move


def test_grow_layer_tie_goes_to_the_lower_candidate() -> None:
    """Equal candidate scores keep the lower candidate index (frontier order, then column).

    Layer 1: a (-0.5), b (-0.5). Then a proposes c -0.25, d -1; b proposes e -0.25, f -1.
    Candidates [ac, ad, be, bf] score [-0.75, -1.5, -0.75, -1.5]: width 1 keeps ac (candidate 0)
    over be (candidate 2).
    """
    script: Script = {
        (0,): [(1, -0.5), (2, -0.5)],
        (0, 1): [(3, -0.25), (4, -1.0)],
        (0, 2): [(5, -0.25), (6, -1.0)],
    }
    drafter = ScriptedDrafter(script)
    t1, _ = grow_layer(drafter, np.array([1]), root_only(0, 5, 0), width=2, next_id=1)
    t2, _ = grow_layer(drafter, np.array([1]), t1, width=1, next_id=3)
    assert rows(t2)[3:] == [(3, 3, 1, 7, -0.75)]


# ---------------------------------------------------------------------------------------------
# grow_best (SpecPipe)
# ---------------------------------------------------------------------------------------------

GROW_BEST_SCRIPT: Script = {
    (0,): [(1, -0.1), (2, -0.7)],
    (0, 1): [(3, -0.2), (4, -0.9)],
    (0, 2): [(5, -0.1), (6, -0.9)],
    (0, 1, 3): [(7, -0.9), (8, -1.2)],
    (0, 2, 5): [(9, -0.1), (10, -0.5)],
}


def test_grow_best_docstring_example() -> None:
    """grow_best's docstring: three calls of width 2 from a root-only tree (id 7, next ids 8..).

    Call 3's candidates: ad -1.0, bf -1.6, ach -1.2, aci -1.5, bej -0.9, bek -1.3 (ac -0.3 and be
    -0.8 are in the tree already) → bej then ad, parents e (index 4) and a (index 1)."""
    drafter = ScriptedDrafter(GROW_BEST_SCRIPT)
    t1, n1 = grow_best(drafter, np.array([1]), root_only(0, 5, 7), width=2, next_id=8)
    t2, n2 = grow_best(drafter, np.array([1]), t1, width=2, next_id=8 + n1)
    t3, n3 = grow_best(drafter, np.array([1]), t2, width=2, next_id=8 + n1 + n2)
    assert (n1, n2, n3) == (2, 2, 2)
    assert t3.ids.tolist() == [7, 8, 9, 10, 11, 12, 13]
    assert t3.tokens.tolist() == [0, 1, 2, 3, 5, 9, 4]
    assert t3.parents.tolist() == [-1, 0, 0, 1, 2, 4, 1]
    assert t3.positions.tolist() == [5, 6, 6, 7, 7, 8, 7]
    assert t3.scores.tolist() == pytest.approx([0.0, -0.1, -0.7, -0.3, -0.8, -0.9, -1.0])
    # Every node short of `width` children is asked, at every depth; a full node (the root) is not.
    assert [paths for _, paths in drafter.calls] == [
        [(0,)], [(0, 1), (0, 2)], [(0, 1), (0, 2), (0, 1, 3), (0, 2, 5)]]  # fmt: skip


def test_grow_best_reaches_where_grow_layer_does_not() -> None:
    """On the same tree PipeDec's step takes the deepest layer's children (ach, aci, bej, bek here),
    SpecPipe's may take a shallower node's: ad (-1.0) beats ach (-1.2)."""
    t2, _ = grow_best(ScriptedDrafter(GROW_BEST_SCRIPT), np.array([1]),
                      grow_best(ScriptedDrafter(GROW_BEST_SCRIPT), np.array([1]), root_only(0, 5, 0), width=2, next_id=1)[0],
                      width=2, next_id=3)  # fmt: skip
    layer, _ = grow_layer(ScriptedDrafter(GROW_BEST_SCRIPT), np.array([1]), t2, width=2, next_id=5)
    best, _ = grow_best(ScriptedDrafter(GROW_BEST_SCRIPT), np.array([1]), t2, width=2, next_id=5)
    assert layer.tokens[5:].tolist() == [9, 7]  # bej -0.9, ach -1.2: depth 3 only
    assert best.tokens[5:].tolist() == [9, 4]  # bej -0.9, ad -1.0


def test_grow_best_never_duplicates_a_path() -> None:
    """Random drafters, many steps: no (parent, token) pair twice, every node's children <= width."""
    for seed in range(20):
        drafter = RandomDrafter(seed, vocab=6)
        tree, next_id = root_only(0, 3, 0), 1
        for _ in range(6):
            tree, n = grow_best(drafter, np.array([1, 2]), tree, width=3, next_id=next_id)
            next_id += n
        pairs = list(zip(tree.parents[1:].tolist(), tree.tokens[1:].tolist()))
        assert len(pairs) == len(set(pairs)) == 18
        assert np.bincount(tree.parents[1:]).max() <= 3


# ---------------------------------------------------------------------------------------------
# reroot
# ---------------------------------------------------------------------------------------------


def test_reroot_docstring_example() -> None:
    """reroot's docstring: the sub-tree under node 2 is [2, 4] with scores rebased to node 2."""
    t = DraftTree(ids=np.arange(5), tokens=np.array([7, 8, 9, 10, 11]),
                  parents=np.array([-1, 0, 0, 1, 2]), positions=np.array([5, 6, 6, 7, 7]),
                  scores=np.array([0.0, -0.1, -0.2, -0.3, -0.4]))
    sub, kept = reroot(t, 2)
    assert kept.tolist() == [2, 4]
    assert sub.parents.tolist() == [-1, 0]
    assert sub.positions.tolist() == [6, 7]
    assert sub.scores.tolist() == pytest.approx([0.0, -0.2])
    assert sub.ids.tolist() == [2, 4]
    assert sub.tokens.tolist() == [9, 11]


# A depth-3 tree with gaps in its ids (ids are stable, not dense).
#
# idx  id   token  parent  pos  score
#  0   100   50     -1     10    0
#  1   101   51      0     11   -0.25
#  2   103   52      0     11   -0.5
#  3   104   53      1     12   -0.75
#  4   107   54      2     12   -1.0
#  5   108   55      1     12   -1.25
#  6   110   56      3     13   -1.5
#  7   111   57      5     13   -1.75
#  8   112   58      3     13   -2.0
DEEP = dict(
    tokens=[50, 51, 52, 53, 54, 55, 56, 57, 58],
    parents=[-1, 0, 0, 1, 2, 1, 3, 5, 3],
    root_position=10,
    scores=[0.0, -0.25, -0.5, -0.75, -1.0, -1.25, -1.5, -1.75, -2.0],
    ids=[100, 101, 103, 104, 107, 108, 110, 111, 112],
)


def test_reroot_deeper_tree() -> None:
    """Re-rooting at node 1 keeps its sub-tree, positions unchanged, scores relative to node 1.

    Descendants of 1: 1, 3, 5, 6 (via 3), 7 (via 5), 8 (via 3) → kept [1, 3, 5, 6, 7, 8].
    Remap 1→0, 3→1, 5→2, 6→3, 7→4, 8→5: parents [-1, 0, 0, 1, 2, 1].
    Scores minus -0.25: [0, -0.5, -1.0, -1.25, -1.5, -1.75].
    """
    sub, kept = reroot(tree(**DEEP), 1)
    assert kept.tolist() == [1, 3, 5, 6, 7, 8]
    assert rows(sub) == [
        (101, 51, -1, 11, 0.0),
        (104, 53, 0, 12, -0.5),
        (108, 55, 0, 12, -1.0),
        (110, 56, 1, 13, -1.25),
        (111, 57, 2, 13, -1.5),
        (112, 58, 1, 13, -1.75),
    ]
    assert sub.depths.tolist() == [0, 1, 1, 2, 2, 2]


def test_reroot_two_levels_down_and_at_leaf_and_root() -> None:
    """Re-rooting at depth 2, at a leaf and at the root itself.

    At node 3 (score -0.75): kept [3, 6, 8], parents [-1, 0, 0], scores [0, -0.75, -1.25].
    At leaf 7: only itself, score 0. At the root: the same tree.
    """
    t = tree(**DEEP)
    sub, kept = reroot(t, 3)
    assert kept.tolist() == [3, 6, 8]
    assert rows(sub) == [(104, 53, -1, 12, 0.0), (110, 56, 0, 13, -0.75), (112, 58, 0, 13, -1.25)]

    leaf, kept = reroot(t, 7)
    assert kept.tolist() == [7]
    assert rows(leaf) == [(111, 57, -1, 13, 0.0)]

    same, kept = reroot(t, 0)
    assert kept.tolist() == list(range(9))
    assert rows(same) == rows(t)


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------


def test_merge_docstring_example() -> None:
    """merge's docstring: base r→a, r→b; fresh r→a→c, r→d (fresh order a, d, c).

    a maps onto base's a (index 1); d and c are appended in fresh order:
    tokens [r, a, b, d, c], parents [-1, 0, 0, 0, 1], ids from next_id=20 on: [.., 20, 21].
    Positions and scores of appended nodes come from fresh.
    """
    r, a, b, c, d = 0, 1, 2, 3, 4
    base = tree([r, a, b], [-1, 0, 0], 5, scores=[0.0, -0.5, -1.0], ids=[10, 11, 12])
    fresh = tree([r, a, d, c], [-1, 0, 0, 1], 5, scores=[0.0, -0.25, -2.0, -0.75])
    merged, n_new = merge(base, fresh, next_id=20)
    assert n_new == 2
    assert merged.tokens.tolist() == [r, a, b, d, c]
    assert merged.parents.tolist() == [-1, 0, 0, 0, 1]
    assert merged.ids.tolist() == [10, 11, 12, 20, 21]
    assert merged.positions.tolist() == [5, 6, 6, 6, 7]
    assert merged.scores.tolist() == [0.0, -0.5, -1.0, -2.0, -0.75]


def test_merge_fresh_contained_in_base_returns_base_itself() -> None:
    """A fresh tree whose every path is already in base appends nothing: same object, 0 new."""
    base = tree([0, 1, 2, 3], [-1, 0, 0, 1], 5, ids=[4, 5, 6, 7])
    fresh = tree([0, 2, 1, 3], [-1, 0, 0, 2], 5)  # r→b, r→a, a→c in a different order
    merged, n_new = merge(base, fresh, next_id=8)
    assert n_new == 0
    assert merged is base
    merged, n_new = merge(base, root_only(0, 5, 0), next_id=8)
    assert (merged, n_new) == (base, 0)


def test_merge_same_token_under_different_parents_is_a_new_node() -> None:
    """Nodes are identified by token path, not by token: r→b→x is new even though r→a→x exists.

    base: 0 r, 1 a, 2 b, 3 x (under a).  fresh: r→b→x→y.
    b maps to base index 2; x under b is appended at 4 (parent 2); y follows at 5 (parent 4, an
    appended node). Ids 30, 31.
    """
    r, a, b, x, y = 0, 1, 2, 9, 8
    base = tree([r, a, b, x], [-1, 0, 0, 1], 3, ids=[0, 1, 2, 3])
    fresh = tree([r, b, x, y], [-1, 0, 1, 2], 3, scores=[0.0, -0.25, -0.5, -0.75])
    merged, n_new = merge(base, fresh, next_id=30)
    assert n_new == 2
    assert rows(merged)[:4] == rows(base)
    assert rows(merged)[4:] == [(30, x, 2, 5, -0.5), (31, y, 4, 6, -0.75)]
    assert all_paths(merged) == [(r,), (r, a), (r, b), (r, a, x), (r, b, x), (r, b, x, y)]


def test_merge_never_moves_existing_nodes_and_dedups_deep_paths() -> None:
    """Existing rows are kept verbatim; fresh nodes deep under shared prefixes map or append.

    base (DEEP tree, 9 nodes, ids up to 112). fresh, rooted at the same token 50 / position 10:
      idx 0 50 root
      idx 1 51      → base 1
      idx 2 53 (1)  → base 3
      idx 3 60 (0)  → new, appended at 9, parent 0
      idx 4 56 (2)  → base 6 (path 50-51-53-56)
      idx 5 57 (2)  → new: 57 exists only under 55 in base; appended at 10, parent 3
      idx 6 61 (3)  → new, appended at 11, parent 9
    Ids 200, 201, 202.
    """
    base = tree(**DEEP)
    fresh = tree([50, 51, 53, 60, 56, 57, 61], [-1, 0, 1, 0, 2, 2, 3], 10,
                 scores=[0.0, -0.25, -0.5, -1.0, -1.0, -1.25, -3.0])
    merged, n_new = merge(base, fresh, next_id=200)
    assert n_new == 3
    assert rows(merged)[:9] == rows(base)
    assert rows(merged)[9:] == [(200, 60, 0, 11, -1.0), (201, 57, 3, 13, -1.25),
                                (202, 61, 9, 12, -3.0)]


# ---------------------------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------------------------

PROP = settings(max_examples=150, deadline=None, derandomize=True)
# Log-prob steps: exact in float64, and 0 makes parent/child ties common.
LOGP_STEPS = [0.0, -0.25, -0.5, -1.0, -1.5]


@st.composite
def trees(
    draw: st.DrawFn,
    max_nodes: int = 24,
    root_token: int | None = None,
    root_position: int | None = None,
    vocab: int = 4,
) -> DraftTree:
    """Random topological tree: parents[i] < i, sibling tokens distinct, positions = root + depth,
    scores non-increasing along paths (ties included), ids strictly increasing (with gaps).

    A small `vocab` makes shared token paths between two trees likely (for merge).
    """
    n = draw(st.integers(1, max_nodes))
    if root_token is None:
        root_token = draw(st.integers(0, 9))
    if root_position is None:
        root_position = draw(st.integers(0, 50))
    tokens = [root_token]
    parents = [-1]
    positions = [root_position]
    scores = [0.0]
    used: dict[int, set[int]] = {0: set()}
    for i in range(1, n):
        p = draw(st.integers(0, i - 1))
        taken = used[p]
        # vocab + len(taken) candidates, minus the taken ones: never empty.
        free = [t for t in range(vocab + len(taken)) if t not in taken]
        tok = draw(st.sampled_from(free))
        taken.add(tok)
        used[i] = set()
        tokens.append(tok)
        parents.append(p)
        positions.append(positions[p] + 1)
        scores.append(scores[p] + draw(st.sampled_from(LOGP_STEPS)))
    first_id = draw(st.integers(0, 20))
    gaps = draw(st.lists(st.integers(1, 3), min_size=n - 1, max_size=n - 1))
    ids = np.concatenate([[first_id], first_id + np.cumsum(gaps, dtype=np.int64)])
    return DraftTree(
        ids=ids.astype(np.int64),
        tokens=np.array(tokens, dtype=np.int64),
        parents=np.array(parents, dtype=np.int64),
        positions=np.array(positions, dtype=np.int64),
        scores=np.array(scores, dtype=np.float64),
    )


def assert_topological(t: DraftTree) -> None:
    assert t.parents[0] == -1
    assert all(0 <= t.parents[i] < i for i in range(1, len(t)))
    assert all(t.positions[i] == t.positions[t.parents[i]] + 1 for i in range(1, len(t)))
    assert (np.diff(t.ids) > 0).all()


@PROP
@given(trees())
def test_prop_every_prefix_is_ancestor_closed(t: DraftTree) -> None:
    """Topological order means every prefix of the node order is a connected subtree with the root."""
    assert_topological(t)
    for end in range(1, len(t) + 1):
        assert is_ancestor_closed(t.parents, np.arange(end)), end


@PROP
@given(trees())
def test_prop_ancestor_mask_rows_are_paths(t: DraftTree) -> None:
    """Mask row i is exactly path(i) (i and its ancestors); column j is descendant_mask(j).

    path(i) itself is checked to be a parent chain from the root of length depth(i) + 1.
    """
    mask = ancestor_mask(t.parents)
    assert mask.shape == (len(t), len(t))
    for i in range(len(t)):
        p = t.path(i).tolist()
        assert p[0] == 0 and p[-1] == i and len(p) == t.depths[i] + 1
        assert all(t.parents[p[k]] == p[k - 1] for k in range(1, len(p)))
        assert set(np.flatnonzero(mask[i]).tolist()) == set(p)
    for j in range(len(t)):
        assert (descendant_mask(t.parents, j) == mask[:, j]).all()


@PROP
@given(trees(), st.data())
def test_prop_reroot_keeps_descendants_with_their_positions_and_ids(
    t: DraftTree, data: st.DataObject
) -> None:
    """reroot at any node: kept == node + descendants (ascending), positions/ids/tokens copied,
    parents remapped, scores relative to the new root, result topological."""
    node = data.draw(st.integers(0, len(t) - 1))
    sub, kept = reroot(t, node)
    mask = ancestor_mask(t.parents)
    assert kept.tolist() == np.flatnonzero(mask[:, node]).tolist()
    assert kept[0] == node
    assert_topological(sub)
    assert sub.ids.tolist() == t.ids[kept].tolist()
    assert sub.tokens.tolist() == t.tokens[kept].tolist()
    assert sub.positions.tolist() == t.positions[kept].tolist()
    assert sub.positions[0] == t.positions[node]
    assert sub.scores.tolist() == (t.scores[kept] - t.scores[node]).tolist()
    # Parent of each kept non-root node, mapped back to old indices, is its old parent.
    assert kept[sub.parents[1:]].tolist() == t.parents[kept[1:]].tolist()


@st.composite
def merge_pairs(draw: st.DrawFn) -> tuple[DraftTree, DraftTree, int]:
    """Two random trees with the same root token and position, and a next_id past base's ids."""
    root_token = draw(st.integers(0, 9))
    root_position = draw(st.integers(0, 50))
    base = draw(trees(root_token=root_token, root_position=root_position, vocab=3))
    fresh = draw(trees(root_token=root_token, root_position=root_position, vocab=3))
    next_id = int(base.ids[-1]) + draw(st.integers(1, 5))
    return base, fresh, next_id


@PROP
@given(merge_pairs())
def test_prop_merge_appends_each_new_path_once(pair: tuple[DraftTree, DraftTree, int]) -> None:
    """merge: base rows untouched, every fresh path present exactly once, no duplicate paths,
    appended ids are next_id.., appended count == fresh paths missing from base."""
    base, fresh, next_id = pair
    merged, n_new = merge(base, fresh, next_id)
    assert_topological(merged)
    assert rows(merged)[: len(base)] == rows(base)
    base_paths = all_paths(base)
    fresh_paths = all_paths(fresh)
    merged_paths = all_paths(merged)
    assert len(set(merged_paths)) == len(merged_paths), "duplicate token path"
    for p in fresh_paths:
        assert merged_paths.count(p) == 1, p
    assert set(merged_paths) == set(base_paths) | set(fresh_paths)
    missing = [p for p in fresh_paths if p not in set(base_paths)]
    assert n_new == len(missing) == len(merged) - len(base)
    # Appended in fresh order, ids from next_id on, rows copied from fresh.
    assert merged_paths[len(base):] == missing
    assert merged.ids[len(base):].tolist() == list(range(next_id, next_id + n_new))
    fresh_row = {p: i for i, p in enumerate(fresh_paths)}
    for j in range(len(base), len(merged)):
        i = fresh_row[merged_paths[j]]
        assert merged.positions[j] == fresh.positions[i]
        assert merged.scores[j] == fresh.scores[i]
    if n_new == 0:
        assert merged is base


class RandomDrafter:
    """Deterministic pseudo-random proposals: a pure function of (seed, token path, k).

    Tokens are k distinct values from range(vocab); log-probs are multiples of -0.25 in
    [-1.75, 0], so sums are exact and ties (including log-prob 0) are frequent.
    """

    def __init__(self, seed: int, vocab: int) -> None:
        self.seed = seed
        self.vocab = vocab

    def table(self, path: tuple[int, ...], k: int) -> tuple[list[int], list[float]]:
        rng = np.random.default_rng([self.seed, len(path), *path])
        tokens = rng.choice(self.vocab, size=k, replace=False)
        logp = -0.25 * rng.integers(0, 8, size=k)
        return tokens.tolist(), logp.tolist()

    def propose(
        self, context: np.ndarray, pool: DraftTree, frontier: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        out = [self.table(tuple(pool.tokens[pool.path(int(i))].tolist()), k) for i in frontier]
        return (np.array([o[0] for o in out], dtype=np.int64),
                np.array([o[1] for o in out], dtype=np.float64))


def reference_pool(
    drafter: RandomDrafter, root_token: int, depth: int, topk: int
) -> list[tuple[tuple[int, ...], float]]:
    """EAGLE-2's pool, recomputed without numpy: (token path, score) per pool index.

    Each step appends every frontier node's k children in frontier order; the next frontier is
    the best k of those just appended by (score desc, pool index asc).
    """
    pool: list[tuple[tuple[int, ...], float]] = [((root_token,), 0.0)]
    frontier = [0]
    for _ in range(depth + 1):
        first = len(pool)
        for f in frontier:
            path, score = pool[f]
            toks, logps = drafter.table(path, topk)
            pool.extend((path + (tok,), score + lp) for tok, lp in zip(toks, logps, strict=True))
        layer = range(first, len(pool))
        frontier = sorted(sorted(layer, key=lambda i: (-pool[i][1], i))[:topk])
    return pool


@settings(max_examples=120, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**16),
    depth=st.integers(0, 3),
    topk=st.integers(1, 4),
    total=st.integers(0, 60),
    root_position=st.integers(0, 30),
)
def test_prop_grow_keeps_the_top_total_of_the_pool(
    seed: int, depth: int, topk: int, total: int, root_position: int
) -> None:
    """grow keeps exactly the root plus the top-`total` pool nodes by (score desc, pool index asc).

    The pool is recomputed independently; the result must be topological and ancestor-closed in
    every prefix, with len == min(total, pool size) + 1, scores equal to path sums, and in
    "score" order the reference ranking itself, in "pool" order the same set by pool index.
    """
    drafter = RandomDrafter(seed, vocab=topk + 3)
    root_token = 1000
    pool = reference_pool(drafter, root_token, depth, topk)
    assert len(pool) == 1 + topk + depth * topk * topk
    rank = sorted(range(len(pool)), key=lambda i: (-pool[i][1], i))
    assert rank[0] == 0
    top = rank[: total + 1]
    score_of = dict(pool)

    for order, expected in (("score", top), ("pool", sorted(top))):
        t = grow(drafter, np.array([5, 6]), root_token, root_position, depth=depth, topk=topk,
                 total=total, order=order)
        assert len(t) == min(total, len(pool) - 1) + 1
        assert_topological(t)
        assert t.ids.tolist() == list(range(len(t)))
        assert t.positions.tolist() == (root_position + t.depths).tolist()
        for end in range(1, len(t) + 1):
            assert is_ancestor_closed(t.parents, np.arange(end))
        paths = all_paths(t)
        assert paths == [pool[i][0] for i in expected], order
        assert t.scores.tolist() == [score_of[p] for p in paths]
        if order == "score":
            assert (np.diff(t.scores) <= 0).all()
