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

import copy

import numpy as np
import torch

from flowspec.tree import DraftTree, FloatArray, IntArray
from runtime import quantized
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


class TopK:
    """The k most likely next tokens [n, k] and their log-probs under an LM head, for rows `h`.

    A drafter asks for ten rows at a time, so its LM head costs what streaming the head from
    memory costs (SmolLM2's 8k-row draft head: 19 MB in fp32, 4 ms a call here). With `int8`
    (`runtime.quantized`) a head of `INT8_ROWS` rows or more is scored in two passes: int8 logits
    shortlist `shortlist` tokens per row, and those are rescored exactly in fp32. The top-k and
    their logits are the exact ones unless a true top-k token ranks below the shortlist in int8;
    the normaliser sums the exact logits of the shortlist and the int8 ones of the tail. Without
    `int8`, or for smaller heads (the tiny test models), one exact fp32 pass.
    """

    INT8_ROWS = 4096

    def __init__(self, lm_head: torch.Tensor, *, int8: bool = False, shortlist: int = 64) -> None:
        self.lm_head = lm_head.float().contiguous()
        self.shortlist = shortlist
        use_int8 = int8 and lm_head.shape[0] >= self.INT8_ROWS and quantized.available(lm_head.device)
        self.packed = quantized.pack(self.lm_head) if use_int8 else None

    @torch.inference_mode()
    def __call__(self, h: torch.Tensor, k: int) -> tuple[IntArray, FloatArray]:
        h = h.float()
        if self.packed is None or k > self.shortlist // 2:
            top = torch.log_softmax(h @ self.lm_head.T, dim=-1).topk(k, dim=-1)
            return top.indices.numpy().astype(np.int64), top.values.double().numpy()
        approx = quantized.linear(h, self.packed)  # [n, V]
        candidates = approx.topk(self.shortlist, dim=-1, sorted=False).indices  # [n, S]
        exact = torch.linalg.vecdot(self.lm_head[candidates], h[:, None, :])  # [n, S]; bmm is 5x slower here
        log_norm = approx.scatter(1, candidates, exact).logsumexp(dim=-1, keepdim=True)
        top = exact.topk(k, dim=-1)
        tokens = candidates.gather(1, top.indices)
        return tokens.numpy().astype(np.int64), (top.values - log_norm).double().numpy()


class CausalLMDrafter:
    def __init__(self, model, vocab_size: int | None = None, *, int8: bool = False) -> None:
        if vocab_size is not None and model.config.vocab_size != vocab_size:
            from runtime.models import ModelError

            raise ModelError(f"runtime.draft_model: vocabulary of {model.config.vocab_size} tokens, the target has "
                             f"{vocab_size} (a draft LM must share the target's tokenizer)")  # fmt: skip
        lm_head = model.get_output_embeddings().weight.detach()
        runner = LayerSlice.from_model(model, 0, model.config.num_hidden_layers)
        if int8 and quantized.available():
            runner = quantized.int8_copy(runner, quantized.DRAFT_INT8_WITHIN)
        self.kv = DraftKV(runner)
        self.top_k = TopK(lm_head, int8=int8)

    def fork(self) -> CausalLMDrafter:
        """A drafter for another request served at once (a batch lane): the same weights, its own KV."""
        twin = copy.copy(self)
        runner = copy.copy(self.kv.runner)  # shares the modules; its own cache below
        runner.reset()
        twin.kv = DraftKV(runner, offset=self.kv.offset)
        return twin

    def propose(self, context: IntArray, pool: DraftTree, frontier: IntArray, k: int) -> tuple[IntArray, FloatArray]:
        ctx = [int(t) for t in context]
        first = self.kv.begin(ctx, pool)
        if first < len(ctx):
            self.kv.commit(torch.tensor(ctx[first:]), first, ctx)
        needed = np.array(self.kv.missing(pool, frontier), dtype=np.int64)
        if len(needed):
            self.kv.run(pool, needed, torch.from_numpy(pool.tokens[needed]))
        return self.top_k(torch.stack([self.kv.out[int(pool.ids[n])] for n in frontier.tolist()]), k)
