"""A synthetic target model whose KV cache matters, and a drafter that knows it.

Theory of operation
-------------------
`HashLM` is a "transformer" made of hash functions. Token x at position i enters as h₀ = embed(x).
Layer l turns every visible position j into a KV entry c_l(j) = kv(h_{l-1}(j), j, l) and updates

    h_l(i) = layer(h_{l-1}(i), i, S_l(i)),   S_l(i) = Σ_{j visible to i} c_l(j)   (mod 2⁶⁴)

and the next token is h_L(i) mod V. Like attention, the sum is order-free but position-aware, so a
stage that keeps a wrong KV slot, drops a right one, mis-masks a tree row or shifts a position
produces a different token: the greedy-equality tests see every bookkeeping error.

`HashLM.forward_rows` is what an emulated stage runs over its KV; `GroundTruth` evaluates the same
model on a plain sequence (what a single device would compute) with a cache keyed by context, so
drafters and tests can ask for the target's greedy token cheaply. `OracleDrafter` proposes top-k
children that contain the target's token with a chosen probability and rank — the synthetic
drafter/target pair that tests use now and the simulator calibrates from acceptance profiles.
"""

from __future__ import annotations

import logging

import numpy as np

from flowspec.tree import DraftTree, IntArray

log = logging.getLogger(__name__)
_WARNED_WIDTHS: set[tuple[int, int]] = set()  # (profile ranks, children asked): said once per process

_M = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix(x: int) -> int:
    """splitmix64 finalizer on Python ints."""
    z = (x + _GOLDEN) & _M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    return z ^ (z >> 31)


def _mix_np(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrap-around arithmetic, bit-identical to `_mix`)."""
    z = x + np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class HashLM:
    """The hash "transformer": `n_layers` layers over a `vocab_size` vocabulary."""

    def __init__(self, vocab_size: int, n_layers: int, seed: int = 0) -> None:
        assert vocab_size >= 2 and n_layers >= 1
        self.vocab_size = vocab_size
        self.n_layers = n_layers
        self.seed = _mix(seed)

    # scalar forms (GroundTruth) ------------------------------------------------------------------
    def embed(self, token: int) -> int:
        return _mix(token ^ self.seed)

    def kv(self, h: int, position: int, layer: int) -> int:
        return _mix(h ^ _mix(position ^ (layer << 40) ^ self.seed))

    def layer(self, h: int, position: int, s: int, layer: int) -> int:
        return _mix(h ^ _mix((s + position * _GOLDEN + layer) & _M))

    def next_token(self, h: int) -> int:
        return h % self.vocab_size

    # vector form (emulated stages) ----------------------------------------------------------------
    def embed_rows(self, tokens: IntArray) -> np.ndarray:
        return _mix_np(tokens.astype(np.uint64) ^ np.uint64(self.seed))

    def next_tokens(self, h: np.ndarray) -> IntArray:
        return (h % np.uint64(self.vocab_size)).astype(np.int64)

    def forward_rows(
        self,
        h_in: np.ndarray,  # [n] uint64 hidden states entering the first layer of the slice
        positions: IntArray,  # [n]
        kv: np.ndarray,  # [kv_len, n_slice_layers] uint64 KV entries already cached
        visible: np.ndarray,  # [n, kv_len + n] bool: cached slots, then the rows themselves
        first_layer: int,  # global index of the slice's first layer (1-based)
    ) -> tuple[np.ndarray, np.ndarray]:
        """Run a layer slice over `n` rows; the output hidden states [n] and new KV entries [n, layers]."""
        n_layers = kv.shape[1]
        pos = positions.astype(np.uint64)
        vis = visible.astype(np.uint64)
        h = h_in.astype(np.uint64)
        new_kv = np.zeros((len(h), n_layers), dtype=np.uint64)
        for j in range(n_layers):
            layer = np.uint64(first_layer + j)
            new_kv[:, j] = _mix_np(h ^ _mix_np(pos ^ (layer << np.uint64(40)) ^ np.uint64(self.seed)))
            column = np.concatenate([kv[:, j], new_kv[:, j]])
            s = vis @ column  # wraps mod 2**64, as the scalar form masks
            h = _mix_np(h ^ _mix_np(s + pos * np.uint64(_GOLDEN) + layer))
        return h, new_kv


class GroundTruth:
    """Single-device evaluation of a `HashLM` on plain sequences, cached by context."""

    def __init__(self, model: HashLM) -> None:
        self.model = model
        # context key -> (per-layer sums S_l, greedy next token); the key chains token hashes
        self._cache: dict[int, tuple[tuple[int, ...], int]] = {0: ((0,) * model.n_layers, -1)}

    def _extend(self, key: int, token: int, position: int) -> int:
        child = _mix(key ^ _mix(token + 1))
        if child not in self._cache:
            sums, _ = self._cache[key]
            m = self.model
            h = m.embed(token)
            new_sums = []
            for layer in range(1, m.n_layers + 1):
                s = (sums[layer - 1] + m.kv(h, position, layer)) & _M
                new_sums.append(s)
                h = m.layer(h, position, s, layer)
            self._cache[child] = (tuple(new_sums), m.next_token(h))
        return child

    def key(self, tokens: IntArray | list[int], start_key: int = 0, start_position: int = 0) -> int:
        """Cache key of `tokens` appended to the context `start_key` (which holds `start_position` tokens)."""
        key = start_key
        for i, token in enumerate(tokens):
            key = self._extend(key, int(token), start_position + i)
        return key

    def next_after(self, key: int) -> int:
        return self._cache[key][1]

    def greedy(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
        """What a single device decodes greedily: stops after EOS or `max_new_tokens` tokens."""
        key = self.key(prompt)
        out: list[int] = []
        while len(out) < max_new_tokens:
            token = self.next_after(key)
            out.append(token)
            if token == eos_token_id:
                break
            key = self._extend(key, token, len(prompt) + len(out) - 1)
        return out


class TableDrafter:
    """Scripted proposals: `table[path]` = (tokens, log-probs) for the frontier node whose token path
    from the root is `path`; other paths get `default`. Tests force accept patterns with it."""

    def __init__(self, table: dict[tuple[int, ...], tuple[list[int], list[float]]],
                 default: tuple[list[int], list[float]]) -> None:  # fmt: skip
        self.table = table
        self.default = default

    def propose(
        self, context: IntArray, pool: DraftTree, frontier: IntArray, k: int
    ) -> tuple[IntArray, np.ndarray]:
        rows = [self.table.get(tuple(pool.tokens[pool.path(int(i))].tolist()), self.default) for i in frontier]
        return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])


class PrefixKeys:
    """Context keys of a sequence that mostly grows: extends from the longest prefix seen last time.

    Decoding asks for the key of (prompt + committed tokens) over and over as it grows by a few
    tokens per step; rehashing it from the start would make a run quadratic in its length.
    """

    def __init__(self, truth: GroundTruth) -> None:
        self.truth = truth
        self._tokens: list[int] = []
        self._keys: list[int] = [0]  # _keys[i]: key of _tokens[:i]

    def key(self, tokens: IntArray | list[int]) -> int:
        tokens = [int(t) for t in tokens]
        n = min(len(tokens), len(self._tokens))
        same = n
        if tokens[:n] != self._tokens[:n]:
            same = next(i for i in range(n) if tokens[i] != self._tokens[i])
        del self._tokens[same:], self._keys[same + 1 :]
        for i in range(same, len(tokens)):
            self._keys.append(self.truth.key([tokens[i]], self._keys[i], i))
            self._tokens.append(tokens[i])
        return self._keys[len(tokens)]


class OracleDrafter:
    """Top-k proposals that contain the target's greedy token with a chosen probability and rank.

    `rank_table[d - 1, r]` is the probability that the target's token is the drafter's rank-r
    proposal for a child at depth d (last column: none of the k proposals); depths beyond the table
    reuse its last row. With a table, log-probs are calibrated — log P(rank r) at that depth, with
    a little hash noise so that trees are not all alike — so a tree's cumulative scores estimate
    the probability that a path is accepted, which is what EAGLE-2's re-ranking relies on. The
    shorthand `hit_rate` + `rank_weights` builds a one-row table and draws random descending
    log-probs instead. The same context and depth always get the same proposals, as from a
    deterministic draft model; the same context at another depth draws its rank from the same
    uniform under that depth's row (a coupling: `propose`).
    """

    def __init__(
        self,
        truth: GroundTruth,
        *,
        hit_rate: float | None = None,
        rank_weights: tuple[float, ...] = (1.0,),
        rank_table: np.ndarray | None = None,
        seed: int = 0,
    ) -> None:
        self.truth = truth
        self.seed = seed
        self._salt = np.uint64(_mix((seed * 7919) & _M))  # per drafter, so one seed's draws differ from another's
        self.calibrated = rank_table is not None
        if rank_table is None:
            assert hit_rate is not None, "give rank_table or hit_rate"
            weights = np.asarray(rank_weights, dtype=np.float64)
            rank_table = np.append(hit_rate * weights / weights.sum(), 1.0 - hit_rate)[None, :]
        table = np.asarray(rank_table, dtype=np.float64)
        assert table.ndim == 2 and np.allclose(table.sum(axis=1), 1.0), "rows must sum to 1"
        self.rank_table = table
        self._cdf = np.cumsum(table[:, :-1], axis=1)  # [depths, ranks]; beyond the last: none
        self._prefix = PrefixKeys(truth)
        self._stamp: tuple[int, int, int] | None = None
        self._keys: dict[int, int] = {}

    def _context_key(self, context: IntArray) -> int:
        return self._prefix.key(context)

    def _node_keys(self, base: int, n_context: int, pool: DraftTree, frontier: IntArray) -> list[int]:
        """Context keys of the frontier nodes, through a cache of their ancestors' keys.

        Pools grow append-only within one drafting, so a node id keeps its key while the base
        context and the root stay the same; anything else starts a new cache.
        """
        stamp = (base, int(pool.ids[0]), int(pool.tokens[0]))
        if stamp != self._stamp:
            self._stamp = stamp
            self._keys = {int(pool.ids[0]): self.truth.key([int(pool.tokens[0])], base, n_context)}
        keys = self._keys
        out = []
        for node in frontier.tolist():
            node_id = int(pool.ids[node])
            key = keys.get(node_id)
            if key is None:
                path = pool.path(node)
                known = len(path) - 1
                while int(pool.ids[path[known]]) not in keys:
                    known -= 1
                key = keys[int(pool.ids[path[known]])]
                for i in path[known + 1 :].tolist():
                    key = self.truth.key([int(pool.tokens[i])], key, int(pool.positions[i]))
                    keys[int(pool.ids[i])] = key
            out.append(key)
        return out

    def propose(
        self, context: IntArray, pool: DraftTree, frontier: IntArray, k: int
    ) -> tuple[IntArray, np.ndarray]:
        base = self._context_key(context)
        vocab = self.truth.model.vocab_size
        assert k < vocab, "the drafter needs a token outside its proposals"
        keys = self._node_keys(base, len(context), pool, frontier)
        targets = np.array([self.truth.next_after(key) for key in keys], dtype=np.int64)  # [f]
        rows = np.minimum(pool.depths[frontier], len(self.rank_table) - 1)  # [f] child depth - 1
        # Hash-derived uniforms [f, k + 3]: cheap, and a pure function of (seed, context), not of the
        # depth. A node asked again after a re-root (one level shallower) reads its new depth's row
        # with the same uniform: each depth keeps its marginal, and a miss stays a miss wherever the
        # shallower row's hit rate is no higher, as a real drafter's hard token stays hard. Fresh
        # dice per depth would hand a policy that re-asks (specpipe) free retries.
        seeds = np.array(keys, dtype=np.uint64) ^ self._salt
        u = _mix_np(seeds[:, None] ^ _mix_np(np.arange(k + 3, dtype=np.uint64))[None, :]) / 2.0**64
        offsets = (u[:, 0] * (vocab - 1)).astype(np.int64)
        tokens = (targets[:, None] + 1 + (offsets[:, None] + np.arange(k)) % (vocab - 1)) % vocab  # [f, k]
        cdf = self._cdf[rows]  # [f, ranks]
        ranks = (cdf <= u[:, 1:2]).sum(axis=1)  # searchsorted, right side, per row; cdf.shape[1]: none
        hit = np.flatnonzero(ranks < min(k, cdf.shape[1]))  # k beyond the table: its none still misses
        if k > cdf.shape[1] and self.calibrated and (cdf.shape[1], k) not in _WARNED_WIDTHS:
            _WARNED_WIDTHS.add((cdf.shape[1], k))
            log.warning("the acceptance profile has %d ranks and the policy asks for %d children: the target's "
                        "token is never at ranks %d-%d (the profile cannot say how often it is)",
                        cdf.shape[1], k, cdf.shape[1], k - 1)  # fmt: skip
        tokens[hit, ranks[hit]] = targets[hit]
        if self.calibrated:
            probs = np.full((len(frontier), k), 1e-6)
            width = min(k, self.rank_table.shape[1] - 1)
            probs[:, :width] = np.maximum(self.rank_table[rows, :width], 1e-6)
            logp = np.minimum(np.log(probs) + 0.05 * (u[:, 3:] - 0.5), 0.0)
        else:
            weights = -np.sort(-(u[:, 3:] + 1e-3), axis=1)
            logp = np.log(weights / (weights.sum(axis=1, keepdims=True) + 1.0))
        return tokens, logp


class ContextOracle:
    """The synthetic target's greedy token for segment rows, found through the rows' parent chains.

    A backend without hidden states (the simulator) registers each segment as it is sent: a row's
    context is its parent's context plus its own token, and a round root's (parent -1) is the
    committed sequence before it. `argmax` then answers for returned rows.
    """

    def __init__(self, truth: GroundTruth) -> None:
        self.truth = truth
        self._keys: dict[int, int] = {}
        self._prefix = PrefixKeys(truth)

    def register(self, node_ids: IntArray, tokens: IntArray, parent_ids: IntArray, positions: IntArray, committed: list[int]) -> None:
        for node, token, parent, position in zip(node_ids.tolist(), tokens.tolist(), parent_ids.tolist(), positions.tolist()):
            if parent >= 0:
                base = self._keys[parent]
            else:
                assert position == len(committed), "a round's root sits at the committed length"
                base = self._prefix.key(committed)
            self._keys[node] = self.truth.key([token], base, position)

    def argmax(self, node_ids: IntArray) -> IntArray:
        return np.array([self.truth.next_after(self._keys[n]) for n in node_ids.tolist()], dtype=np.int64)

    def after(self, tokens: list[int]) -> int:
        """The greedy token after a plain sequence (a prompt)."""
        return self.truth.next_after(self._prefix.key(tokens))

    def forget(self) -> None:
        """Drop every registered row (a request ended)."""
        self._keys.clear()


class ReferenceDrafter:
    """Scripted proposals around known target outputs, for tests on real models.

    `references` are full sequences the target produces greedily (prompt + output). For a frontier
    node whose sequence (context + path) is a prefix of a reference, the reference's next token is
    proposed at rank `ranks[d]` for a child at depth d + 1 (depths beyond the list reuse its last
    entry; -1: not proposed at all), between deterministic filler tokens; any other node gets
    fillers only. Log-probs by rank are `logp` (descending), so where the true token ranks also
    decides which segment it travels in. This forces accept patterns: `[-1]` rejects at depth 0,
    `[0, 0, -1]` accepts two then rejects, `[1]` rejects a branch and accepts its sibling, and
    `[0]` accepts every drafted token to the leaves.
    """

    def __init__(self, references: list[list[int]], ranks: list[int], vocab_size: int,
                 logp: tuple[float, ...] = (-0.1, -0.7, -1.2, -1.6, -2.0, -2.3, -2.6, -2.9)) -> None:  # fmt: skip
        self.references = [np.asarray(r, dtype=np.int64) for r in references]
        self.ranks = ranks
        self.vocab_size = vocab_size
        self.logp = np.asarray(logp)

    def _truth(self, seq: IntArray) -> int | None:
        for ref in self.references:
            if len(ref) > len(seq) and (ref[: len(seq)] == seq).all():
                return int(ref[len(seq)])
        return None

    def propose(
        self, context: IntArray, pool: DraftTree, frontier: IntArray, k: int
    ) -> tuple[IntArray, np.ndarray]:
        assert k <= len(self.logp) and k < self.vocab_size
        tokens = np.empty((len(frontier), k), dtype=np.int64)
        for row, node in enumerate(frontier.tolist()):
            seq = np.concatenate([np.asarray(context, dtype=np.int64), pool.tokens[pool.path(node)]])
            truth = self._truth(seq)
            rank = self.ranks[min(int(pool.depths[node]), len(self.ranks) - 1)]
            fillers = [t for t in ((int(seq[-1]) * 31 + 7 + 13 * j) % self.vocab_size for j in range(3 * k + 3))
                       if t != truth]  # fmt: skip
            fillers = list(dict.fromkeys(fillers))[:k]
            if truth is not None and 0 <= rank < k:
                fillers.insert(rank, truth)
            tokens[row] = fillers[:k]
        return tokens, np.tile(self.logp[:k], (len(frontier), 1))
