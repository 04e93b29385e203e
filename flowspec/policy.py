"""What each policy drafts, how it cuts the tree, when it verifies and how it expands.

Theory of operation
-------------------
Every policy runs on the same machinery in `flowspec.pipeline`: segments stream through the stages,
D0 verifies what came back, broadcasts one prune, and either re-roots (the round continues) or
drafts a new tree (the round ends). Policies differ only in the four decisions made here:

| policy            | initial tree            | segments                   | verifies          | expands     |
|-------------------|-------------------------|----------------------------|-------------------|-------------|
| flowspec          | EAGLE-2, score order    | n_stages+1 slices (≤ size) | every segment     | grow+merge  |
| flowspec-noexpand | EAGLE-2, score order    | n_stages+1 slices (≤ size) | every segment     | never       |
| chunk-pp          | EAGLE-2, layer order    | n_stages equal chunks      | whole tree        | never       |
| pipedec           | one layer per segment   | root, then n_stages layers | every segment     | one layer   |
| ar-pp             | the root alone          | one                        | whole tree        | never       |
| serial            | EAGLE-2, layer order    | one                        | whole tree        | never       |
| single-sd         | EAGLE-2, layer order    | one                        | whole tree        | never       |

`single-sd` decides exactly like `serial`; the backend runs it on one device holding every layer.
A policy that verifies the whole tree can never re-root (a matching child would have been
accepted), so each of its steps ends the round.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from flowspec.config import Policy, Scenario
from flowspec.order import near_equal, segment_sizes
from flowspec.tree import Drafter, DraftTree, IntArray, grow, grow_layer, merge, root_only

WHOLE_TREE = frozenset({Policy.CHUNK_PP, Policy.AR_PP, Policy.SERIAL, Policy.SINGLE_SD})


class CountingDrafter:
    """Wraps a drafter to count forward calls and frontier rows (the sizes a `Draft` command carries)."""

    def __init__(self, drafter: Drafter) -> None:
        self.inner = drafter
        self.n_calls = 0
        self.n_rows = 0

    def propose(
        self, context: IntArray, pool: DraftTree, frontier: IntArray, k: int
    ) -> tuple[IntArray, np.ndarray]:
        self.n_calls += 1
        self.n_rows += len(frontier)
        return self.inner.propose(context, pool, frontier, k)


@dataclass(frozen=True, slots=True, eq=False)
class Drafted:
    tree: DraftTree  # the tree after drafting (merged, for an expansion)
    sizes: list[int]  # segment sizes for the new nodes, which are the last sum(sizes) nodes
    next_id: int  # first unused node id


def device_scenario(scenario: Scenario) -> Scenario:
    """The scenario as the policy runs it, in every backend: `single-sd` is one stage holding every
    layer on the first stage's device (beside D0), the others the scenario's pipeline. The core, the simulator's platform and
    the runtime's cluster all take this one, so they agree on how many stages there are."""
    if scenario.policy is not Policy.SINGLE_SD:
        return scenario
    return replace(
        scenario,
        pipeline=replace(scenario.pipeline, n_stages=1, layers=()),
        devices=replace(scenario.devices, per_stage=scenario.stage_profiles[:1]),  # the first stage's device
        network=replace(scenario.network, links=scenario.network.links[:2]),  # D0's link and that stage's
    )


def verifies_whole_tree(policy: Policy) -> bool:
    return policy in WHOLE_TREE


def initial_tree(
    scenario: Scenario, drafter: Drafter, context: IntArray, root_token: int, next_id: int
) -> Drafted:
    """The round's first tree, rooted at `root_token` at position len(context), and its segments."""
    policy, cfg, n_stages = scenario.policy, scenario.tree, scenario.pipeline.n_stages
    position = len(context)
    if policy is Policy.AR_PP:
        return Drafted(root_only(root_token, position, next_id), [1], next_id + 1)
    if policy is Policy.PIPEDEC:
        tree = root_only(root_token, position, next_id)
        next_id += 1
        sizes = [1]
        for _ in range(n_stages):
            tree, n_new = grow_layer(drafter, context, tree, width=scenario.pipedec.width, next_id=next_id)
            next_id += n_new
            sizes.append(n_new)
        return Drafted(tree, sizes, next_id)
    order = "score" if policy in (Policy.FLOWSPEC, Policy.FLOWSPEC_NOEXPAND) else "pool"
    tree = grow(
        drafter, context, root_token, position,
        depth=cfg.depth, topk=cfg.topk, total=cfg.total, order=order,
    )  # fmt: skip
    tree = DraftTree(tree.ids + next_id, tree.tokens, tree.parents, tree.positions, tree.scores)
    n = len(tree)
    if policy in (Policy.FLOWSPEC, Policy.FLOWSPEC_NOEXPAND):
        sizes = segment_sizes(n, n_stages + 1, cfg.segment_size)
    elif policy is Policy.CHUNK_PP:
        sizes = [s for s in near_equal(n, n_stages) if s > 0]
    else:
        sizes = [n]
    return Drafted(tree, sizes, next_id + n)


def expand(
    scenario: Scenario, drafter: Drafter, context: IntArray, tree: DraftTree, next_id: int
) -> Drafted | None:
    """Grow the re-rooted `tree` after a verification; None when the policy never expands."""
    policy = scenario.policy
    if policy is Policy.FLOWSPEC:
        cfg = scenario.expansion
        fresh = grow(
            drafter, context, int(tree.tokens[0]), int(tree.positions[0]),
            depth=cfg.depth, topk=cfg.topk, total=cfg.total, order="score",
        )  # fmt: skip
        merged, n_new = merge(tree, fresh, next_id)
        return Drafted(merged, [n_new] if n_new else [], next_id + n_new)
    if policy is Policy.PIPEDEC:
        grown, n_new = grow_layer(drafter, context, tree, width=scenario.pipedec.width, next_id=next_id)
        return Drafted(grown, [n_new] if n_new else [], next_id + n_new)
    return None
