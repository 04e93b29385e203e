"""Prompt lookup: candidates from earlier occurrences of the suffix, longest suffix first."""

from __future__ import annotations

import numpy as np

from flowspec.lookup import FILLER_LOGP, PromptLookupDrafter, WithLookup, merge_proposals
from flowspec.tree import DraftTree, grow, root_only


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


def test_merged_proposals_keep_the_k_best_distinct_tokens() -> None:
    tokens, logp = merge_proposals(np.array([[5, 6, 7], [1, 2, 3]]), np.array([[-0.5, -1.0, -2.0], [-0.1, -0.2, -0.3]]),
                                   np.array([[7, 9, 5], [4, 1, 8]]), np.array([[-0.2, -0.9, -3.0], [-0.2, -0.05, -9.0]]),
                                   3)  # fmt: skip
    # row 0: 7 from lookup (-0.2 beats the head's -2.0), the head's 5 (-0.5 beats lookup's -3.0), lookup's 9
    # row 1: lookup's 1 (-0.05), the head's 2, then 4 and the head's -0.2 tie: the head's goes first
    assert tokens.tolist() == [[7, 5, 9], [1, 2, 4]]
    assert logp.tolist() == [[-0.2, -0.5, -0.9], [-0.05, -0.2, -0.2]]


class _Scripted:
    """A model drafter that always proposes tokens 90, 91 (log-probs -1, -2) and records observe calls."""

    def __init__(self) -> None:
        self.observed = 0

    def observe(self, *args) -> None:
        self.observed += 1

    def propose(self, context, pool, frontier, k):
        return np.tile([90, 91], (len(frontier), 1))[:, :k], np.tile([-1.0, -2.0], (len(frontier), 1))[:, :k]


def test_with_lookup_adds_copied_continuations_to_a_model_drafter() -> None:
    model = _Scripted()
    drafter = WithLookup(model, vocab_size=100, max_n=4, min_n=2)
    context = np.array([10, 11, 12, 13, 14, 10, 11, 12])
    tree = grow(drafter, context, root_token=13, root_position=8, depth=2, topk=2, total=6)
    # (10, 11, 12, 13) was followed by 14 (log 4/5 = -0.22, above the model's -1): the copy leads every depth
    best_path = tree.tokens[tree.path(int(np.argmax(tree.depths)))].tolist()
    assert best_path == [13, 14, 10, 11]
    assert 90 in tree.tokens.tolist()  # the model's proposals still fill the rest
    drafter.observe(0, None)
    assert model.observed == 1


def test_one_token_matches_do_not_vote_with_min_n_2() -> None:
    model = _Scripted()
    drafter = WithLookup(model, vocab_size=100, min_n=2)
    tree = root_only(token=7, position=3, node_id=0)
    tokens, _ = drafter.propose(np.array([7, 8, 5]), tree, np.array([0]), 2)
    assert tokens.tolist() == [[90, 91]]  # (5, 7) never occurred; 7 -> 8 is a one-token match, left out
    tokens, _ = WithLookup(model, vocab_size=100, min_n=1).propose(np.array([7, 8, 5]), tree, np.array([0]), 2)
    assert tokens.tolist() == [[8, 90]]  # log(1/2) beats the model's -1


def brute_force_lookup(seq: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The definition: every earlier occurrence of each suffix votes for its next token."""
    found: list[int] = []
    for n in range(min(max_n, len(seq) - 1), min_n - 1, -1):
        follows = [q for q in range(n, len(seq)) if seq[q - n : q] == seq[len(seq) - n :]]
        votes = [seq[q] for q in reversed(follows)]
        for token in sorted(set(votes), key=lambda t: (-votes.count(t), votes.index(t))):
            if token not in found and len(found) < k:
                found.append(token)
    return found


def test_indexed_proposals_match_the_definition_on_growing_contexts():
    """The n-gram index is extended as a context grows and rebuilt when it changes; proposals for
    every frontier path equal a full scan of context + path."""
    rng = np.random.default_rng(7)
    drafter = PromptLookupDrafter(vocab_size=6, max_n=3, min_n=2)
    context = rng.integers(0, 4, size=30).tolist()
    for step in range(12):
        context = context + rng.integers(0, 4, size=3).tolist() if step != 6 else rng.integers(0, 4, size=25).tolist()
        pool = DraftTree(ids=np.arange(4), tokens=rng.integers(0, 4, size=4), parents=np.array([-1, 0, 1, 0]),
                         positions=len(context) + np.array([0, 1, 2, 1]), scores=np.zeros(4))  # fmt: skip
        tokens, _ = drafter.propose(np.array(context), pool, np.array([0, 1, 2, 3]), k=3)
        for row, node in enumerate([0, 1, 2, 3]):
            seq = context + pool.tokens[pool.path(node)].tolist()
            expected = brute_force_lookup(seq, 3, 2, 3)
            assert tokens[row, : len(expected)].tolist() == expected, (step, node)
