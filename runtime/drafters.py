"""Drafters that run a model on D0, behind the core's `Drafter` protocol.

Theory of operation
-------------------
`CausalLMDrafter` is an independent small causal LM that shares the target's tokenizer. It keeps
one KV cache laid out as the stages' are: the committed context first, then the tree nodes it has
run, each under a tree mask (context + ancestors) at its absolute position. A call extends the
context part incrementally (it only ever grows within a request; anything else is a new request
and starts over), keeps the tree rows while the tree's root and context stay the same — EAGLE-2
growth asks depth by depth on one pool — and runs only the frontier nodes it has not seen. The
frontier's top-k come from its own LM head.
"""

from __future__ import annotations

import numpy as np
import torch

from flowspec.tree import DraftTree, FloatArray, IntArray
from runtime.model_slice import LayerSlice


class CausalLMDrafter:
    def __init__(self, model, vocab_size: int | None = None) -> None:
        n = model.config.num_hidden_layers
        if vocab_size is not None and model.config.vocab_size != vocab_size:
            from runtime.models import ModelError

            raise ModelError(f"runtime.draft_model: vocabulary of {model.config.vocab_size} tokens, the target has "
                             f"{vocab_size} (a draft LM must share the target's tokenizer)")  # fmt: skip
        self.slice = LayerSlice.from_model(model, 0, n)
        self.head = model.get_output_embeddings().weight.detach()
        self._context: list[int] = []  # tokens whose KV fills the first slots
        self._stamp: tuple[int, int, int] | None = None  # (context length, root id, root token)
        self._rows: dict[int, int] = {}  # tree node id -> KV slot
        self._hidden: dict[int, torch.Tensor] = {}  # tree node id -> last hidden state
        self._seen: dict[int, tuple[int, int]] = {}  # tree node id -> (token, position) it was run with

    def _sync_context(self, context: list[int]) -> None:
        same = 0
        limit = min(len(context), len(self._context))
        while same < limit and context[same] == self._context[same]:
            same += 1
        if same < len(self._context) or self._rows:  # drop diverged context and every tree row
            if same == 0:
                self.slice.reset()
            else:
                self.slice.keep(torch.arange(same))
            self._context = self._context[:same]
            self._rows, self._hidden, self._seen, self._stamp = {}, {}, {}, None
        new = context[same:]
        if new:
            n_old = len(self._context)
            visible = torch.ones(len(new), n_old + len(new), dtype=torch.bool)
            visible[:, n_old:] = torch.tril(visible[:, n_old:])
            self.slice(torch.tensor(new), torch.arange(n_old, n_old + len(new)), visible)
            self._context = list(context)

    def propose(self, context: IntArray, pool: DraftTree, frontier: IntArray, k: int) -> tuple[IntArray, FloatArray]:
        context_list = [int(t) for t in context]
        stamp = (len(context_list), int(pool.ids[0]), int(pool.tokens[0]))
        if stamp != self._stamp or context_list != self._context:
            self._sync_context(context_list)
            if self._rows:  # same context, another tree: drop the tree rows
                self.slice.keep(torch.arange(len(self._context)))
                self._rows, self._hidden, self._seen = {}, {}, {}
            self._stamp = stamp
        path_rows = {int(i) for node in frontier.tolist() for i in pool.path(node).tolist()}
        if any(self._seen.get(int(pool.ids[i]), (t, p)) != (t, p)
               for i in path_rows for t, p in [(int(pool.tokens[i]), int(pool.positions[i]))]):  # fmt: skip
            self.slice.keep(torch.arange(len(self._context)))  # an id now names another node: start the tree over
            self._rows, self._hidden, self._seen = {}, {}, {}
        needed = sorted(i for i in path_rows if int(pool.ids[i]) not in self._rows)
        if needed:
            self._run_tree_rows(pool, np.array(needed, dtype=np.int64))
        h = torch.stack([self._hidden[int(pool.ids[node])] for node in frontier.tolist()])
        with torch.inference_mode():
            logp = torch.log_softmax(h @ self.head.T, dim=-1)
            top = logp.topk(k, dim=-1)
        return top.indices.numpy().astype(np.int64), top.values.double().numpy()

    def _run_tree_rows(self, pool: DraftTree, rows: IntArray) -> None:
        """Forward pool rows `rows` (tree order, ancestors already run or among them)."""
        kv_len = self.slice.kv_len
        n_ctx = len(self._context)
        slot_of = dict(self._rows)
        for j, i in enumerate(rows.tolist()):
            slot_of[int(pool.ids[i])] = kv_len + j
        visible = torch.zeros(len(rows), kv_len + len(rows), dtype=torch.bool)
        visible[:, :n_ctx] = True
        for r, i in enumerate(rows.tolist()):
            for a in pool.path(i).tolist():
                visible[r, slot_of[int(pool.ids[a])]] = True
        out = self.slice(torch.from_numpy(pool.tokens[rows]), torch.from_numpy(pool.positions[rows]), visible)
        for r, i in enumerate(rows.tolist()):
            self._rows[int(pool.ids[i])] = kv_len + r
            self._hidden[int(pool.ids[i])] = out[r]
            self._seen[int(pool.ids[i])] = (int(pool.tokens[i]), int(pool.positions[i]))
