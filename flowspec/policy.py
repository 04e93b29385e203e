"""What each policy drafts, how it cuts the tree, when it verifies and how it expands.

Theory of operation
-------------------
Every policy runs on the same machinery in `flowspec.pipeline`: segments stream through the stages,
D0 verifies what came back, broadcasts one prune, and either re-roots (the round continues) or
drafts a new tree (the round ends). A policy is one `PolicySpec` in `POLICIES`: how it drafts and
cuts its first tree, how it expands, whether it verifies only whole trees, whether it runs on one
device, whether it is lossless. The core and both backends ask the spec, never the name; a new
policy is one entry here (and its name in `flowspec.config.Policy`).

| policy            | initial tree            | segments                   | verifies          | expands     |
|-------------------|-------------------------|----------------------------|-------------------|-------------|
| flowspec          | EAGLE-2, score order    | n_stages+1 slices (≤ size) | every segment     | grow+merge  |
| flowspec-noexpand | EAGLE-2, score order    | n_stages+1 slices (≤ size) | every segment     | never       |
| chunk-pp          | EAGLE-2, layer order    | n_stages equal chunks      | whole tree        | never       |
| pipedec           | one layer per segment   | root, then n_stages layers | every segment     | one layer * |
| ar-pp             | the root alone          | one                        | whole tree        | never       |
| serial            | EAGLE-2, layer order    | one                        | whole tree        | never       |
| single-sd         | EAGLE-2, layer order    | one                        | whole tree        | never       |
| specpipe          | best nodes per segment  | root, then n_stages × w    | every segment     | best nodes *|
| dsd               | a greedy chain          | one                        | whole chain **    | never       |
| specpipe-db       | as specpipe             | as specpipe                | every segment     | as specpipe |
| ar-pp-db          | as ar-pp                | as ar-pp                   | whole tree        | never       |

The `-db` policies serve up to `pipeline.max_batch` requests at once (`flowspec.batch`).

(*) also after a step whose segment came back pruned empty (`refills_emptied`).
`specpipe` (SpecPipe, arXiv 2504.04104 v2, PipeDec's successor) fills the pipeline with
`specpipe.width` nodes per step like PipeDec, but takes the best new nodes anywhere in its tree
(`flowspec.tree.grow_best`), not the deepest layer's children, so a shallow node's second-best child
can enter before a deep node's best. Only the paper's abstract could be read. What it states is
built: a dynamic tree fed by the drafter that outputs tokens to the pipeline step by step, about one
token decoded per pipeline step, pruning propagated to every node. The gaps, filled by our reading:
- the tree step re-asks every node short of `width` children, as a cache of its candidates would
  answer (the EAGLE drafter keeps each node's head output, so a repeat costs its LM-head rows; the
  simulator charges one draft call over those rows). The simulator's synthetic drafter answers a
  repeat at a new depth with that depth's hit rate but the same draw (`flowspec.synthetic`), so a
  re-ask is no free retry;
- the fill schedule is PipeDec's (the root alone, then one `width` segment per stage);
- the draft model is the scenario's drafter (the paper uses a small LLM of the target's family,
  not fine-tuned); pruning is D0's one broadcast per step, as for every policy here;
- SpecPipe-DB, its multi-request mode with dynamic batching, is `specpipe-db`: each request in
  the batch runs specpipe's own schedule, and a device forwards whatever segments of them wait for
  it as one batch (`flowspec.batch` says what was read and what was filled in). `ar-pp-db` is the
  same batching over plain autoregressive decoding, the vLLM-style baseline the paper measures
  SpecPipe-DB against.
(**) `dsd` (DSD, arXiv 2511.11733) drafts `dsd.length` tokens and verifies them in one traversal of
the pipeline, relaxing acceptance where the position matters little when `dsd.tau > 0`
(`flowspec.verify.verify_relaxed`): lossy then, lossless at tau = 0, so `lossless` is False for it
and `Scenario.lossless` says which a scenario is.
A policy that verifies the whole tree can never re-root (a matching child would have been
accepted), so each of its steps ends the round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from flowspec.config import Policy, Scenario
from flowspec.order import near_equal, segment_sizes
from flowspec.tree import Drafter, DraftTree, IntArray, grow, grow_best, grow_layer, merge, root_only


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


# (scenario, drafter, committed context, root token, first free node id) -> the round's first tree
Initial = Callable[[Scenario, Drafter, IntArray, int, int], Drafted]
# (scenario, drafter, committed context, the re-rooted tree, first free node id) -> the grown tree
Expand = Callable[[Scenario, Drafter, IntArray, DraftTree, int], Drafted]


def _root_alone(scenario: Scenario, drafter: Drafter, context: IntArray, root_token: int, next_id: int) -> Drafted:
    return Drafted(root_only(root_token, len(context), next_id), [1], next_id + 1)


def _per_stage(step: Callable[..., tuple[DraftTree, int]], width: Callable[[Scenario], int]) -> Initial:
    """The root, then one `step` of `width` nodes per stage, each its own segment (PipeDec, SpecPipe)."""

    def initial(scenario: Scenario, drafter: Drafter, context: IntArray, root_token: int, next_id: int) -> Drafted:
        tree = root_only(root_token, len(context), next_id)
        next_id += 1
        sizes = [1]
        for _ in range(scenario.pipeline.n_stages):
            tree, n_new = step(drafter, context, tree, width=width(scenario), next_id=next_id)
            next_id += n_new
            sizes.append(n_new)
        return Drafted(tree, sizes, next_id)

    return initial


def _one_step(step: Callable[..., tuple[DraftTree, int]], width: Callable[[Scenario], int]) -> Expand:
    """One more `step` of `width` nodes after a verification (PipeDec: a layer; SpecPipe: the best)."""

    def expand(scenario: Scenario, drafter: Drafter, context: IntArray, tree: DraftTree, next_id: int) -> Drafted:
        grown, n_new = step(drafter, context, tree, width=width(scenario), next_id=next_id)
        return Drafted(grown, [n_new] if n_new else [], next_id + n_new)

    return expand


def _pipedec_width(scenario: Scenario) -> int:
    return scenario.pipedec.width


def _specpipe_width(scenario: Scenario) -> int:
    return scenario.specpipe.width


def _eagle2(order: str, split: Callable[[int, Scenario], list[int]]) -> Initial:
    """An EAGLE-2 tree (`scenario.tree`) in `order`, cut into segments by `split`."""

    def initial(scenario: Scenario, drafter: Drafter, context: IntArray, root_token: int, next_id: int) -> Drafted:
        cfg = scenario.tree
        tree = grow(drafter, context, root_token, len(context), depth=cfg.depth, topk=cfg.topk, total=cfg.total,
                    order=order)  # fmt: skip
        tree = DraftTree(tree.ids + next_id, tree.tokens, tree.parents, tree.positions, tree.scores)
        return Drafted(tree, split(len(tree), scenario), next_id + len(tree))

    return initial


def _chain(scenario: Scenario, drafter: Drafter, context: IntArray, root_token: int, next_id: int) -> Drafted:
    """DSD: the drafter's greedy chain of `dsd.length` tokens after the root, one segment."""
    k = scenario.dsd.length
    chain = grow(drafter, context, root_token, len(context), depth=k - 1, topk=1, total=k, order="pool")
    chain = DraftTree(chain.ids + next_id, chain.tokens, chain.parents, chain.positions, chain.scores)
    return Drafted(chain, [len(chain)], next_id + len(chain))


def _grow_and_merge(scenario: Scenario, drafter: Drafter, context: IntArray, tree: DraftTree, next_id: int) -> Drafted:
    """FlowSpec: a fresh EAGLE-2 tree (`scenario.expansion`) from the new root, merged in."""
    cfg = scenario.expansion
    fresh = grow(drafter, context, int(tree.tokens[0]), int(tree.positions[0]),
                 depth=cfg.depth, topk=cfg.topk, total=cfg.total, order="score")  # fmt: skip
    merged, n_new = merge(tree, fresh, next_id)
    return Drafted(merged, [n_new] if n_new else [], next_id + n_new)


def _score_slices(n: int, scenario: Scenario) -> list[int]:
    return segment_sizes(n, scenario.pipeline.n_stages + 1, scenario.tree.segment_size)


def _stage_chunks(n: int, scenario: Scenario) -> list[int]:
    return [s for s in near_equal(n, scenario.pipeline.n_stages) if s > 0]


def _whole(n: int, scenario: Scenario) -> list[int]:
    return [n]


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """One policy, whole: the backends and reports read these fields instead of naming policies."""

    initial: Initial  # how it drafts and cuts a round's first tree
    expand: Expand | None = None  # how it grows the tree after a verification; None: never
    whole_tree: bool = False  # verifies once every segment of the round's tree is back (never re-roots)
    # Expands on a step whose segment came back pruned empty, too. PipeDec sends one layer per pipeline
    # step whatever happened to the last one; without it, every segment emptied when the new root lies
    # several segments ahead leaves a hole in the pipeline for the rest of the round. FlowSpec's
    # reference leaves the hole (its `none_expand` is off in the evaluation).
    refills_emptied: bool = False
    one_device: bool = False  # runs on one device holding every layer, beside D0 (no pipeline, free messages)
    lossless: bool = True  # its output is always the target's own (greedy: token for token); False: it
    # can be lossy, depending on the scenario (Scenario.lossless)
    reference_baseline: bool = False  # tables report every policy's speed-up over it
    # Serves up to `pipeline.max_batch` requests at once, each with its own tree, segments and prunes
    # (`flowspec.batch.BatchCore`); devices forward what waits for them as one batch.
    batched: bool = False


POLICIES: dict[Policy, PolicySpec] = {
    Policy.FLOWSPEC: PolicySpec(_eagle2("score", _score_slices), expand=_grow_and_merge),
    Policy.FLOWSPEC_NOEXPAND: PolicySpec(_eagle2("score", _score_slices)),
    Policy.CHUNK_PP: PolicySpec(_eagle2("pool", _stage_chunks), whole_tree=True, reference_baseline=True),
    Policy.PIPEDEC: PolicySpec(_per_stage(grow_layer, _pipedec_width), expand=_one_step(grow_layer, _pipedec_width),
                               refills_emptied=True),  # fmt: skip
    Policy.SPECPIPE: PolicySpec(_per_stage(grow_best, _specpipe_width), expand=_one_step(grow_best, _specpipe_width),
                                refills_emptied=True),  # fmt: skip
    Policy.AR_PP: PolicySpec(_root_alone, whole_tree=True, reference_baseline=True),
    Policy.SERIAL: PolicySpec(_eagle2("pool", _whole), whole_tree=True),
    Policy.SINGLE_SD: PolicySpec(_eagle2("pool", _whole), whole_tree=True, one_device=True),
    Policy.DSD: PolicySpec(_chain, whole_tree=True, lossless=False),
    Policy.SPECPIPE_DB: PolicySpec(_per_stage(grow_best, _specpipe_width),
                                   expand=_one_step(grow_best, _specpipe_width), refills_emptied=True,
                                   batched=True),  # fmt: skip
    Policy.AR_PP_DB: PolicySpec(_root_alone, whole_tree=True, batched=True),
}


def spec(policy: Policy | str) -> PolicySpec:
    return POLICIES[Policy(policy)]


def reference_baselines() -> list[str]:
    """The policies every speed-up table is reported against, in `POLICIES` order (chunk-pp, the
    paper's baseline, first)."""
    return [str(p) for p, s in POLICIES.items() if s.reference_baseline]


def device_scenario(scenario: Scenario) -> Scenario:
    """The scenario as the policy runs it, in every backend: a `one_device` policy is one stage
    holding every layer on the first stage's device (beside D0), the others the scenario's
    pipeline. The core, the simulator's platform and the runtime's cluster all take this one, so
    they agree on how many stages there are."""
    if not spec(scenario.policy).one_device:
        return scenario
    return replace(
        scenario,
        pipeline=replace(scenario.pipeline, n_stages=1, layers=()),
        devices=replace(scenario.devices, per_stage=scenario.stage_profiles[:1]),  # the first stage's device
        network=replace(scenario.network, links=scenario.network.links[:2]),  # D0's link and that stage's
    )


def batch_size(scenario: Scenario) -> int:
    """How many requests the scenario's policy serves at once: `pipeline.max_batch` for a batching
    policy, else one."""
    return scenario.pipeline.max_batch if spec(scenario.policy).batched else 1


def verifies_whole_tree(policy: Policy) -> bool:
    return spec(policy).whole_tree


def initial_tree(
    scenario: Scenario, drafter: Drafter, context: IntArray, root_token: int, next_id: int
) -> Drafted:
    """The round's first tree, rooted at `root_token` at position len(context), and its segments."""
    return spec(scenario.policy).initial(scenario, drafter, context, root_token, next_id)


def expand(
    scenario: Scenario, drafter: Drafter, context: IntArray, tree: DraftTree, next_id: int
) -> Drafted | None:
    """Grow the re-rooted `tree` after a verification; None when the policy never expands."""
    grow_tree = spec(scenario.policy).expand
    return None if grow_tree is None else grow_tree(scenario, drafter, context, tree, next_id)
