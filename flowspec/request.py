"""One request as D0 tracks it, the stop rule, and the records a request leaves behind.

Theory of operation
-------------------
`RequestState` is plain mutable state owned by `PipelineCore`: the prompt, what was emitted, the
committed context (the tokens every stage holds in its KV prefix once all prunes are applied), the
current round's tree and what of it was sent. `trim_tokens` is the stop rule: tokens after EOS, and
beyond `max_new_tokens`, are never emitted. `Recorder` turns state into flat records at the moment
a decision is made, so metrics never need counters scattered through the state machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flowspec.records import DecisionRecord, FinishReason, NodeRecord, RequestRecord, RoundRecord, RunRecords, StepRecord
from flowspec.tree import DraftTree, IntArray


def sibling_ranks(parents: IntArray, scores: np.ndarray) -> tuple[IntArray, IntArray]:
    """Each node's rank among its parent's children by score (0: best; ties by tree order) and how
    many children that parent has. Within one drafter call, score order is the drafter's rank order.

    >>> r, n = sibling_ranks(np.array([-1, 0, 0, 0, 1]), np.array([0.0, -0.5, -0.1, -0.9, -0.7]))
    >>> r.tolist(), n.tolist()
    ([0, 1, 0, 2, 0], [1, 3, 3, 3, 1])
    """
    n = len(parents)
    ranks = np.zeros(n, dtype=np.int64)  # [n]
    counts = np.ones(n, dtype=np.int64)  # [n]
    order = np.lexsort((np.arange(n), -scores, parents))  # by parent, then best score first
    sorted_parents = parents[order]
    starts = np.flatnonzero(np.r_[True, sorted_parents[1:] != sorted_parents[:-1]])  # [n_groups]
    sizes = np.diff(np.r_[starts, n])  # [n_groups]
    group_start = np.repeat(starts, sizes)  # [n]
    ranks[order] = np.arange(n) - group_start
    counts[order] = np.repeat(sizes, sizes)
    return ranks, counts


def trim_tokens(tokens: list[int], eos_token_id: int | None, room: int) -> tuple[list[int], str]:
    """Cut `tokens` after EOS and to at most `room`; the kept tokens and why the request stops ("" if not).

    >>> trim_tokens([5, 0, 7], 0, 10)
    ([5, 0], 'eos')
    >>> trim_tokens([5, 6, 7], 0, 2)
    ([5, 6], 'max_new_tokens')
    >>> trim_tokens([5, 0], 0, 2)
    ([5, 0], 'eos')
    """
    kept, reason = tokens, ""
    if eos_token_id is not None and eos_token_id in kept:
        kept, reason = kept[: kept.index(eos_token_id) + 1], FinishReason.EOS
    if len(kept) > room or (len(kept) == room and not reason):
        kept, reason = kept[:room], FinishReason.MAX_NEW_TOKENS
    return kept, str(reason)


@dataclass(slots=True, eq=False)
class RequestState:
    request_id: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    t_arrival_s: float
    t_start_s: float = float("nan")
    t_first_token_s: float = float("nan")
    output: list[int] = field(default_factory=list)
    context: list[int] = field(default_factory=list)  # committed tokens, before the tree's root
    finish_reason: str = ""
    round: int = -1
    step: int = 0
    tree: DraftTree | None = None
    n_sent: int = 0  # leading tree nodes already sent into the pipeline
    targets: dict[int, object] = field(default_factory=dict)  # node id -> target argmax or probs row
    round_steps: int = 0
    round_sent: int = 0
    round_emitted: int = 0
    round_t_start_s: float = 0.0

    def emit(self, tokens: list[int], eos_token_id: int | None) -> tuple[list[int], int, str]:
        """Append what the stop rule lets through; the emitted tokens, how many were cut, and why stop."""
        kept, reason = trim_tokens(tokens, eos_token_id, self.max_new_tokens - len(self.output))
        self.output.extend(kept)
        self.round_emitted += len(kept)
        return kept, len(tokens) - len(kept), reason

    def start_round(self, now: float) -> None:
        self.round += 1
        self.targets = {}
        self.round_steps = self.round_sent = self.round_emitted = 0
        self.round_t_start_s = now
        self.n_sent = 0


class Recorder:
    """Builds the core's records; `run_id` and `source` label every row."""

    def __init__(self, run_id: str, source: str) -> None:
        self.run_id = run_id
        self.source = source
        self.records = RunRecords()

    def step(
        self, req: RequestState, round_: int, segment_id: int, now: float, outcome: str, *,
        n_verified: int, n_accepted: int = 0, n_emitted: int = 0, bonus: int = -1,
        reroot_offset: int = -1, n_pruned: int = 0, n_expanded: int = 0, n_trimmed: int = 0, n_relaxed: int = 0,
        relaxing: bool = False,
    ) -> None:  # fmt: skip
        self.records.steps.append(
            StepRecord(
                run_id=self.run_id, source=self.source, request_id=req.request_id, round=round_,
                step=req.step, segment_id=segment_id, n_verified=n_verified, n_accepted=n_accepted,
                n_emitted=n_emitted, bonus_token=bonus, outcome=str(outcome), reroot_offset=reroot_offset,
                n_pruned=n_pruned, n_expanded=n_expanded, n_trimmed=n_trimmed, t_s=now, n_relaxed=n_relaxed,
                relaxing=relaxing,
            )  # fmt: skip
        )

    def nodes(self, req: RequestState, tree: DraftTree, verified: np.ndarray, accepted_idx: IntArray) -> None:
        """One row per verified draft node (the root excluded), with its rank among its siblings."""
        accepted = np.zeros(len(tree), dtype=bool)
        accepted[accepted_idx] = True
        depths = tree.depths
        ranks, n_siblings = sibling_ranks(tree.parents, tree.scores)
        for i in np.flatnonzero(verified)[1:]:
            parent = int(tree.parents[i])
            self.records.nodes.append(
                NodeRecord(
                    run_id=self.run_id, source=self.source, request_id=req.request_id, round=req.round,
                    step=req.step, node_id=int(tree.ids[i]), depth=int(depths[i]), score=float(tree.scores[i]),
                    parent_id=int(tree.ids[parent]), rank=int(ranks[i]), n_siblings=int(n_siblings[i]),
                    parent_accepted=bool(accepted[parent]), accepted=bool(accepted[i]),
                )  # fmt: skip
            )

    def decisions(self, req: RequestState, segment_id: int, node_ids: IntArray, argmax: IntArray, *,
                  final_only: bool) -> None:  # fmt: skip
        """The target's argmax for every returned row (a prompt chunk: its last row only, which
        gives the first token; the others are never read)."""
        rows = range(len(node_ids) - 1, len(node_ids)) if final_only else range(len(node_ids))
        for i in rows:
            self.records.decisions.append(
                DecisionRecord(run_id=self.run_id, source=self.source, request_id=req.request_id,
                               segment_id=segment_id, node_id=int(node_ids[i]), argmax=int(argmax[i]))  # fmt: skip
            )

    def round(self, req: RequestState, now: float) -> None:
        self.records.rounds.append(
            RoundRecord(
                run_id=self.run_id, source=self.source, request_id=req.request_id, round=req.round,
                n_steps=req.round_steps, n_sent=req.round_sent, n_emitted=req.round_emitted,
                t_start_s=req.round_t_start_s, t_end_s=now,
            )  # fmt: skip
        )

    def request(self, req: RequestState, now: float) -> None:
        self.records.requests.append(
            RequestRecord(
                run_id=self.run_id, source=self.source, request_id=req.request_id,
                n_prompt_tokens=len(req.prompt), n_output_tokens=len(req.output),
                finish_reason=req.finish_reason, t_arrival_s=req.t_arrival_s, t_start_s=req.t_start_s,
                t_first_token_s=req.t_first_token_s, t_finish_s=now,
            )  # fmt: skip
        )
