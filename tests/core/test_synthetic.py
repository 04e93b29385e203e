"""The synthetic drafter: its hits follow the acceptance table it is given, whatever the caller asks."""

from __future__ import annotations

import numpy as np

from flowspec import synthetic
from flowspec.synthetic import GroundTruth, HashLM, OracleDrafter
from flowspec.tree import DraftTree

VOCAB = 64
N_CONTEXTS = 2000


def chain(tokens: list[int], start: int) -> DraftTree:
    """A path tree of `tokens` rooted at position `start`."""
    n = len(tokens)
    return DraftTree(ids=np.arange(n), tokens=np.array(tokens), parents=np.arange(n) - 1,
                     positions=start + np.arange(n), scores=np.zeros(n))  # fmt: skip


def hits(drafter: OracleDrafter, truth: GroundTruth, contexts: list[list[int]], *, depth: int, k: int) -> np.ndarray:
    """[contexts] whether the target's token is among the k proposals for the node that ends each
    context, asked as a node `depth` levels below its tree's root."""
    out = []
    for ctx in contexts:
        committed, path = ctx[: len(ctx) - 1 - depth], ctx[len(ctx) - 1 - depth :]
        pool = chain(path, len(committed))
        tokens, _ = drafter.propose(np.array(committed), pool, np.array([depth]), k)
        out.append(truth.next_after(truth.key(ctx)) in tokens[0].tolist())
    return np.array(out)


def contexts(n: int, length: int = 6, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=length).tolist() for _ in range(n)]


def test_asking_for_more_children_than_the_table_has_ranks_still_misses_as_often(caplog) -> None:
    synthetic._WARNED_WIDTHS.clear()
    truth = GroundTruth(HashLM(VOCAB, 2, seed=1))
    drafter = OracleDrafter(truth, rank_table=np.array([[0.3, 0.2, 0.5]]), seed=4)  # ranks 0, 1; none 0.5
    ctxs = contexts(N_CONTEXTS)
    for k in (2, 5, 16):  # 16 > the table's 2 ranks: its none column must not become rank 2
        rate = hits(drafter, truth, ctxs, depth=0, k=k).mean()
        assert 0.46 < rate < 0.54, (k, rate)
    assert 0.26 < hits(drafter, truth, ctxs, depth=0, k=1).mean() < 0.34
    # said once per width over 2000 calls, so a user sees why a wide policy gains nothing from ranks
    # the profile never measured
    warned = [r.getMessage() for r in caplog.records if "acceptance profile has 2 ranks" in r.getMessage()]
    assert warned == [f"the acceptance profile has 2 ranks and the policy asks for {k} children: the target's "
                      f"token is never at ranks 2-{k - 1} (the profile cannot say how often it is)" for k in (5, 16)]


def test_a_node_asked_again_one_level_shallower_keeps_its_miss() -> None:
    # Children at depth 1 hit 90%, at depth 2 50%. A node asked at depth 1 and, after a re-root,
    # again at depth 0 reads each depth's rate, but a hit deep is a hit shallow: a real drafter's
    # hard token stays hard. Independent draws per depth would hit deep only for ~5% of nodes.
    truth = GroundTruth(HashLM(VOCAB, 2, seed=2))
    drafter = OracleDrafter(truth, rank_table=np.array([[0.9, 0.0, 0.1], [0.3, 0.2, 0.5]]), seed=7)
    ctxs = contexts(N_CONTEXTS, seed=1)
    deep = hits(drafter, truth, ctxs, depth=1, k=2)
    shallow = hits(drafter, truth, ctxs, depth=0, k=2)
    assert 0.46 < deep.mean() < 0.54 and 0.87 < shallow.mean() < 0.93
    assert not (deep & ~shallow).any()
    # the same node at the same depth is answered the same way every time
    assert (hits(drafter, truth, ctxs, depth=1, k=2) == deep).all()
