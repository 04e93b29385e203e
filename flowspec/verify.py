"""Verification of a partially verified draft tree against the target's output.

Theory of operation
-------------------
D0 verifies whatever part of the tree has come back from the last stage. `verified[i]` says that
the target's output for node i is known. Starting at the root (always verified when anything is),
the walk accepts a child whose token the target chooses, as long as that child is verified too. The
token chosen at the last accepted node is the *bonus*. Three outcomes:

- the bonus is the token of a child that is not verified yet: re-root there, the round continues;
- no child carries the bonus: the round ends;
- (a verified child carrying the bonus is simply accepted; the walk goes on.)

T = 0 is greedy: the target's choice is its argmax. T > 0 uses multi-candidate speculative
sampling with *deterministic* drafts (EAGLE-2 picks children by top-k, so each candidate's draft
probability is a point mass): visible siblings are tried in tree order, each accepted with
probability p(x) under the current residual; a rejected x is zeroed out and p renormalised; if none
is accepted, the bonus is sampled from the residual. Marginally the committed token is exactly a
sample of p. Sampled-draft rules (min(1, p/q), residual max(0, p - q)) do not apply here.

Relaxed acceptance (the dsd policy, T = 0; after DSD, arXiv 2511.11733): the walk follows the
target's argmax as the greedy one does; where no verified child carries it, the verified child the
target likes best is accepted anyway when the position matters little. A position's importance
i(p) ∈ (0, 1] comes from the target's distribution p there (`IMPORTANCE`: exp(-H(p)) by default,
one over the number of tokens the target effectively hesitates between: 1 where it is certain, 1/m
where it spreads evenly over m tokens, whatever the vocabulary's size), and the child's token x
passes when

    p(x) ≥ (1 - τ · (1 - i(p))) · max p.

τ = 0 is the greedy walk (lossless); a certain target (i = 1) is always verified strictly; at τ = 1
an unimportant position accepts whatever the draft proposed. The paper states the idea (relax
low-importance tokens, one parameter τ) but not this formula: this rule is our reading of it.
Each relaxed acceptance is counted (`Verdict.n_relaxed`), so tables can say how many committed
tokens strict verification would have refused.

Rule: verification reads arrays and an explicit `numpy.random.Generator`; it never mutates the tree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from flowspec.tree import DraftTree, IntArray


@dataclass(frozen=True, slots=True, eq=False)
class Verdict:
    accepted: IntArray  # [a] tree indices of the accepted path, root first (a >= 1)
    bonus_token: int  # the target's token after the accepted path
    next_root: int  # tree index of the unverified child carrying the bonus; -1: the round ends
    n_relaxed: int = 0  # accepted nodes whose token was not the target's choice (relaxed acceptance)

    @property
    def n_accepted(self) -> int:
        return len(self.accepted)


def _child_with_token(tree: DraftTree, node: int, token: int) -> int:
    kids = tree.children(node)
    hit = kids[tree.tokens[kids] == token]
    return int(hit[0]) if len(hit) else -1


def verify_greedy(
    tree: DraftTree, verified: np.ndarray, argmax: IntArray, relax: Callable[[int, list[int]], int] | None = None
) -> Verdict:  # fmt: skip
    """Accept the longest verified path that follows the target's argmax.

    `verified`: [n] bool; `argmax`: [n] target argmax per node (read only where verified).
    `relax(node, verified_children)`, where the argmax child is not in the tree, may name one of
    them to accept anyway (`verify_relaxed`), or -1.

    Example: tokens [r, a, b, c] with parents [-1, 0, 0, 1], nodes 0..2 verified, argmax at the
    root = a and at a = c: a is accepted, c (node 3) is unverified, so next_root = 3, bonus c.
    """
    assert verified[0], "the root must be verified"
    node, path, n_relaxed = 0, [0], 0
    while True:
        bonus = int(argmax[node])
        child = _child_with_token(tree, node, bonus)
        if child >= 0 and verified[child]:
            node = child
            path.append(child)
            continue
        kids = [int(c) for c in tree.children(node) if verified[c]] if relax is not None and child < 0 else []
        chosen = relax(node, kids) if kids else -1  # an unverified argmax child is waited for, never overruled
        if chosen >= 0:
            node = chosen
            path.append(chosen)
            n_relaxed += 1
            continue
        return Verdict(np.array(path, dtype=np.int64), bonus, child, n_relaxed)


def verify_sampled(
    tree: DraftTree, verified: np.ndarray, probs: np.ndarray, rng: np.random.Generator
) -> Verdict:
    """Multi-candidate speculative sampling over the verified part of the tree.

    `probs`: [n, V] the target's next-token distribution per node (temperature already applied;
    read only where verified). Lossless: the committed tokens are distributed as the target's.
    """
    assert verified[0], "the root must be verified"
    node = 0
    path = [0]
    while True:
        p = np.array(probs[node], dtype=np.float64)
        accepted = -1
        for child in tree.children(node):
            if not verified[child]:
                continue
            token = int(tree.tokens[child])
            total = p.sum()
            if rng.random() * total < p[token]:
                accepted = int(child)
                break
            p[token] = 0.0
        if accepted >= 0:
            node = accepted
            path.append(accepted)
            continue
        bonus = int(rng.choice(len(p), p=p / p.sum()))
        # Verified children were zeroed out above, so a match here is always unverified.
        return Verdict(np.array(path, dtype=np.int64), bonus, _child_with_token(tree, node, bonus))


def entropy_importance(p: np.ndarray) -> float:
    """exp(-H(p)), the inverse of the target's perplexity at this position: 1 where it is certain,
    1/m where it spreads evenly over m tokens. (1 - H / log V would call almost every position of a
    49k-token vocabulary important: a few nats of entropy are a small share of log 49152.)"""
    q = p[p > 0]
    return float(np.exp((q * np.log(q)).sum()))


IMPORTANCE: dict[str, Callable[[np.ndarray], float]] = {
    "entropy": entropy_importance,
    "none": lambda p: 0.0,  # every position equally unimportant: a plain share of max p
}


def verify_relaxed(
    tree: DraftTree, verified: np.ndarray, argmax: IntArray, probs: Sequence[np.ndarray | None], tau: float,
    importance: Callable[[np.ndarray], float] = entropy_importance,
) -> Verdict:  # fmt: skip
    """The greedy walk, relaxed where the position matters little (module docstring).

    `argmax`: [n] the target's choice per node; `probs`: [n] its distribution [V] per node (both read
    only where verified). The bonus is always the target's argmax at the last accepted node.
    """
    if tau <= 0:
        return verify_greedy(tree, verified, argmax)

    def relax(node: int, kids: list[int]) -> int:
        p = np.asarray(probs[node], dtype=np.float64)
        best = max(kids, key=lambda c: p[tree.tokens[c]])
        return best if p[tree.tokens[best]] >= (1.0 - tau * (1.0 - importance(p))) * p[argmax[node]] else -1

    return verify_greedy(tree, verified, argmax, relax)
