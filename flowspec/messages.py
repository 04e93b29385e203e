"""The only vocabulary backends and the core speak: events in, commands out.

Theory of operation
-------------------
Events are past tense (what happened); commands are imperative (what to do next). A backend feeds
`PipelineCore.handle(event, now)` and executes the commands it gets back, in order. Two payloads
travel beyond the draft node and are therefore defined here too:

- `Segment`: rows of tree nodes (or prompt tokens) that stream D0 → V1 → … → VN → D0. A stage runs
  the rows it holds and passes hidden states on; the ids, parents and positions travel with them.
- `Prune`: D0's one pruning message per verification, broadcast to every stage. `keep_ids` lists
  the surviving node ids in tree order; its first `n_accepted` entries are the accepted path (root
  first), which every stage folds into its committed prefix.

Prunes are numbered by a per-run `version` (1, 2, …). A segment records the version its rows
reflect; a stage applies every later prune to it exactly once, in order (`flowspec.kv`).

Commands carry sizes (rows, bytes) so the simulator needs no tensors; `payload_nbytes` computes
what the wire carries per hop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from flowspec.tree import IntArray

ID_BYTES = 4  # token ids, node ids, parent ids and positions travel as int32
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}  # hidden states and weights, by dtype


class ProtocolError(RuntimeError):
    """A peer sent something invalid or out of order."""


class SegmentKind(StrEnum):
    PREFILL = "prefill"  # prompt tokens, causal, committed on arrival
    TREE = "tree"  # draft-tree nodes under a tree mask


@dataclass(frozen=True, slots=True, eq=False)
class Segment:
    request_id: int
    round: int
    segment_id: int  # per run, increasing in send order
    kind: SegmentKind
    node_ids: IntArray  # [L] stable tree-node ids (prefill: -1)
    tokens: IntArray  # [L]
    parent_ids: IntArray  # [L] parent node id; -1: the parent is the committed prefix
    positions: IntArray  # [L] absolute
    version: int  # the last prune these rows reflect
    reset: bool = False  # first prompt chunk of a request: stages clear their KV first
    final: bool = False  # last prompt chunk: D0 samples the first token from its last row
    lane: int = 0  # the batch lane serving the request (flowspec.batch): its own KV and prune versions
    group: int = -1  # a batch's segments travel as one group (flowspec.batch); -1: alone
    group_size: int = 1  # segments in its group: a device waits for all of them, then forwards them as one

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, rows: IntArray, version: int) -> Segment:
        """The same segment restricted to `rows`, now reflecting prunes up to `version`."""
        return Segment(
            request_id=self.request_id,
            round=self.round,
            segment_id=self.segment_id,
            kind=self.kind,
            node_ids=self.node_ids[rows],
            tokens=self.tokens[rows],
            parent_ids=self.parent_ids[rows],
            positions=self.positions[rows],
            version=version,
            reset=self.reset,
            final=self.final,
            lane=self.lane,
            group=self.group,
            group_size=self.group_size,
        )


@dataclass(frozen=True, slots=True, eq=False)
class Prune:
    request_id: int
    round: int
    version: int
    keep_ids: IntArray  # [m] surviving sent node ids, tree order; accepted path first
    n_accepted: int  # leading entries of keep_ids that become committed
    round_exit: bool  # the round ended: nothing but the accepted path survives
    lane: int = 0  # the batch lane of its request: versions count per lane

    @property
    def nbytes(self) -> int:
        return ID_BYTES * (len(self.keep_ids) + 4)


def payload_nbytes(n_rows: int, *, hidden_size: int, dtype_bytes: int, first_hop: bool) -> int:
    """Bytes of one segment message on one hop.

    The first hop (D0 → V1) carries token ids; later hops carry hidden states instead. Every hop
    carries node ids, parent ids and positions so each stage can build its tree mask.

    >>> payload_nbytes(16, hidden_size=576, dtype_bytes=4, first_hop=False)
    37056
    """
    per_row = 3 * ID_BYTES + (ID_BYTES if first_hop else hidden_size * dtype_bytes)
    return n_rows * per_row


def n_decided(seg: Segment) -> int:
    """Rows of `seg` that go through the target's LM head: every row of a tree segment; of a prompt
    chunk only the last row of the prompt's last chunk (the first token), for nobody reads the rest."""
    if seg.kind is SegmentKind.PREFILL:
        return 1 if seg.final and len(seg) else 0
    return len(seg)


LOGIT_BYTES = 4  # float32: what the last stage returns per vocabulary entry when D0 samples


@dataclass(frozen=True, slots=True)
class WireSizes:
    """What the messages of one scenario weigh: every hop carries the rows' ids, the first token
    ids, later ones hidden states; with the LM head on the last stage (`head_last`) the return hop
    carries the target's decisions — one id per row at temperature 0, `vocab_size` logits per
    decided row above it — and hidden states only when D0's drafter reads them (`features`).
    Both backends price messages with this, the simulator and the emulated runtime alike."""

    hidden_size: int
    dtype_bytes: int
    vocab_size: int = 0
    head_last: bool = False
    sampled: bool = False  # temperature > 0
    features: bool = True

    def segment(self, n_rows: int, *, first_hop: bool) -> int:
        """A segment on a hop into a stage (D0 -> V1 is the first)."""
        return payload_nbytes(n_rows, hidden_size=self.hidden_size, dtype_bytes=self.dtype_bytes, first_hop=first_hop)

    def returned(self, n_rows: int, n_decided: int) -> int:
        """A segment back from the last stage, `n_decided` of its rows through the LM head.

        >>> WireSizes(576, 4, 49152, head_last=True, features=False).returned(16, 16)
        256
        """
        if not self.head_last:
            return self.segment(n_rows, first_hop=False)
        hidden = n_rows * self.hidden_size * self.dtype_bytes if self.features else 0
        decisions = n_decided * self.vocab_size * LOGIT_BYTES if self.sampled else n_rows * ID_BYTES
        return n_rows * 3 * ID_BYTES + hidden + decisions


# ---- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestArrived:
    request_id: int
    prompt: tuple[int, ...]
    max_new_tokens: int | None = None  # None: the scenario's decoding.max_new_tokens
    t_arrival_s: float | None = None  # when the request arrived, if before D0 got to it; None: now


@dataclass(frozen=True, slots=True, eq=False)
class SegmentReturned:
    """The last stage's output for a segment reached D0 and went through the target's LM head."""

    segment_id: int
    node_ids: IntArray  # [L] rows as they arrived (after in-flight pruning); prefill: -1
    version: int  # the last prune these rows reflect (D0 applies any later ones itself)
    argmax: IntArray | None = None  # [L] target argmax per row (T = 0)
    probs: np.ndarray | None = None  # [L, V] target distribution per row (T > 0)


@dataclass(frozen=True, slots=True)
class DraftDone:
    """The backend finished charging (or running) the drafting work of a `Draft` command."""

    draft_id: int


Event = RequestArrived | SegmentReturned | DraftDone


# ---- commands -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendSegment:
    segment: Segment = field(repr=False)

    def __repr__(self) -> str:
        s = self.segment
        return f"SendSegment(id={s.segment_id}, {s.kind}, rows={len(s)}, v={s.version})"


@dataclass(frozen=True, slots=True)
class BroadcastPrune:
    prune: Prune = field(repr=False)

    def __repr__(self) -> str:
        p = self.prune
        return f"BroadcastPrune(v={p.version}, keep={len(p.keep_ids)}, a={p.n_accepted}, exit={p.round_exit})"


@dataclass(frozen=True, slots=True)
class Draft:
    """D0 drafted (or expanded) a tree; charge its time, then answer with `DraftDone`."""

    draft_id: int
    request_id: int
    n_calls: int  # drafter forward passes (one per tree depth)
    n_rows: int  # frontier rows over all calls (drafter + draft LM-head rows)
    n_nodes: int  # nodes added to the tree


@dataclass(frozen=True, slots=True)
class EmitTokens:
    request_id: int
    tokens: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class FinishRequest:
    request_id: int
    reason: str  # a records.FinishReason


Command = SendSegment | BroadcastPrune | Draft | EmitTokens | FinishRequest
