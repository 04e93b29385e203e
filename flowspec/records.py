"""Flat records: one row per observation, identical across backends.

Theory of operation
-------------------
The core emits `StepRecord`, `NodeRecord`, `RoundRecord` and `RequestRecord` as it makes decisions;
backends add `StageSpan` and `LinkTransfer`, which only they can time. Every record is a frozen,
flat, keyword-only dataclass (no lists in cells) whose field names carry units, so `to_frame` turns
a list of them into a tidy pandas frame and `flowspec.metrics` computes every reported number from
frames.

A traced run (`PipelineCore(trace=True)`; the runtime always traces) also keeps what a replay needs
(`flowspec.replay`): every command the core issued (`CommandRecord`), every drafter proposal
(`ProposalRecord`) and every target decision it was handed (`DecisionRecord`). Fed the same
proposals and decisions, the simulator's core must issue the same commands (DESIGN invariant 6).

Rule: a record never holds a derived metric; metrics are computed from frames, once, in metrics.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd



class StepOutcome(StrEnum):
    CONTINUE = "continue"  # the bonus token is an unverified child in the tree: re-rooted there
    EXIT = "exit"  # the bonus token fell outside the tree: the round ended
    EMPTY = "empty"  # the returned segment was emptied by pruning: nothing verified
    FINISH = "finish"  # EOS or max_new_tokens reached: the request ended
    PREFILL = "prefill"  # the prompt's last chunk returned: the first token was sampled


class FinishReason(StrEnum):
    EOS = "eos"
    MAX_NEW_TOKENS = "max_new_tokens"


@dataclass(frozen=True, slots=True, kw_only=True)
class StepRecord:
    """One segment returned to the draft node (D0) and what D0 decided."""

    run_id: str
    source: str
    request_id: int
    round: int
    step: int
    segment_id: int
    n_verified: int  # tree nodes holding a target decision at this verification: the segment's surviving rows and
    # those verified earlier in the round and still in the tree (0: the segment was emptied by pruning)
    n_accepted: int  # tokens committed by this verification, root included (0 when nothing verified)
    n_emitted: int  # tokens handed to the user: accepted drafts + bonus, after trimming
    bonus_token: int  # the token sampled after the accepted run; -1 when nothing verified
    outcome: str  # a StepOutcome
    reroot_offset: int  # segments between the verified one and the new root's; -1 when not re-rooted
    n_pruned: int  # tree nodes dropped by this step's prune (accepted nodes not counted)
    n_expanded: int  # nodes appended by this step's expansion
    n_trimmed: int  # tokens dropped after EOS or beyond max_new_tokens
    t_s: float
    n_relaxed: int = 0  # accepted tokens strict verification would have refused (dsd with tau > 0: lossy)
    relaxing: bool = False  # verification was relaxed (dsd with tau > 0): the run is lossy even where
    # nothing happened to be relaxed, so tables label it by what it was asked to do


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeRecord:
    """One verified draft node (the root excluded): was its token the target's choice?"""

    run_id: str
    source: str
    request_id: int
    round: int
    step: int
    node_id: int
    depth: int  # depth below the root that was verified in this step (>= 1)
    score: float  # cumulative draft log-prob relative to that root
    parent_id: int
    rank: int  # 0: the best-scored of its parent's children in the tree (the drafter's rank-0 proposal)
    n_siblings: int  # children its parent has in the tree (itself included), verified or not
    parent_accepted: bool  # its parent was accepted in this step (it was a real candidate)
    accepted: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundRecord:
    """One draft round: from drafting a fresh tree to the step whose bonus fell outside it."""

    run_id: str
    source: str
    request_id: int
    round: int
    n_steps: int  # verifications that committed tokens
    n_sent: int  # tree nodes sent into the pipeline, roots included
    n_emitted: int
    t_start_s: float
    t_end_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRecord:
    run_id: str
    source: str
    request_id: int
    n_prompt_tokens: int
    n_output_tokens: int
    finish_reason: str  # a FinishReason
    t_arrival_s: float
    t_start_s: float  # prefill sent
    t_first_token_s: float
    t_finish_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class StageSpan:
    """One forward (or draft-node job) on one device. Stage 0 is the draft node."""

    run_id: str
    source: str
    request_id: int
    stage: int
    segment_id: int  # the segment forwarded or verified; -1 for draft-node jobs of no segment (draft)
    kind: str  # "prefill" | "tree" (stages) | "verify" | "draft" | "step" (the draft node)
    n_tokens: int
    kv_len: int
    t_start_s: float
    t_end_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkTransfer:
    """One message on one link (src and dst are device ranks; 0 is the draft node)."""

    run_id: str
    source: str
    src: int
    dst: int
    kind: str  # "segment" | "prune"
    nbytes: int
    t_send_s: float
    t_recv_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ComputeRecord:
    """One padded compute of an emulated run (`runtime.emulation`): what the cost model charges for
    it, the real time it was padded to (dilation x model) and the real time it took. It overran
    when real_ms exceeds padded_ms by more than emulate.slack_ms."""

    run_id: str
    source: str
    request_id: int
    device: int  # 0: the draft node
    kind: str  # "prefill" | "tree" (stages) | "verify" | "step" (the draft node: bookkeeping and drafting)
    t_start_s: float  # emulated
    model_ms: float  # emulated
    padded_ms: float  # real
    real_ms: float  # real


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandRecord:
    """One command the core issued (traced runs): what a replay must reproduce exactly."""

    run_id: str
    source: str
    seq: int  # position in the run's command sequence
    command: str  # "send" | "prune" | "draft" | "emit" | "finish"
    request_id: int
    detail: str  # the command's content, canonical text (ids, tokens, versions): equal iff the commands are


@dataclass(frozen=True, slots=True, kw_only=True)
class ProposalRecord:
    """One row of one drafter call (traced runs): the k tokens proposed for one frontier node."""

    run_id: str
    source: str
    call: int  # the drafter call, in order
    request_id: int
    node_id: int  # the frontier node the proposals are children of
    rank: int
    token: int
    logp: float


@dataclass(frozen=True, slots=True, kw_only=True)
class DecisionRecord:
    """The target's decision for one returned row (traced runs, T = 0: its argmax)."""

    run_id: str
    source: str
    request_id: int
    segment_id: int
    node_id: int  # -1 for a prompt row
    argmax: int


RECORD_TYPES: dict[str, type] = {
    "steps": StepRecord,
    "nodes": NodeRecord,
    "rounds": RoundRecord,
    "requests": RequestRecord,
    "stage_spans": StageSpan,
    "link_transfers": LinkTransfer,
}
EMULATION_TYPES: dict[str, type] = {"computes": ComputeRecord}
TRACE_TYPES: dict[str, type] = {
    "commands": CommandRecord,
    "proposals": ProposalRecord,
    "decisions": DecisionRecord,
}


def to_frame(records: list, record_type: type) -> pd.DataFrame:
    import pandas as pd  # here: the stage processes import the core and never build a frame

    """A tidy frame of `records`, with the record type's columns even when the list is empty."""
    columns = [f.name for f in dataclasses.fields(record_type)]
    if not records:
        return pd.DataFrame({name: pd.Series(dtype=object) for name in columns})
    return pd.DataFrame.from_records([dataclasses.asdict(r) for r in records], columns=columns)


@dataclass(slots=True)
class RunRecords:
    """Everything one run recorded, by kind; `frames()` is what metrics and reports read."""

    steps: list[StepRecord] = field(default_factory=list)
    nodes: list[NodeRecord] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    stage_spans: list[StageSpan] = field(default_factory=list)
    link_transfers: list[LinkTransfer] = field(default_factory=list)
    commands: list[CommandRecord] = field(default_factory=list)
    proposals: list[ProposalRecord] = field(default_factory=list)
    decisions: list[DecisionRecord] = field(default_factory=list)
    computes: list[ComputeRecord] = field(default_factory=list)
    traced: bool = False
    emulated: bool = False

    def frames(self) -> dict[str, pd.DataFrame]:
        """Frames of every record kind; the trace kinds only when the run was traced, the computes
        only when it was emulated."""
        kinds = RECORD_TYPES | (TRACE_TYPES if self.traced else {}) | (EMULATION_TYPES if self.emulated else {})
        return {name: to_frame(getattr(self, name), rtype) for name, rtype in kinds.items()}


@dataclass(slots=True)
class RunResult:
    """One policy's run in any backend: outputs by request id, records, and how long it took
    (simulated seconds in the simulator, wall-clock seconds in the runtime)."""

    outputs: dict[int, list[int]]
    records: RunRecords
    elapsed_s: float

    def frames(self) -> dict[str, pd.DataFrame]:
        return self.records.frames()
