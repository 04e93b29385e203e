"""Stage-side bookkeeping: which KV slots and segment rows survive each pruning message.

Theory of operation
-------------------
A verification stage's KV cache is laid out as

    [ committed prefix (G slots) | tree region: processed tree nodes, in tree order ]

and `StageLedger` mirrors that layout with node ids, without holding any tensor. A backend's stage
worker asks the ledger what to do and applies it to its tensors:

1. `receive(prune)` when a pruning message arrives (they arrive in version order);
2. before a forward: `catch_up(segment)` → KV slots to keep (apply with a gather) and the rows of
   the segment to keep (`sync()` then `admit()`); `visibility(segment)` → what each row attends to;
   run the forward; `append(segment)` records the new KV entries;
3. after the forward: `catch_up()` again, because prunes may have arrived meanwhile; the
   surviving output rows are sent on.

Invariants (tested): every prune is applied exactly once to the KV and exactly once to every
segment, in version order; after `sync()` the region holds exactly the processed nodes that survive,
in tree order; the accepted path of a prune is always in the region, at its front, and moves into
the committed prefix without changing position. A segment may only be admitted once the stage holds
every prune its rows already reflect (`ready`).

Peers are not trusted: `check_prune` and `check_segment` say whether a message fits this ledger
(raising `ProtocolError`) without changing it, so a stage validates first and applies after, and a
message that contradicts its state leaves it exactly as before. The asserts below stay for what the
checks guarantee, i.e. internal invariants.
"""

from __future__ import annotations

import numpy as np

from flowspec.messages import ProtocolError, Prune, Segment, SegmentKind
from flowspec.tree import IntArray


def keep_slots(committed_len: int, region_ids: IntArray, keep_ids: IntArray, n_accepted: int) -> IntArray:
    """KV slots to keep after one prune: the committed prefix, then surviving region slots in order.

    The first `n_accepted` keep ids must be in the region, at its front once pruned.

    >>> keep_slots(3, np.array([10, 11, 12, 13]), np.array([10, 12, 13, 20]), 2).tolist()
    [0, 1, 2, 3, 5, 6]
    """
    survive = np.flatnonzero(np.isin(region_ids, keep_ids))
    accepted = keep_ids[:n_accepted]
    front = region_ids[survive[:n_accepted]]
    assert len(front) == n_accepted and (front == accepted).all(), (
        f"accepted path {accepted.tolist()} is not at the front of the surviving region "
        f"{region_ids[survive].tolist()}"
    )
    return np.concatenate([np.arange(committed_len), committed_len + survive])


def keep_rows(node_ids: IntArray, keep_ids: IntArray) -> IntArray:
    """Rows of an in-flight segment that survive a prune.

    >>> keep_rows(np.array([14, 15, 16]), np.array([10, 12, 15, 16])).tolist()
    [1, 2]
    """
    return np.flatnonzero(np.isin(node_ids, keep_ids))


class StageLedger:
    """The node-id mirror of one stage's KV cache (see the module docstring for the protocol)."""

    def __init__(self, version: int = 0) -> None:
        """`version`: the prune version the stream starts after (a batched core's lane starts a
        request's ledger at the version its first prompt chunk carries)."""
        self.committed_len = 0
        self.region_ids = np.zeros(0, dtype=np.int64)  # [T] node ids in KV slots G..G+T-1
        self.region_parents = np.zeros(0, dtype=np.int64)  # [T] their parent ids
        self.version = version  # last prune applied to the KV
        self._prunes: dict[int, Prune] = {}  # received, by version
        self._received = version
        self._floor = version  # prunes up to this version were dropped by `reset` (or never belonged here)
        self._committed_ids: set[int] = set()  # accepted node ids of this request

    @property
    def kv_len(self) -> int:
        return self.committed_len + len(self.region_ids)

    @property
    def received(self) -> int:
        """The last prune version received."""
        return self._received

    def check_prune(self, prune: Prune) -> None:
        """Raise `ProtocolError` unless `prune` can be received now: the next version, its accepted
        path at the front of the region's survivors, the survivors' parents kept, nothing beyond the
        path on a round exit. The ledger does not change."""
        who = f"prune v{prune.version}"
        if prune.version != self._received + 1:
            raise ProtocolError(f"{who}: out of order, the last one received is v{self._received}")
        if not 1 <= prune.n_accepted <= len(prune.keep_ids):
            raise ProtocolError(f"{who}: n_accepted {prune.n_accepted} outside 1..{len(prune.keep_ids)}")
        region, parents, committed = self.region_ids, self.region_parents, set(self._committed_ids)
        for v in range(self.version + 1, self._received + 1):  # received, not yet applied: in order
            region, parents = self._after(self._prunes[v], region, parents, committed)
        survive = np.isin(region, prune.keep_ids)
        accepted, front = prune.keep_ids[: prune.n_accepted], region[survive][: prune.n_accepted]
        if len(front) != len(accepted) or (front != accepted).any():
            raise ProtocolError(f"{who}: accepted path {accepted[:8].tolist()} is not at the front of the "
                                f"stage's surviving nodes {region[survive][:8].tolist()}")  # fmt: skip
        if prune.round_exit and survive.sum() != prune.n_accepted:
            raise ProtocolError(f"{who}: a round exit keeps {int(survive.sum())} nodes, beyond its accepted path")
        kept = set(region[survive].tolist()) | committed | set(accepted.tolist()) | {-1}
        orphans = [int(n) for n, p in zip(region[survive], parents[survive]) if int(p) not in kept]
        if orphans:
            raise ProtocolError(f"{who}: keeps node(s) {orphans[:8]} but not their parents")

    def _after(self, prune: Prune, region: IntArray, parents: IntArray, committed: set[int]) -> tuple[IntArray, IntArray]:
        """Region ids and parents after an (already checked) prune; `committed` grows in place."""
        survive = np.flatnonzero(np.isin(region, prune.keep_ids))
        committed.update(region[survive[: prune.n_accepted]].tolist())
        rest = survive[prune.n_accepted :]
        return region[rest], parents[rest]

    def check_segment(self, segment: Segment) -> None:
        """Raise `ProtocolError` unless `segment` can be forwarded once every prune received so far is
        applied (`sync`): for a request's first chunk (`reset`), against an empty KV. A prompt chunk
        continues the committed prefix, position by position; a tree segment has a prompt to hang
        from, new node ids, and every row's parent committed, in the region or an earlier row (a
        round's root: -1). The ledger does not change."""
        who = f"segment {segment.segment_id} of request {segment.request_id}"
        if segment.version > self._received:
            raise ProtocolError(f"{who}: reflects prune v{segment.version}, the last one received is v{self._received}")
        if segment.reset and segment.kind is not SegmentKind.PREFILL:
            raise ProtocolError(f"{who}: only a prompt chunk starts a request (reset)")
        region, parents, committed = self.region_ids, self.region_parents, set(self._committed_ids)
        committed_len = self.committed_len
        if segment.reset:
            region, parents, committed, committed_len = region[:0], parents[:0], set(), 0
        else:
            for v in range(self.version + 1, self._received + 1):
                committed_len += self._prunes[v].n_accepted
                region, parents = self._after(self._prunes[v], region, parents, committed)
        if segment.kind is SegmentKind.PREFILL:
            if segment.version != self._received:
                raise ProtocolError(f"{who}: a prompt chunk reflecting prune v{segment.version}, the stage is at "
                                    f"v{self._received} (no prune reaches a prompt chunk in flight)")  # fmt: skip
            if len(region) or (committed_len == 0 and not segment.reset):
                raise ProtocolError(f"{who}: a prompt chunk must extend a prompt (reset: start one), the stage "
                                    f"holds {committed_len} committed and {len(region)} tree slots")  # fmt: skip
            if (segment.positions != committed_len + np.arange(len(segment))).any():
                raise ProtocolError(f"{who}: prompt positions {segment.positions[:8].tolist()} do not follow the "
                                    f"{committed_len} committed slots")  # fmt: skip
            return
        if committed_len == 0:
            raise ProtocolError(f"{who}: a tree segment before any prompt")
        if segment.version < self._floor:
            raise ProtocolError(f"{who}: reflects prune v{segment.version}, from before this request (v{self._floor})")
        rows = np.arange(len(segment))
        for v in range(segment.version + 1, self._received + 1):
            rows = rows[keep_rows(segment.node_ids[rows], self._prunes[v].keep_ids)]
        ids, known = segment.node_ids[rows].tolist(), set(region.tolist())
        if (segment.node_ids < 0).any() or len(set(ids)) != len(ids) or known & set(ids) or committed & set(ids):
            raise ProtocolError(f"{who}: node ids {ids[:8]} must be >= 0, distinct and new to the stage")
        seen = known | committed | {-1}
        for node, parent in zip(ids, segment.parent_ids[rows].tolist()):
            if parent not in seen:
                raise ProtocolError(f"{who}: node {node}: parent {parent} is neither in this stage's KV, committed "
                                    f"nor an earlier row")  # fmt: skip
            seen.add(node)

    def receive(self, prune: Prune) -> None:
        assert prune.version == self._received + 1, (
            f"prune v{prune.version} arrived after v{self._received}: pruning messages must arrive in order"
        )
        self._prunes[prune.version] = prune
        self._received = prune.version

    def ready(self, segment: Segment) -> bool:
        """Whether every prune already reflected in `segment` has reached this stage."""
        return segment.version <= self._received

    def sync(self) -> IntArray | None:
        """Apply every received prune to the KV; the slots to keep, or None when nothing changed."""
        if self.version == self._received:
            return None
        g0 = self.committed_len
        slots = np.arange(self.kv_len)
        for v in range(self.version + 1, self._received + 1):
            prune = self._prunes[v]
            kept = keep_slots(self.committed_len, self.region_ids, prune.keep_ids, prune.n_accepted)
            slots = slots[kept]
            survive = kept[self.committed_len :] - self.committed_len
            a = prune.n_accepted
            self._committed_ids.update(self.region_ids[survive[:a]].tolist())
            self.committed_len += a
            self.region_ids = self.region_ids[survive[a:]]
            self.region_parents = self.region_parents[survive[a:]]
            if prune.round_exit:
                assert len(self.region_ids) == 0, "a round exit keeps nothing beyond the accepted path"
            self.version = v
        assert (slots[:g0] == np.arange(g0)).all()
        return slots

    def admit(self, segment: Segment) -> tuple[Segment, IntArray]:
        """Apply to `segment` every prune after its version; the pruned segment and its kept rows."""
        assert self.ready(segment), f"segment {segment.segment_id} needs prune v{segment.version}"
        assert self.version == self._received, "sync() the KV before admitting a segment"
        if segment.kind is SegmentKind.PREFILL:
            assert segment.version == self.version, "no prune can reach a prompt chunk in flight"
            return segment, np.arange(len(segment))
        rows = np.arange(len(segment))
        for v in range(segment.version + 1, self.version + 1):
            rows = rows[keep_rows(segment.node_ids[rows], self._prunes[v].keep_ids)]
        return segment.select(rows, self.version), rows

    def catch_up(self, segment: Segment) -> tuple[IntArray | None, Segment, IntArray]:
        """`sync()` then `admit(segment)`: what a stage does before and after every forward.

        Returns the KV slots to keep (None: unchanged), the pruned segment and its kept rows.
        """
        slots = self.sync()
        admitted, rows = self.admit(segment)
        return slots, admitted, rows

    def visibility(self, segment: Segment) -> np.ndarray:
        """[L, kv_len + L] bool over every KV slot and the rows: the committed prefix, then `attention`."""
        prefix = np.ones((len(segment), self.committed_len), dtype=bool)
        return np.hstack([prefix, self.attention(segment)])

    def attention(self, segment: Segment) -> np.ndarray:
        """[L, T + L] bool: which tree-region slots and segment rows each row attends to.

        The committed prefix (G slots before these columns) is visible to every row. A prefill
        segment is causal; a tree row sees its ancestors and itself.
        """
        n_rows = len(segment)
        width = len(self.region_ids) + n_rows
        if segment.kind is SegmentKind.PREFILL:
            mask = np.zeros((n_rows, width), dtype=bool)
            mask[:, len(self.region_ids) :] = np.tril(np.ones((n_rows, n_rows), dtype=bool))
            return mask
        ids = np.concatenate([self.region_ids, segment.node_ids]).tolist()
        parents = np.concatenate([self.region_parents, segment.parent_ids]).tolist()
        column = {node: j for j, node in enumerate(ids)}
        mask = np.zeros((n_rows, width), dtype=bool)
        for r in range(n_rows):
            cur = ids[len(self.region_ids) + r]
            while cur in column:
                j = column[cur]
                mask[r, j] = True
                cur = parents[j]
            # Above the tree region lies the committed prefix (or nothing, for a round's root).
            assert cur == -1 or cur in self._committed_ids, (
                f"node {ids[len(self.region_ids) + r]}: ancestor {cur} is neither in this stage's KV nor committed"
            )
        return mask

    def append(self, segment: Segment) -> None:
        """Record the KV entries a forward of `segment` just wrote (after its rows)."""
        if segment.kind is SegmentKind.PREFILL:
            assert len(self.region_ids) == 0, "prompt chunks extend the committed prefix only"
            self.committed_len += len(segment)
        else:
            self.region_ids = np.concatenate([self.region_ids, segment.node_ids])
            self.region_parents = np.concatenate([self.region_parents, segment.parent_ids])

    def reset(self) -> None:
        """A new request: drop the KV and every prune so far (they all belong to earlier requests).

        The first prompt chunk carries D0's current prune version, so once it is admitted this
        stage has received every earlier prune.
        """
        self.committed_len = 0
        self.region_ids = np.zeros(0, dtype=np.int64)
        self.region_parents = np.zeros(0, dtype=np.int64)
        self._committed_ids.clear()
        self._prunes.clear()
        self.version = self._floor = self._received
