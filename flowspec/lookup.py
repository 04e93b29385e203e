"""Prompt lookup: a drafter with no weights that proposes what followed the current suffix before.

Theory of operation
-------------------
For a frontier node, the sequence is the committed context followed by the node's path from the
root. Its last n tokens (n = max_n down to 1) are looked up in the rest of the sequence; every
earlier occurrence votes for the token that followed it. Candidates from longer suffixes come
first, and within one length the more frequent (then the more recent) token wins. Log-probs are
calibrated loosely: a token's share of the votes at its length times that length's confidence,
n / (n + 1), so a tree's cumulative scores still rank longer, repeated matches higher. When fewer
than k tokens were found the row is filled with tokens that never occurred after the suffix, at a
log-prob far below any real candidate, so EAGLE-2's re-ranking leaves them out unless it has room.

This works for any target (it never looks at a model), costs microseconds per node, and shines on
repetitive output: code, lists, summaries that quote the prompt.

`WithLookup` adds lookup's candidates to a model drafter's (an EAGLE head's, say): per frontier
node the k best of both lists, a token both propose keeping its better log-prob. The two are
complementary: a head predicts free text, lookup continues whatever the answer copies (an article
being summarised, numbers, code). Only suffixes of at least `min_n` tokens vote, since one-token
matches are mostly noise next to a head.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from flowspec.tree import Drafter, DraftTree, FloatArray, IntArray

FILLER_LOGP = -30.0  # far below any vote share: a filler only enters a tree that has room to spare


class PromptLookupDrafter:
    def __init__(self, vocab_size: int, *, max_n: int = 4, min_n: int = 1) -> None:
        assert vocab_size >= 2 and 1 <= min_n <= max_n
        self.vocab_size = vocab_size
        self.max_n = max_n
        self.min_n = min_n

    def lookup(self, seq: IntArray, k: int) -> tuple[list[int], list[float]]:
        """Up to k distinct next-token candidates for `seq`, best first, with their log-probs."""
        tokens: list[int] = []
        logps: list[float] = []
        for n in range(min(self.max_n, len(seq) - 1), self.min_n - 1, -1):
            windows = sliding_window_view(seq[:-1], n)  # windows[i] = seq[i:i+n], followed by seq[i+n]
            hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
            if len(hits) == 0:
                continue
            following = seq[hits + n]
            found, first_seen, counts = np.unique(following[::-1], return_index=True, return_counts=True)
            order = np.lexsort((first_seen, -counts))  # most votes, then most recent
            confidence = n / (n + 1)
            for i in order.tolist():
                token = int(found[i])
                if token in tokens:
                    continue
                tokens.append(token)
                logps.append(float(np.log(confidence * counts[i] / len(hits))))
                if len(tokens) == k:
                    return tokens, logps
        return tokens, logps

    def propose(self, context: IntArray, pool: DraftTree, frontier: IntArray, k: int) -> tuple[IntArray, FloatArray]:
        assert k < self.vocab_size, "k proposals need k distinct tokens"
        context = np.asarray(context, dtype=np.int64)
        out_tokens = np.empty((len(frontier), k), dtype=np.int64)
        out_logp = np.empty((len(frontier), k))
        for row, node in enumerate(frontier.tolist()):
            seq = np.concatenate([context, pool.tokens[pool.path(node)]])
            tokens, logps = self.lookup(seq, k)
            filler = int(seq[-1])
            while len(tokens) < k:
                filler = (filler + 1) % self.vocab_size
                if filler not in tokens:
                    tokens.append(filler)
                    logps.append(FILLER_LOGP - len(tokens))
            out_tokens[row] = tokens
            out_logp[row] = logps
        return out_tokens, out_logp


def merge_proposals(tokens_a: IntArray, logp_a: FloatArray, tokens_b: IntArray, logp_b: FloatArray,
                    k: int) -> tuple[IntArray, FloatArray]:  # fmt: skip
    """Per row, the k best distinct tokens of two [n, k] proposals, best first; a token in both
    keeps its better log-prob. Ties go to `a` (the model drafter)."""
    tokens = np.concatenate([tokens_a, tokens_b], axis=1)
    logp = np.concatenate([logp_a, logp_b], axis=1)
    out_tokens = np.empty((len(tokens), k), dtype=np.int64)
    out_logp = np.empty((len(tokens), k))
    for row in range(len(tokens)):
        order = np.argsort(-logp[row], kind="stable")  # stable: a's column comes first on ties
        _, first = np.unique(tokens[row, order], return_index=True)  # each token's best entry
        best = order[np.sort(first)][:k]
        out_tokens[row], out_logp[row] = tokens[row, best], logp[row, best]
    return out_tokens, out_logp


class WithLookup:
    """A model drafter whose proposals are merged with prompt lookup's (see the module docstring)."""

    def __init__(self, model: Drafter, vocab_size: int, *, max_n: int = 4, min_n: int = 2) -> None:
        self.model = model
        self.lookup = PromptLookupDrafter(vocab_size, max_n=max_n, min_n=min(min_n, max_n))

    def observe(self, *args) -> None:
        """Forwarded to a model drafter that reads the target's features (the EAGLE head)."""
        if hasattr(self.model, "observe"):
            self.model.observe(*args)

    def propose(self, context: IntArray, pool: DraftTree, frontier: IntArray, k: int) -> tuple[IntArray, FloatArray]:
        tokens_a, logp_a = self.model.propose(context, pool, frontier, k)
        tokens_b, logp_b = self.lookup.propose(context, pool, frontier, k)
        return merge_proposals(np.asarray(tokens_a), np.asarray(logp_a), tokens_b, logp_b, k)
