"""Verification over a partially verified draft tree (`flowspec.verify`).

Greedy cases are literal trees with hand-picked target argmaxes (the scripted-drafter patterns of
STYLE.md R12.5: reject at depth 0, accept 2 then reject, reject a branch but accept its sibling,
re-root on an unverified child, walk to a leaf). Sampled verification is pinned three ways: a
scripted generator for the exact arithmetic of one walk, seeded distribution tests whose expected
probabilities are computed from the target alone (losslessness), and a property test for the shape
of every verdict.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowspec.tree import DraftTree, root_only
from flowspec.verify import IMPORTANCE, Verdict, entropy_importance, verify_greedy, verify_relaxed, verify_sampled

# Upper 0.999 quantiles of the chi-square distribution, by degrees of freedom (computed with the
# regularized incomplete gamma function; scipy.stats.chi2.ppf(0.999, dof) gives the same values).
CHI2_999 = {1: 10.828, 2: 13.816, 4: 18.467, 22: 48.268}


def make_tree(tokens: list[int], parents: list[int], root_position: int = 10) -> DraftTree:
    depth = [0] * len(parents)
    for i in range(1, len(parents)):
        depth[i] = depth[parents[i]] + 1
    return DraftTree(ids=np.arange(len(tokens), dtype=np.int64) + 100,
                     tokens=np.array(tokens, dtype=np.int64),
                     parents=np.array(parents, dtype=np.int64),
                     positions=root_position + np.array(depth, dtype=np.int64),
                     scores=-0.1 * np.array(depth, dtype=np.float64))


def flags(*values: int) -> np.ndarray:
    return np.array(values, dtype=bool)


def as_tuple(verdict: Verdict) -> tuple[list[int], int, int]:
    return verdict.accepted.tolist(), verdict.bonus_token, verdict.next_root


# ---- greedy -----------------------------------------------------------------------------------

#          0 (50)
#        /        \
#     1 (11)     2 (12)
#       |          |
#     3 (13)     4 (14)
#       |
#     5 (15)
GREEDY_TREE = make_tree([50, 11, 12, 13, 14, 15], [-1, 0, 0, 1, 2, 3])
ALL = flags(1, 1, 1, 1, 1, 1)


def test_greedy_reject_at_depth_0() -> None:
    """The target's argmax at the root (99) is no child's token: only the root is committed, the
    bonus is 99 and the round ends."""
    argmax = np.array([99, 13, 14, 15, 1, 2])
    assert as_tuple(verify_greedy(GREEDY_TREE, ALL, argmax)) == ([0], 99, -1)


def test_greedy_accept_two_then_reject() -> None:
    """Argmax 11 at the root accepts node 1, 13 at node 1 accepts node 3, 77 at node 3 matches
    no child (node 5 carries 15): accepted [0, 1, 3] (a = 3 incl. the root), bonus 77."""
    argmax = np.array([11, 13, 0, 77, 0, 0])
    verdict = verify_greedy(GREEDY_TREE, ALL, argmax)
    assert as_tuple(verdict) == ([0, 1, 3], 77, -1)
    assert verdict.n_accepted == 3


def test_greedy_reject_a_branch_but_accept_its_sibling() -> None:
    """The root's argmax is 12: node 1's branch (1, 3, 5) is rejected, its sibling 2 accepted, then
    61 at node 2 matches no child (node 4 carries 14)."""
    argmax = np.array([12, 13, 61, 15, 0, 0])
    assert as_tuple(verify_greedy(GREEDY_TREE, ALL, argmax)) == ([0, 2], 61, -1)


def test_greedy_bonus_on_an_unverified_child_reroots_there() -> None:
    """Only S0 = [0, 1, 2] has come back. Argmax 11 accepts node 1; argmax 13 at node 1 is node
    3's token, but node 3 is not verified: it becomes the next root. Unverified rows are never read
    (their argmax is -1 here, as D0 fills them)."""
    verified = flags(1, 1, 1, 0, 0, 0)
    argmax = np.array([11, 13, 14, -1, -1, -1])
    assert as_tuple(verify_greedy(GREEDY_TREE, verified, argmax)) == ([0, 1], 13, 3)


def test_greedy_docstring_example() -> None:
    """tokens [r, a, b, c], parents [-1, 0, 0, 1], nodes 0..2 verified, argmax root = a, at a = c."""
    tree = make_tree([9, 1, 2, 3], [-1, 0, 0, 1])
    verdict = verify_greedy(tree, flags(1, 1, 1, 0), np.array([1, 3, 0, -1]))
    assert as_tuple(verdict) == ([0, 1], 3, 3)


def test_greedy_walks_to_a_leaf() -> None:
    """Every argmax on the path 0 → 1 → 3 → 5 matches; node 5 is a leaf, so its argmax (42) is the
    bonus and the round ends (nothing to re-root on)."""
    argmax = np.array([11, 13, 0, 15, 0, 42])
    assert as_tuple(verify_greedy(GREEDY_TREE, ALL, argmax)) == ([0, 1, 3, 5], 42, -1)


def test_greedy_root_only_tree() -> None:
    """A root-only tree (AR-PP's step): the root is committed and its argmax is the bonus."""
    tree = root_only(token=50, position=7, node_id=3)
    assert as_tuple(verify_greedy(tree, flags(1), np.array([8]))) == ([0], 8, -1)


def test_greedy_requires_a_verified_root() -> None:
    """Nothing can be verified before the root's output is known."""
    with pytest.raises(AssertionError):
        verify_greedy(GREEDY_TREE, flags(0, 1, 1, 1, 1, 1), np.array([11, 13, 0, 15, 0, 42]))


# ---- sampled: exact arithmetic with a scripted generator -------------------------------------

#             0
#        /    |    \
#     1 (1)  2 (2)  3 (3)          verified: 0..5
#    /  |  \    \                  unverified: 6, 7
# 4(0) 5(4) 6(2) 7(1)
SAMPLED_TREE = make_tree([0, 1, 2, 3, 0, 4, 2, 1], [-1, 0, 0, 0, 1, 1, 1, 2])
SAMPLED_VERIFIED = flags(1, 1, 1, 1, 1, 1, 0, 0)
P = {
    0: [0.10, 0.30, 0.15, 0.25, 0.20],
    1: [0.35, 0.10, 0.30, 0.05, 0.20],
    2: [0.05, 0.45, 0.10, 0.20, 0.20],
    3: [0.25, 0.25, 0.00, 0.50, 0.00],
    4: [0.20, 0.20, 0.20, 0.20, 0.20],
    5: [0.40, 0.10, 0.10, 0.10, 0.30],
}


def probs_for(tree: DraftTree, rows: dict[int, list[float]]) -> np.ndarray:
    out = np.full((len(tree), 5), np.nan)  # unverified rows must never be read
    for node, p in rows.items():
        out[node] = p
    return out


class ScriptedRng:
    """Stands in for `numpy.random.Generator`: `random()` returns scripted uniforms and
    `choice(n, p=...)` returns scripted picks, recording the distribution it was given."""

    def __init__(self, uniforms: list[float], picks: list[int]) -> None:
        self.uniforms = list(uniforms)
        self.picks = list(picks)
        self.choice_p: list[np.ndarray] = []

    def random(self) -> float:
        return self.uniforms.pop(0)

    def choice(self, n: int, p: np.ndarray) -> int:
        assert n == len(p)
        self.choice_p.append(np.array(p))
        return self.picks.pop(0)


def test_sampled_tries_siblings_in_order_and_renormalises() -> None:
    """At the root, child 1 (token 1) is tried first: u = 0.5 ≥ p(1) = 0.3, rejected; p(1) is
    zeroed, the residual sums to 0.7. Child 2: u·0.7 = 0.14 < p(2) = 0.15, accepted. Node 2 has no
    verified child, so the bonus is drawn from p2 untouched; pick 1 is node 7's token (unverified),
    so the tree re-roots at 7. Every scripted draw is consumed."""
    rng = ScriptedRng([0.5, 0.2], [1])
    verdict = verify_sampled(SAMPLED_TREE, SAMPLED_VERIFIED, probs_for(SAMPLED_TREE, P), rng)
    assert as_tuple(verdict) == ([0, 2], 1, 7)
    assert len(rng.choice_p) == 1
    np.testing.assert_allclose(rng.choice_p[0], P[2])
    assert rng.uniforms == [] and rng.picks == []


def test_sampled_all_siblings_rejected_samples_the_residual() -> None:
    """u = 0.9 rejects child 1 (0.9 ≥ 0.3), child 2 (0.9·0.7 = 0.63 ≥ 0.15) and child 3
    (0.9·0.55 = 0.495 ≥ 0.25). The bonus comes from p0 with tokens 1, 2, 3 zeroed:
    [0.1, 0, 0, 0, 0.2] / 0.3. Pick 4 is no child's token: the round ends."""
    rng = ScriptedRng([0.9, 0.9, 0.9], [4])
    verdict = verify_sampled(SAMPLED_TREE, SAMPLED_VERIFIED, probs_for(SAMPLED_TREE, P), rng)
    assert as_tuple(verdict) == ([0], 4, -1)
    np.testing.assert_allclose(rng.choice_p[0], [1 / 3, 0, 0, 0, 2 / 3])


def test_sampled_two_levels_with_a_rejected_grandchild() -> None:
    """u = 0.1 < 0.3 accepts child 1. At node 1: grandchild 4 (token 0) with u = 0.5 ≥ 0.35 is
    rejected, residual 0.65; grandchild 5 (token 4) with u·0.65 = 0.195 < 0.2 is accepted. Node 5
    is a leaf: the bonus is drawn from p5 as is."""
    rng = ScriptedRng([0.1, 0.5, 0.3], [0])
    verdict = verify_sampled(SAMPLED_TREE, SAMPLED_VERIFIED, probs_for(SAMPLED_TREE, P), rng)
    assert as_tuple(verdict) == ([0, 1, 5], 0, -1)
    np.testing.assert_allclose(rng.choice_p[0], P[5])


# ---- sampled: distributions -------------------------------------------------------------------


def committed(tree: DraftTree, verdict: Verdict) -> tuple[int, ...]:
    """The output tokens of one verification: accepted draft tokens, then the bonus."""
    return (*tree.tokens[verdict.accepted[1:]].tolist(), verdict.bonus_token)


def target_distribution(tree: DraftTree, verified: np.ndarray, rows: dict[int, list[float]],
                        node: int = 0) -> dict[tuple[int, ...], float]:
    """Exact probability of each committed sequence under the target alone: the first token x ~ p
    at `node`; if x is a verified child's token, the sequence continues under that child's p."""
    out: dict[tuple[int, ...], float] = {}
    for token, p in enumerate(rows[node]):
        if p == 0:
            continue
        kids = [int(c) for c in tree.children(node) if verified[c] and tree.tokens[c] == token]
        if kids:
            for rest, q in target_distribution(tree, verified, rows, kids[0]).items():
                out[(token, *rest)] = p * q
        else:
            out[(token,)] = p
    return out


def chi_square(counts: Counter[tuple[int, ...]], expected: dict[tuple[int, ...], float],
               n_draws: int) -> tuple[float, int]:
    """Pearson's statistic over the cells of non-zero probability, and its degrees of freedom.
    A draw in a zero-probability cell fails at once."""
    assert set(counts) <= set(expected), f"impossible outcomes {set(counts) - set(expected)}"
    stat = sum((counts[cell] - n_draws * p) ** 2 / (n_draws * p) for cell, p in expected.items())
    return stat, len(expected) - 1


def expected_next_root(tree: DraftTree, verified: np.ndarray, verdict: Verdict) -> int:
    last = int(verdict.accepted[-1])
    hits = [int(c) for c in tree.children(last) if tree.tokens[c] == verdict.bonus_token]
    assert not any(verified[c] for c in hits), "a verified child with the bonus token was not accepted"
    return hits[0] if hits else -1


def test_sampled_committed_sequence_is_distributed_as_the_target() -> None:
    """Losslessness at T = 1 (V = 5): the root has 3 verified children, child 1 has 2 verified
    grandchildren (and an unverified one), child 2 an unverified one. The committed sequence
    (first, second and, under child 1's verified grandchildren, third token) must follow the
    target's product of conditionals p0(x)·p_x(y)·…, computed exactly; cells p3(2) = p3(4) = 0
    must never occur.

    60 000 draws, numpy Generator seed 0; 23 cells of non-zero probability → 22 degrees of
    freedom, Pearson χ² below the 0.999 quantile 48.268. Each draw's next_root is the unverified
    child of the last accepted node carrying the bonus, if any.
    """
    expected = target_distribution(SAMPLED_TREE, SAMPLED_VERIFIED, P)
    assert len(expected) == 23
    assert sum(expected.values()) == pytest.approx(1.0)
    assert expected[(1, 0, 3)] == pytest.approx(0.30 * 0.35 * 0.20)
    probs = probs_for(SAMPLED_TREE, P)
    rng = np.random.default_rng(0)
    n_draws = 60_000
    counts: Counter[tuple[int, ...]] = Counter()
    reroots = Counter()
    for _ in range(n_draws):
        verdict = verify_sampled(SAMPLED_TREE, SAMPLED_VERIFIED, probs, rng)
        counts[committed(SAMPLED_TREE, verdict)] += 1
        assert verdict.next_root == expected_next_root(SAMPLED_TREE, SAMPLED_VERIFIED, verdict)
        reroots[verdict.next_root] += 1
    stat, dof = chi_square(counts, expected, n_draws)
    assert dof == 22
    assert stat < CHI2_999[22], f"chi2 = {stat:.1f} over {dof} dof: {sorted(counts.items())}"
    # Re-roots happen exactly when the sequence ends on an unverified child's token: (1, 2) → 6,
    # (2, 1) → 7. Their frequencies are those cells' counts.
    assert reroots[6] == counts[(1, 2)] > 0 and reroots[7] == counts[(2, 1)] > 0
    # The first-token marginal alone, in the same draws: exactly p0.
    firsts = Counter({(x,): sum(c for cell, c in counts.items() if cell[0] == x) for x in range(5)})
    stat, dof = chi_square(firsts, {(x,): p for x, p in enumerate(P[0])}, n_draws)
    assert dof == 4 and stat < CHI2_999[4], stat


@pytest.mark.parametrize(
    ("tree", "verified"),
    [
        (make_tree([0, 1, 3], [-1, 0, 0]), flags(1, 0, 0)),  # children exist, none verified yet
        (root_only(token=0, position=10, node_id=5), flags(1)),
    ],
    ids=["unverified_children", "root_only"],
)
def test_sampled_without_visible_children_samples_the_full_target(tree: DraftTree, verified: np.ndarray) -> None:
    """Nothing to accept or reject: the root is committed and the bonus is a plain sample of p0
    (8 000 draws, seed 0, 5 cells → 4 dof, χ² < 18.467). A bonus equal to an unverified child's
    token re-roots there (token 1 → node 1, token 3 → node 2)."""
    probs = np.full((len(tree), 5), np.nan)
    probs[0] = P[0]
    rng = np.random.default_rng(0)
    n_draws = 8_000
    counts: Counter[tuple[int, ...]] = Counter()
    for _ in range(n_draws):
        verdict = verify_sampled(tree, verified, probs, rng)
        assert verdict.accepted.tolist() == [0]
        counts[(verdict.bonus_token,)] += 1
        assert verdict.next_root == expected_next_root(tree, verified, verdict)
    stat, dof = chi_square(counts, {(x,): p for x, p in enumerate(P[0])}, n_draws)
    assert dof == 4 and stat < CHI2_999[4], stat


def run_many(tree: DraftTree, verified: np.ndarray, rows: dict[int, list[float]], n_draws: int,
             seed: int = 0) -> tuple[Counter[tuple[int, ...]], list[Verdict]]:
    probs = probs_for(tree, rows)
    rng = np.random.default_rng(seed)
    verdicts = [verify_sampled(tree, verified, probs, rng) for _ in range(n_draws)]
    return Counter(committed(tree, v) for v in verdicts), verdicts


def test_sampled_never_accepts_children_the_target_gives_zero_mass() -> None:
    """p0 = [0.6, 0, 0, 0, 0.4]: tokens 1..3 (all three verified children) have no mass, so every
    child is rejected whatever the draw and the bonus is 0 or 4 in ratio 0.6 : 0.4 (5 000 draws,
    1 dof, χ² < 10.828). The residual after three zero-mass rejections is p0 itself."""
    rows = {**P, 0: [0.6, 0.0, 0.0, 0.0, 0.4]}
    counts, verdicts = run_many(SAMPLED_TREE, SAMPLED_VERIFIED, rows, 5_000)
    assert all(v.accepted.tolist() == [0] and v.next_root == -1 for v in verdicts)
    stat, dof = chi_square(counts, {(0,): 0.6, (4,): 0.4}, 5_000)
    assert dof == 1 and stat < CHI2_999[1], stat


def test_sampled_rejects_earlier_siblings_then_accepts_the_one_holding_all_mass() -> None:
    """p0 is one-hot on token 3 (the third child): children 1 and 2 are rejected with certainty,
    after which token 3 holds all the residual mass and is accepted with certainty, every draw.
    The walk then continues at node 3 (leaf): bonus ~ p3, never its zero-mass tokens 2 and 4."""
    rows = {**P, 0: [0.0, 0.0, 0.0, 1.0, 0.0]}
    counts, verdicts = run_many(SAMPLED_TREE, SAMPLED_VERIFIED, rows, 2_000)
    assert all(v.accepted.tolist() == [0, 3] for v in verdicts)
    assert set(counts) <= {(3, 0), (3, 1), (3, 3)}


def test_sampled_children_holding_all_mass_leave_no_residual_at_the_root() -> None:
    """p0 = [0, 0.5, 0, 0.5, 0]: if child 1 is rejected, token 2 has no mass and token 3 holds the
    whole residual, so some child is always accepted (never a bonus at the root, never a 0/0
    residual). First tokens 1 and 3 split 50 : 50 (5 000 draws, 1 dof, χ² < 10.828)."""
    rows = {**P, 0: [0.0, 0.5, 0.0, 0.5, 0.0]}
    counts, verdicts = run_many(SAMPLED_TREE, SAMPLED_VERIFIED, rows, 5_000)
    assert all(len(v.accepted) >= 2 for v in verdicts)
    firsts = Counter({(x,): sum(c for cell, c in counts.items() if cell[0] == x) for x in (1, 3)})
    stat, dof = chi_square(firsts, {(1,): 0.5, (3,): 0.5}, 5_000)
    assert dof == 1 and stat < CHI2_999[1], stat


def test_sampled_grandchildren_without_mass_fall_back_to_an_unverified_sibling() -> None:
    """Under node 1, p1 = [0, 0.5, 0.5, 0, 0] gives the verified grandchildren (tokens 0 and 4) no
    mass: both are rejected and the bonus is 1 or 2; bonus 2 is node 6's token (unverified), so
    the tree re-roots there. With p0 one-hot on token 1, every draw goes through node 1."""
    rows = {**P, 0: [0.0, 1.0, 0.0, 0.0, 0.0], 1: [0.0, 0.5, 0.5, 0.0, 0.0]}
    counts, verdicts = run_many(SAMPLED_TREE, SAMPLED_VERIFIED, rows, 2_000)
    assert set(counts) == {(1, 1), (1, 2)}
    for v in verdicts:
        assert v.accepted.tolist() == [0, 1]
        assert v.next_root == (6 if v.bonus_token == 2 else -1)


# ---- property: the shape of every verdict -----------------------------------------------------


@st.composite
def partially_verified_trees(draw: st.DrawFn) -> tuple[DraftTree, np.ndarray, np.ndarray, np.ndarray]:
    """A random topological tree over a 6-token vocabulary with distinct sibling tokens, a random
    verified set containing the root, random target distributions (some entries zero) and argmaxes."""
    vocab = 6
    n = draw(st.integers(1, 12))
    parents = [-1]
    tokens = [draw(st.integers(0, vocab - 1))]
    for i in range(1, n):
        parent = draw(st.integers(0, i - 1))
        used = {tokens[j] for j in range(1, i) if parents[j] == parent}
        free = [t for t in range(vocab) if t not in used]
        if not free:
            break
        parents.append(parent)
        tokens.append(draw(st.sampled_from(free)))
    tree = make_tree(tokens, parents)
    n = len(tree)
    verified = np.array([True] + [draw(st.booleans()) for _ in range(n - 1)])
    gen = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    probs = gen.dirichlet(np.ones(vocab), size=n)
    probs[gen.random((n, vocab)) < 0.3] = 0.0
    probs[np.arange(n), gen.integers(0, vocab, n)] += 0.1  # never all zero
    probs /= probs.sum(axis=1, keepdims=True)
    argmax = gen.integers(0, vocab, n)
    return tree, verified, probs, argmax


def assert_well_formed(tree: DraftTree, verified: np.ndarray, verdict: Verdict) -> None:
    path = verdict.accepted.tolist()
    assert path[0] == 0
    for parent, child in zip(path, path[1:]):
        assert tree.parents[child] == parent, f"accepted {child} without its parent {tree.parents[child]}"
    assert verified[path].all()
    last = path[-1]
    assert not any(verified[c] and tree.tokens[c] == verdict.bonus_token for c in tree.children(last))
    if verdict.next_root >= 0:
        assert tree.parents[verdict.next_root] == last
        assert not verified[verdict.next_root]
        assert tree.tokens[verdict.next_root] == verdict.bonus_token
    else:
        assert verdict.bonus_token not in tree.tokens[tree.children(last)].tolist()


@settings(derandomize=True, deadline=None, max_examples=300)
@given(case=partially_verified_trees(), seed=st.integers(0, 2**32 - 1))
def test_verdicts_follow_parent_links_through_verified_nodes(
    case: tuple[DraftTree, np.ndarray, np.ndarray, np.ndarray], seed: int
) -> None:
    """For random trees and verified sets, greedy and sampled verification both accept a root-first
    parent-linked path of verified nodes (never a node whose parent was rejected), end with a bonus
    that no verified child of the last node carries, and re-root exactly on the unverified child
    carrying it. Greedy additionally follows the argmax at every step; sampled only ever commits
    tokens with non-zero target mass."""
    tree, verified, probs, argmax = case
    greedy = verify_greedy(tree, verified, argmax)
    assert_well_formed(tree, verified, greedy)
    path = greedy.accepted.tolist()
    for parent, child in zip(path, path[1:]):
        assert tree.tokens[child] == argmax[parent]
    assert greedy.bonus_token == argmax[path[-1]]

    sampled = verify_sampled(tree, verified, probs, np.random.default_rng(seed))
    assert_well_formed(tree, verified, sampled)
    path = sampled.accepted.tolist()
    for parent, child in zip(path, path[1:]):
        assert probs[parent, tree.tokens[child]] > 0
    assert probs[path[-1], sampled.bonus_token] > 0


# ---- relaxed (dsd) ----------------------------------------------------------------------------

# A chain root(50) - 1(11) - 2(12) - 3(13) over a 4-token vocabulary {10, 11, 12, 13} shifted to
# indices 0..3 below: p rows are the target's distributions at nodes 0, 1, 2, 3.
CHAIN = make_tree([50, 1, 2, 3], [-1, 0, 1, 2])
CHAIN_ALL = flags(1, 1, 1, 1)


def p_row(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def test_entropy_importance_is_one_over_the_tokens_the_target_hesitates_between() -> None:
    assert entropy_importance(p_row(1, 0, 0, 0)) == 1.0
    assert entropy_importance(p_row(0.25, 0.25, 0.25, 0.25)) == pytest.approx(0.25)
    assert entropy_importance(p_row(0.5, 0.5, 0, 0)) == pytest.approx(0.5)
    assert entropy_importance(p_row(*[1 / 8] * 8)) == pytest.approx(1 / 8)  # the vocabulary's size does not enter


def test_relaxed_at_tau_zero_is_the_greedy_walk() -> None:
    argmax = np.array([1, 0, 2, 3])  # accepts 1, then the target wants 0 where the chain has 2
    probs = [p_row(0.1, 0.6, 0.2, 0.1), p_row(0.45, 0.1, 0.44, 0.01), p_row(0.1, 0.1, 0.7, 0.1), p_row(1, 0, 0, 0)]
    strict = verify_greedy(CHAIN, CHAIN_ALL, argmax)
    relaxed = verify_relaxed(CHAIN, CHAIN_ALL, argmax, probs, tau=0.0)
    assert as_tuple(relaxed) == as_tuple(strict) == ([0, 1], 0, -1) and relaxed.n_relaxed == 0


def test_relaxed_accepts_a_near_tie_where_the_target_is_unsure_and_goes_on() -> None:
    """At node 1 the target prefers 0 (0.45) over the chain's 2 (0.44); with importance `none` the
    threshold at tau = 0.1 is 0.9 x 0.45 = 0.405, so 2 passes; node 2 then agrees with the chain (3)."""
    argmax = np.array([1, 0, 3, 0])
    probs = [None, p_row(0.45, 0.1, 0.44, 0.01), None, None]
    verdict = verify_relaxed(CHAIN, CHAIN_ALL, argmax, probs, tau=0.1, importance=IMPORTANCE["none"])
    assert as_tuple(verdict) == ([0, 1, 2, 3], 0, -1) and verdict.n_relaxed == 1
    # the same position with a clear preference refuses the chain's token
    probs[1] = p_row(0.8, 0.1, 0.09, 0.01)
    verdict = verify_relaxed(CHAIN, CHAIN_ALL, argmax, probs, tau=0.1, importance=IMPORTANCE["none"])
    assert as_tuple(verdict) == ([0, 1], 0, -1) and verdict.n_relaxed == 0


def test_relaxed_is_strict_where_the_target_is_certain() -> None:
    """Importance 1 (all mass on one token) leaves no room whatever tau is."""
    argmax = np.array([1, 0, 2, 3])
    probs = [None, p_row(1.0, 0, 0, 0), None, None]
    verdict = verify_relaxed(CHAIN, CHAIN_ALL, argmax, probs, tau=1.0)
    assert as_tuple(verdict) == ([0, 1], 0, -1) and verdict.n_relaxed == 0


def test_relaxed_waits_for_an_unverified_child_carrying_the_argmax() -> None:
    """In a tree whose argmax child is not back yet, the walk re-roots there as the greedy one does."""
    argmax = np.array([12, 0, 0, 0, 0, 0])
    probs = [p_row(*[1 / 60] * 60)] * 6
    verdict = verify_relaxed(GREEDY_TREE, flags(1, 1, 0, 0, 0, 0), argmax, probs, tau=1.0)
    assert as_tuple(verdict) == ([0], 12, 2) and verdict.n_relaxed == 0
