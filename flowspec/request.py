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

from flowspec.records import FinishReason, NodeRecord, RequestRecord, RoundRecord, RunRecords, StepRecord
from flowspec.tree import DraftTree, IntArray


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
        reroot_offset: int = -1, n_pruned: int = 0, n_expanded: int = 0, n_trimmed: int = 0,
    ) -> None:  # fmt: skip
        self.records.steps.append(
            StepRecord(
                self.run_id, self.source, req.request_id, round_, req.step, segment_id, n_verified,
                n_accepted, n_emitted, bonus, str(outcome), reroot_offset, n_pruned, n_expanded,
                n_trimmed, now,
            )  # fmt: skip
        )

    def nodes(self, req: RequestState, tree: DraftTree, verified: np.ndarray, accepted_idx: IntArray) -> None:
        """One row per verified draft node (the root excluded)."""
        accepted = np.zeros(len(tree), dtype=bool)
        accepted[accepted_idx] = True
        depths = tree.depths
        for i in np.flatnonzero(verified)[1:]:
            self.records.nodes.append(
                NodeRecord(
                    self.run_id, self.source, req.request_id, req.round, req.step,
                    int(tree.ids[i]), int(depths[i]), float(tree.scores[i]),
                    bool(accepted[tree.parents[i]]), bool(accepted[i]),
                )  # fmt: skip
            )

    def round(self, req: RequestState, now: float) -> None:
        self.records.rounds.append(
            RoundRecord(
                self.run_id, self.source, req.request_id, req.round, req.round_steps,
                req.round_sent, req.round_emitted, req.round_t_start_s, now,
            )  # fmt: skip
        )

    def request(self, req: RequestState, now: float) -> None:
        self.records.requests.append(
            RequestRecord(
                self.run_id, self.source, req.request_id, len(req.prompt), len(req.output),
                req.finish_reason, req.t_arrival_s, req.t_start_s, req.t_first_token_s, now,
            )  # fmt: skip
        )
