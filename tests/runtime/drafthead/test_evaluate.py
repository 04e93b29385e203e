"""Offline drafter scoring: tree replays over known target answers count what greedy verification
would accept, and the summary turns rows into per-depth figures."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flowspec.config import TreeConfig
from flowspec.synthetic import ReferenceDrafter
from flowspec.tree import DraftTree
from runtime.drafthead.evaluate import accepted_length, replay_all, summarise, tree_card

TREE = TreeConfig(total=10, topk=3, depth=3, segment_size=4)


def _sample(n_prompt: int = 3, n_answer: int = 10, vocab: int = 50) -> SimpleNamespace:
    tokens = torch.tensor(np.random.default_rng(0).integers(0, vocab, n_prompt + n_answer))
    # the target's greedy token after each position is the next token of its own answer
    nxt = torch.cat([tokens[1:], torch.tensor([0])])
    return SimpleNamespace(tokens=tokens, next_tokens=nxt, n_prompt=n_prompt, features=torch.zeros(len(tokens), 4),
                           source="set-a")  # fmt: skip


def test_accepted_length_follows_the_matching_branch() -> None:
    # root -> (5, 6); 6 -> 7; 7 -> 8
    tree = DraftTree(ids=np.arange(5), tokens=np.array([1, 5, 6, 7, 8]), parents=np.array([-1, 0, 0, 2, 3]),
                     positions=np.array([4, 5, 5, 6, 7]), scores=np.zeros(5))  # fmt: skip
    assert accepted_length(tree, np.array([6, 7, 9])) == 2
    assert accepted_length(tree, np.array([6, 7, 8, 1])) == 3
    assert accepted_length(tree, np.array([6])) == 1  # the known chain ends there
    assert accepted_length(tree, np.array([4, 7])) == 0


@pytest.mark.parametrize(("ranks", "accepted", "mean"), [([0, 0, -1], [2, 2, 2], 3.0), ([0], [4, 4], 5.0),
                                                         ([-1], [0] * 9, 1.0), ([1, -1], [1] * 5, 2.0)])  # fmt: skip
def test_replay_counts_what_greedy_verification_accepts(ranks: list[int], accepted: list[int], mean: float) -> None:
    sample = _sample()
    drafter = ReferenceDrafter([sample.tokens.tolist()], ranks, vocab_size=50)
    frame = replay_all(drafter, [sample], TREE)
    assert frame["accepted"].tolist() == accepted
    # each verification starts where the last one's accepted tokens plus the bonus token left off
    assert frame["position"].tolist() == (3 + np.cumsum([0] + [a + 1 for a in accepted[:-1]])).tolist()
    assert (frame["tree_nodes"] == 10).all() and (frame["prompt_set"] == "set-a").all()
    card = tree_card(frame, TREE)
    assert card["mean_accepted_per_verification"] == mean and card["verifications"] == len(accepted)
    assert card["reach_depth"][1] == float(accepted[0] >= 1) and card["reach_depth"][4] == float(accepted[0] >= 4)


def test_summary_per_group() -> None:
    import pandas as pd

    frame = pd.DataFrame({"drafter": ["a", "a", "a", "b"], "accepted": [0, 1, 3, 2], "grow_ms": [1.0, 2.0, 3.0, 4.0]})
    out = summarise(frame, ["drafter"], 3).set_index("drafter")
    assert out.loc["a", "mean_accepted"] == pytest.approx(2.333333, abs=1e-5)
    assert out.loc["a", ["reach_1", "reach_2", "reach_3"]].tolist() == pytest.approx([2 / 3, 1 / 3, 1 / 3])
    assert out.loc["b", "verifications"] == 1 and out.loc["b", "grow_ms"] == 4.0
