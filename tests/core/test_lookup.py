"""Prompt lookup: candidates from earlier occurrences of the suffix, longest suffix first."""

from __future__ import annotations

import numpy as np

from flowspec.lookup import FILLER_LOGP, PromptLookupDrafter
from flowspec.tree import grow, root_only


def test_longer_suffix_wins_then_votes_then_recency() -> None:
    drafter = PromptLookupDrafter(vocab_size=50, max_n=3)
    # suffix (1, 2): followed by 3 twice and 9 once; suffix (2,) adds 7 (after the lone 2 at index 7)
    seq = np.array([1, 2, 3, 4, 1, 2, 9, 2, 7, 1, 2, 3, 5, 1, 2])
    tokens, logps = drafter.lookup(seq, k=4)
    assert tokens == [3, 9, 7]  # (1,2)->3 (2 votes), (1,2)->9 (1 vote), then (2,)->7
    assert np.allclose(logps, np.log([2 / 3 * 2 / 3, 2 / 3 * 1 / 3, 1 / 2 * 1 / 4]))


def test_ties_go_to_the_most_recent_occurrence() -> None:
    drafter = PromptLookupDrafter(vocab_size=50, max_n=1)
    tokens, _ = drafter.lookup(np.array([4, 8, 4, 6, 4]), k=2)
    assert tokens == [6, 8]


def test_rows_are_filled_with_distinct_low_scored_tokens() -> None:
    drafter = PromptLookupDrafter(vocab_size=10, max_n=2)
    tree = root_only(token=9, position=3, node_id=0)
    tokens, logp = drafter.propose(np.array([5, 9, 1]), tree, np.array([0]), 3)
    # sequence 5 9 1 9: suffix (1, 9) unseen, (9,) was followed by 1 -> [1], then fillers after 9: 0, 2
    assert tokens.tolist() == [[1, 0, 2]]
    assert logp[0, 0] == np.log(0.5) and logp[0, 1] == FILLER_LOGP - 2 and logp[0, 2] == FILLER_LOGP - 3


def test_a_repeating_context_grows_the_repetition() -> None:
    drafter = PromptLookupDrafter(vocab_size=100, max_n=4)
    context = np.array([10, 11, 12, 13, 14, 10, 11, 12])
    tree = grow(drafter, context, root_token=13, root_position=8, depth=3, topk=2, total=4)
    best_path = tree.tokens[tree.path(int(np.argmax(tree.depths)))].tolist()
    assert best_path == [13, 14, 10, 11, 12]
