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

import copy

import numpy as np

from flowspec.tree import Drafter, DraftTree, FloatArray, IntArray

FILLER_LOGP = -30.0  # far below any vote share: a filler only enters a tree that has room to spare


class NgramIndex:
    """Where every n-gram (min_n <= n <= max_n) of a growing sequence occurred: n-gram -> the
    positions of the tokens that followed it, ascending. Extended as the committed context grows
    (a request's context only grows), rebuilt when it changes, so a proposal costs a dict lookup
    per suffix length instead of a scan of the whole context per frontier row."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.seq: list[int] = []
        self.follows: dict[tuple[int, ...], list[int]] = {}

    def sync(self, seq: list[int]) -> None:
        n_old = len(self.seq)
        if len(seq) < n_old or seq[:n_old] != self.seq:
            self.seq, self.follows, n_old = [], {}, 0
        for q in range(max(n_old, self.min_n), len(seq)):  # q: a following token's position
            for n in range(self.min_n, min(self.max_n, q) + 1):
                self.follows.setdefault(tuple(seq[q - n : q]), []).append(q)
        self.seq = list(seq)


class PromptLookupDrafter:
    def __init__(self, vocab_size: int, *, max_n: int = 4, min_n: int = 1) -> None:
        assert vocab_size >= 2 and 1 <= min_n <= max_n
        self.vocab_size = vocab_size
        self.max_n = max_n
        self.min_n = min_n
        self.index = NgramIndex(min_n, max_n)

    def lookup(self, seq: IntArray, k: int) -> tuple[list[int], list[float]]:
        """Up to k distinct next-token candidates for `seq`, best first, with their log-probs."""
        seq = np.asarray(seq).tolist()
        self.index.sync(seq[:-1])
        return self._lookup(seq[:-1], seq[-1:], k)

    def _lookup(self, context: list[int], path: list[int], k: int) -> tuple[list[int], list[float]]:
        """`lookup` of context + path, with `self.index` synced on `context`: occurrences whose
        following token lies in the context come from the index, the few later ones from a scan."""
        seq_len, ctx_len = len(context) + len(path), len(context)
        base = max(ctx_len - self.max_n, 0)
        near = context[base:] + path  # positions base.. of the sequence: every suffix and later window
        tokens: list[int] = []
        logps: list[float] = []
        for n in range(min(self.max_n, seq_len - 1), self.min_n - 1, -1):
            suffix = tuple(near[len(near) - n :])
            follows = list(self.index.follows.get(suffix, ()))
            follows += [q for q in range(max(n, ctx_len), seq_len) if tuple(near[q - n - base : q - base]) == suffix]
            if not follows:
                continue
            counts: dict[int, int] = {}
            first_seen: dict[int, int] = {}
            for rank, q in enumerate(reversed(follows)):  # most recent first
                token = context[q] if q < ctx_len else near[q - base]
                counts[token] = counts.get(token, 0) + 1
                first_seen.setdefault(token, rank)
            confidence = n / (n + 1)
            for token in sorted(counts, key=lambda t: (-counts[t], first_seen[t])):  # most votes, then most recent
                if token in tokens:
                    continue
                tokens.append(token)
                logps.append(float(np.log(confidence * counts[token] / len(follows))))
                if len(tokens) == k:
                    return tokens, logps
        return tokens, logps

    def propose(self, context: IntArray, pool: DraftTree, frontier: IntArray, k: int) -> tuple[IntArray, FloatArray]:
        assert k < self.vocab_size, "k proposals need k distinct tokens"
        context = np.asarray(context, dtype=np.int64).tolist()
        self.index.sync(context)
        out_tokens = np.empty((len(frontier), k), dtype=np.int64)
        out_logp = np.empty((len(frontier), k))
        for row, node in enumerate(frontier.tolist()):
            path = pool.tokens[pool.path(node)].tolist()
            tokens, logps = self._lookup(context, path, k)
            filler = path[-1]
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
    tokens = np.concatenate([tokens_a, tokens_b], axis=1).tolist()
    logp = np.concatenate([logp_a, logp_b], axis=1).tolist()
    out_tokens = np.empty((len(tokens), k), dtype=np.int64)
    out_logp = np.empty((len(tokens), k))
    for row, (row_tokens, row_logp) in enumerate(zip(tokens, logp)):
        kept: dict[int, float] = {}  # token -> its best log-prob, best first
        for j in sorted(range(len(row_tokens)), key=row_logp.__getitem__, reverse=True):
            kept.setdefault(row_tokens[j], row_logp[j])
            if len(kept) == k:
                break
        out_tokens[row], out_logp[row] = list(kept), list(kept.values())
    return out_tokens, out_logp


class WithLookup:
    """A model drafter whose proposals are merged with prompt lookup's (see the module docstring)."""

    def __init__(self, model: Drafter, vocab_size: int, *, max_n: int = 4, min_n: int = 2) -> None:
        self.model = model
        self.lookup = PromptLookupDrafter(vocab_size, max_n=max_n, min_n=min(min_n, max_n))

    def fork(self) -> WithLookup:
        """A drafter for another request served at once (a batch lane): the model drafter's own fork."""
        twin = copy.copy(self)
        fork = getattr(self.model, "fork", None)
        twin.model = self.model if fork is None else fork()
        return twin

    def observe(self, *args) -> None:
        """Forwarded to a model drafter that reads the target's features (the EAGLE head)."""
        if hasattr(self.model, "observe"):
            self.model.observe(*args)

    def propose(self, context: IntArray, pool: DraftTree, frontier: IntArray, k: int) -> tuple[IntArray, FloatArray]:
        tokens_a, logp_a = self.model.propose(context, pool, frontier, k)
        tokens_b, logp_b = self.lookup.propose(context, pool, frontier, k)
        return merge_proposals(np.asarray(tokens_a), np.asarray(logp_a), tokens_b, logp_b, k)
