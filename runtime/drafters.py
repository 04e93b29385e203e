"""Drafters that run a model on D0, behind the core's `Drafter` protocol.

Theory of operation
-------------------
`DraftKV` is the cache both model drafters keep (this module's LM and `runtime.eagle`'s head),
laid out as the stages' are: the committed context first, then the tree nodes it has run, each
under a tree mask (context + ancestors) at its absolute position. A call extends the context
part incrementally (it only grows within a request; anything else cuts back to the common
prefix), keeps the tree rows while the tree's root and context stay the same — EAGLE-2 growth
asks depth by depth on one pool — and runs only the frontier paths' nodes it has not seen.

`CausalLMDrafter` is an independent small causal LM that shares the target's tokenizer; the
frontier's top-k come from its own LM head.
"""

from __future__ import annotations

import numpy as np
import torch

from flowspec.tree import DraftTree, FloatArray, IntArray
from runtime.model_slice import LayerSlice


class DraftKV:
    """A drafter's KV cache laid out as a stage's: committed rows, then tree rows under a tree mask.

    `offset` leading context positions have no row (EAGLE's row i reads token i and feature i-1,
    so position 0 has none). Tree rows are kept while the context and the tree's root stay the
    same — EAGLE-2 growth asks depth by depth on one pool — and dropped when a node id turns out to
    name another node.
    """

    def __init__(self, runner: LayerSlice, offset: int = 0) -> None:
        self.runner = runner
        self.offset = offset
        self.context: list[int] = []  # committed tokens covered by rows (from position `offset`)
        self.stamp: tuple[int, int, int] | None = None  # (context length, root id, root token)
        self.tree: dict[int, tuple[int, int]] = {}  # node id -> (token, position), in KV slot order
        self.out: dict[int, torch.Tensor] = {}  # node id -> its row's output

    @property
    def n_committed(self) -> int:
        return max(len(self.context) - self.offset, 0)

    def begin(self, context: list[int], pool: DraftTree) -> int:
        """Align the cache with `context` and `pool`; the first context position still without a
        row (the caller `commit`s rows from there to the end of `context`)."""
        stamp = (len(context), int(pool.ids[0]), int(pool.tokens[0]))
        if stamp != self.stamp or context != self.context:
            same = 0
            limit = min(len(context), len(self.context))
            while same < limit and context[same] == self.context[same]:
                same += 1
            self.context = self.context[:same]
            self._crop()
            self.stamp = stamp
        return max(len(self.context), self.offset)

    @torch.inference_mode()
    def commit(self, x: torch.Tensor, first: int, context: list[int]) -> None:
        """Causal rows for context positions first..len(context)-1 (`x`: their inputs)."""
        n_old, n_new = self.runner.kv_len, len(context) - first
        visible = torch.ones(n_new, n_old + n_new, dtype=torch.bool)
        visible[:, n_old:] = torch.tril(visible[:, n_old:])
        self.runner(x, torch.arange(first, len(context)), visible)
        self.context = list(context)

    def missing(self, pool: DraftTree, frontier: IntArray) -> list[int]:
        """Pool rows on the frontier's paths that have not been run, in tree order."""
        rows = sorted({int(i) for node in frontier.tolist() for i in pool.path(node).tolist()})
        if any(self.tree.get(int(pool.ids[i]), key) != key
               for i in rows for key in [(int(pool.tokens[i]), int(pool.positions[i]))]):  # fmt: skip
            self.tree, self.out = {}, {}  # an id now names another node: start the tree over
            self._crop()
        return [i for i in rows if int(pool.ids[i]) not in self.tree]

    @torch.inference_mode()
    def run(self, pool: DraftTree, rows: IntArray, x: torch.Tensor) -> None:
        """Tree rows `rows` (ancestors run before, or among them) with inputs `x`: each sees the
        committed rows and its ancestors."""
        n_committed, kv_len = self.n_committed, self.runner.kv_len
        slot = {node: n_committed + j for j, node in enumerate(self.tree)}
        for j, i in enumerate(rows.tolist()):
            slot[int(pool.ids[i])] = kv_len + j
        visible = torch.zeros(len(rows), kv_len + len(rows), dtype=torch.bool)
        visible[:, :n_committed] = True
        for r, i in enumerate(rows.tolist()):
            for a in pool.path(i).tolist():
                visible[r, slot[int(pool.ids[a])]] = True
        out = self.runner(x, torch.from_numpy(pool.positions[rows]), visible)
        for r, i in enumerate(rows.tolist()):
            node = int(pool.ids[i])
            self.tree[node] = (int(pool.tokens[i]), int(pool.positions[i]))
            self.out[node] = out[r]

    def _crop(self) -> None:
        """Keep the committed rows only (a no-op when there is nothing else)."""
        n = self.n_committed
        if self.runner.kv_len != n:
            self.runner.keep(torch.arange(n)) if n else self.runner.reset()
        self.tree, self.out = {}, {}


def top_k(h: torch.Tensor, lm_head: torch.Tensor, k: int) -> tuple[IntArray, FloatArray]:
    """The k most likely next tokens [n, k] and their log-probs under `lm_head`, for rows `h`."""
    with torch.inference_mode():
        top = torch.log_softmax(h @ lm_head.T, dim=-1).topk(k, dim=-1)
    return top.indices.numpy().astype(np.int64), top.values.double().numpy()


class CausalLMDrafter:
    def __init__(self, model, vocab_size: int | None = None) -> None:
        if vocab_size is not None and model.config.vocab_size != vocab_size:
            from runtime.models import ModelError

            raise ModelError(f"runtime.draft_model: vocabulary of {model.config.vocab_size} tokens, the target has "
                             f"{vocab_size} (a draft LM must share the target's tokenizer)")  # fmt: skip
        self.kv = DraftKV(LayerSlice.from_model(model, 0, model.config.num_hidden_layers))
        self.head = model.get_output_embeddings().weight.detach()

    def propose(self, context: IntArray, pool: DraftTree, frontier: IntArray, k: int) -> tuple[IntArray, FloatArray]:
        ctx = [int(t) for t in context]
        first = self.kv.begin(ctx, pool)
        if first < len(ctx):
            self.kv.commit(torch.tensor(ctx[first:]), first, ctx)
        needed = np.array(self.kv.missing(pool, frontier), dtype=np.int64)
        if len(needed):
            self.kv.run(pool, needed, torch.from_numpy(pool.tokens[needed]))
        return top_k(torch.stack([self.kv.out[int(pool.ids[n])] for n in frontier.tolist()]), self.head, k)
