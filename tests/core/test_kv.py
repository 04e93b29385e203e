"""Stage-side KV bookkeeping (`flowspec.kv`): literal slot/row lists, the paper's Fig. 1 prune, the
receive → sync → admit protocol, and a property test against a from-scratch reference.

Every expected list below is worked out by hand in the test's docstring or comments. Node ids in the
literal tests are small integers; slots are KV indices (committed prefix first).
"""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowspec.kv import StageLedger, keep_slots, keep_rows
from flowspec.messages import ProtocolError, Prune, Segment, SegmentKind


def arr(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def prune(version: int, keep: list[int], n_accepted: int, round_exit: bool = False) -> Prune:
    return Prune(request_id=0, round=0, version=version, keep_ids=np.array(keep, dtype=np.int64),
                 n_accepted=n_accepted, round_exit=round_exit)


def tree_segment(segment_id: int, node_ids: list[int], parent_ids: list[int], positions: list[int],
                 version: int) -> Segment:
    return Segment(request_id=0, round=0, segment_id=segment_id, kind=SegmentKind.TREE,
                   node_ids=np.array(node_ids, dtype=np.int64),
                   tokens=np.array([100 + n for n in node_ids], dtype=np.int64),
                   parent_ids=np.array(parent_ids, dtype=np.int64),
                   positions=np.array(positions, dtype=np.int64), version=version)


def prefill_segment(segment_id: int, n_tokens: int, start: int, version: int) -> Segment:
    return Segment(request_id=0, round=0, segment_id=segment_id, kind=SegmentKind.PREFILL,
                   node_ids=np.full(n_tokens, -1, dtype=np.int64),
                   tokens=np.arange(50, 50 + n_tokens, dtype=np.int64),
                   parent_ids=np.full(n_tokens, -1, dtype=np.int64),
                   positions=np.arange(start, start + n_tokens, dtype=np.int64), version=version,
                   reset=start == 0)


# ---- keep_slots / keep_rows on literals -------------------------------------------------------


def test_keep_slots_docstring_case() -> None:
    """G=3, region [10, 11, 12, 13] at slots 3..6, keep [10, 12, 13, 20], a=2: 11 (slot 4) goes,
    20 is not in this stage's KV and is ignored; prefix 0..2 then slots 3, 5, 6."""
    assert keep_slots(3, arr(10, 11, 12, 13), arr(10, 12, 13, 20), 2).tolist() == [0, 1, 2, 3, 5, 6]


@pytest.mark.parametrize(
    ("committed_len", "region", "keep", "n_accepted", "expected"),
    [
        # no prefix: region [4, 5, 6] at slots 0..2, keep 4 and 6 → slots 0, 2
        (0, [4, 5, 6], [4, 6], 1, [0, 2]),
        # only the accepted path survives (a round exit): G=2, 1 at slot 2 → [0, 1, 2]
        (2, [1, 2, 3], [1], 1, [0, 1, 2]),
        # keep ids not (yet) in this stage's KV are ignored: 9 and 11 are still in flight
        (1, [5, 6], [5, 6, 9, 11], 1, [0, 1, 2]),
        # the whole accepted path is the region's front: everything stays
        (4, [7, 8, 9], [7, 8, 9], 3, [0, 1, 2, 3, 4, 5, 6]),
        # an empty region with nothing accepted keeps just the prefix
        (3, [], [20, 21], 0, [0, 1, 2]),
        # a pruned node ahead of the accepted path: 10 (slot 5) goes, 11 is the front once pruned
        (5, [10, 11, 12], [11, 12], 1, [0, 1, 2, 3, 4, 6, 7]),
    ],
)
def test_keep_slots_hand_computed(committed_len: int, region: list[int], keep: list[int],
                                  n_accepted: int, expected: list[int]) -> None:
    """Slots to keep = the committed prefix, then the region slots whose ids are in `keep`, in
    region order (a gather whose sources are never below their destinations)."""
    got = keep_slots(committed_len, np.array(region, dtype=np.int64), np.array(keep, dtype=np.int64),
                     n_accepted)
    assert got.tolist() == expected


def test_keep_slots_rejects_an_accepted_path_that_is_not_the_surviving_front() -> None:
    """keep ids out of tree order put a non-accepted survivor ahead of the accepted path: loud."""
    with pytest.raises(AssertionError):
        keep_slots(0, arr(10, 11, 12), arr(12, 10), 1)
    with pytest.raises(AssertionError):
        keep_slots(0, arr(10, 11), arr(11, 12), 2)  # 12 was never processed here


def test_keep_slots_rejects_an_accepted_node_missing_from_the_region() -> None:
    """An accepted node that this stage never processed cannot be committed from its KV.

    G=2, empty region, keep [7] with a=1: the docstring requires the first `n_accepted` keep ids
    to be in the region. Returning [0, 1] silently would let `StageLedger.sync` grow the committed
    length to 3 while the KV keeps 2 slots; it must fail loudly instead.
    """
    with pytest.raises(AssertionError):
        keep_slots(2, np.zeros(0, dtype=np.int64), arr(7), 1)
    with pytest.raises(AssertionError):
        keep_slots(2, arr(5, 6), arr(7, 8), 1)  # 5 and 6 pruned, 7 accepted but not here


def test_keep_rows_docstring_and_hand_cases() -> None:
    """Rows of an in-flight segment whose node ids are kept, in row order."""
    assert keep_rows(arr(14, 15, 16), arr(10, 12, 15, 16)).tolist() == [1, 2]
    assert keep_rows(arr(14, 15, 16), arr(10, 12)).tolist() == []
    assert keep_rows(arr(14, 15, 16), arr(14, 15, 16, 17)).tolist() == [0, 1, 2]
    assert keep_rows(arr(3, 9, 4, 8), arr(4, 8)).tolist() == [2, 3]
    assert keep_rows(np.zeros(0, dtype=np.int64), arr(1, 2)).tolist() == []


# ---- the paper's Fig. 1 ------------------------------------------------------------------------

# Nodes 0..8, score-sorted and topological; segments S0 = [0, 1, 2], S1 = [3, 4, 5], S2 = [6, 7, 8].
#
#        0
#      /   \
#     1     2
#    / \     \
#   3   4     5
#   |   |     |
#   6   7     8
#
# The prompt is 4 tokens, so the root sits at position 4 and node i at 4 + depth(i).
FIG1_PARENTS = [-1, 0, 0, 1, 1, 2, 3, 4, 5]
FIG1_POSITIONS = [4, 5, 5, 6, 6, 6, 7, 7, 7]
G0 = 4


def fig1_segment(segment_id: int, version: int = 0) -> Segment:
    nodes = [3 * segment_id, 3 * segment_id + 1, 3 * segment_id + 2]
    return tree_segment(segment_id, nodes, [FIG1_PARENTS[n] for n in nodes],
                        [FIG1_POSITIONS[n] for n in nodes], version)


# Verify S0: root 0 and node 1 accepted, 2 rejected, x_new = token of node 4 (in S1).
# Keep = accepted [0, 1] | new root 4 and its subtree [4, 7].
FIG1_PRUNE = prune(1, [0, 1, 4, 7], n_accepted=2)


def prefilled_ledger() -> StageLedger:
    ledger = StageLedger()
    ledger.reset()
    chunk, rows = ledger.admit(prefill_segment(-1, G0, 0, version=0))
    assert rows.tolist() == [0, 1, 2, 3]
    ledger.append(chunk)
    return ledger


def run(ledger: StageLedger, segment: Segment) -> Segment:
    """What a stage does before a forward: sync, admit, append. Returns the admitted segment."""
    ledger.sync()
    admitted, _ = ledger.admit(segment)
    ledger.append(admitted)
    return admitted


def test_attention_for_the_first_segment_is_the_tree_mask() -> None:
    """With an empty tree region, S0's rows see their ancestors within the segment: the root sees
    itself, 1 and 2 see the root and themselves. Columns = region (none) + rows [0, 1, 2]."""
    ledger = prefilled_ledger()
    admitted, _ = ledger.admit(fig1_segment(0))
    assert ledger.attention(admitted).astype(int).tolist() == [
        [1, 0, 0],
        [1, 1, 0],
        [1, 0, 1],
    ]


def test_attention_spans_the_tree_region_and_the_segment() -> None:
    """After S0, S1's mask has columns [0, 1, 2 | 3, 4, 5]: 3 and 4 (children of 1) see 0, 1 and
    themselves; 5 (child of 2) sees 0, 2 and itself. The 4 prompt slots are not columns."""
    ledger = prefilled_ledger()
    run(ledger, fig1_segment(0))
    admitted, _ = ledger.admit(fig1_segment(1))
    assert ledger.attention(admitted).astype(int).tolist() == [
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ]


def test_fig1_prune_on_a_stage_that_processed_s0_s1_and_holds_s2() -> None:
    """Fig. 1's prune on a stage two segments ahead: G 4 → 6, region [0..5] → [4], KV slots kept
    [0..3 prefix, 4 (node 0), 5 (node 1), 8 (node 4)], and S2 in flight shrinks to row 1 (node 7),
    whose mask is [[4 → yes, 7 → yes]]; appending it makes the region [4, 7]."""
    ledger = prefilled_ledger()
    run(ledger, fig1_segment(0))
    run(ledger, fig1_segment(1))
    assert ledger.region_ids.tolist() == [0, 1, 2, 3, 4, 5]
    assert ledger.kv_len == 10
    s2 = fig1_segment(2)  # received before the prune, so it reflects version 0

    ledger.receive(FIG1_PRUNE)
    slots = ledger.sync()
    assert slots is not None
    assert slots.tolist() == [0, 1, 2, 3, 4, 5, 8]
    assert ledger.committed_len == G0 + 2
    assert ledger.region_ids.tolist() == [4]
    assert ledger.region_parents.tolist() == [1]
    assert ledger.version == 1

    admitted, rows = ledger.admit(s2)
    assert rows.tolist() == [1]
    assert admitted.node_ids.tolist() == [7]
    assert admitted.parent_ids.tolist() == [4]
    assert admitted.positions.tolist() == [7]
    assert admitted.tokens.tolist() == [107]
    assert admitted.version == 1
    # Node 7's position is the new committed length (6) + its depth below the new root 4 (1).
    assert admitted.positions[0] == ledger.committed_len + 1
    assert ledger.attention(admitted).tolist() == [[True, True]]
    ledger.append(admitted)
    assert ledger.region_ids.tolist() == [4, 7]
    assert ledger.region_parents.tolist() == [1, 4]
    assert ledger.kv_len == 8


def test_fig1_prune_on_a_stage_that_processed_s0_and_holds_s1() -> None:
    """One stage behind: region [0, 1, 2] → [] (0 and 1 committed, 2 pruned), slots [0..5]. S1
    shrinks to node 4, whose parent 1 is committed: its mask is the single column of itself. Then
    S2 shrinks to node 7, which sees 4 and itself."""
    ledger = prefilled_ledger()
    run(ledger, fig1_segment(0))
    ledger.receive(FIG1_PRUNE)
    assert ledger.sync().tolist() == [0, 1, 2, 3, 4, 5]
    assert ledger.committed_len == 6
    assert ledger.region_ids.tolist() == []

    s1, rows = ledger.admit(fig1_segment(1))
    assert rows.tolist() == [1]
    assert s1.node_ids.tolist() == [4]
    assert s1.parent_ids.tolist() == [1]  # committed: above the tree region
    assert ledger.attention(s1).tolist() == [[True]]
    ledger.append(s1)

    s2, rows = ledger.admit(fig1_segment(2))
    assert rows.tolist() == [1]
    assert ledger.attention(s2).tolist() == [[True, True]]


def test_fig1_prune_arriving_during_a_forward_prunes_kv_and_output_rows() -> None:
    """A stage mid-forward on S1 when the prune lands: S1's rows are already in the KV (region
    [0..5]); after the forward, sync keeps slots of 0, 1, 4 and the output rows shrink to node 4."""
    ledger = prefilled_ledger()
    run(ledger, fig1_segment(0))
    in_forward = run(ledger, fig1_segment(1))
    ledger.receive(FIG1_PRUNE)
    assert ledger.sync().tolist() == [0, 1, 2, 3, 4, 5, 8]
    out, rows = ledger.admit(in_forward)
    assert rows.tolist() == [1]
    assert out.node_ids.tolist() == [4]
    assert out.version == 1


def test_round_exit_prune_empties_the_region() -> None:
    """After Fig. 1's prune the region is [4, 7] (G=6). A round exit accepting only 4 keeps slot 6
    and drops 7 (slot 7): slots [0..6], G=7, empty region."""
    ledger = prefilled_ledger()
    run(ledger, fig1_segment(0))
    run(ledger, fig1_segment(1))
    ledger.receive(FIG1_PRUNE)
    run(ledger, fig1_segment(2))
    assert ledger.region_ids.tolist() == [4, 7]

    ledger.receive(prune(2, [4], n_accepted=1, round_exit=True))
    assert ledger.sync().tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert ledger.committed_len == 7
    assert ledger.region_ids.tolist() == []
    assert ledger.region_parents.tolist() == []
    assert ledger.kv_len == 7


def test_round_exit_that_keeps_tree_nodes_is_rejected() -> None:
    """A round exit keeps nothing beyond the accepted path; a message claiming otherwise is loud."""
    ledger = prefilled_ledger()
    run(ledger, fig1_segment(0))
    ledger.receive(prune(1, [0, 1, 2], n_accepted=1, round_exit=True))
    with pytest.raises(AssertionError):
        ledger.sync()


def test_attention_for_a_prefill_segment_is_causal() -> None:
    """A prompt chunk attends causally to itself (lower-triangular); the prefix before it is not a
    column. Appending it extends the committed prefix, not the tree region."""
    ledger = prefilled_ledger()
    chunk, _ = ledger.admit(prefill_segment(0, 3, G0, version=0))
    assert ledger.attention(chunk).astype(int).tolist() == [
        [1, 0, 0],
        [1, 1, 0],
        [1, 1, 1],
    ]
    ledger.append(chunk)
    assert ledger.committed_len == G0 + 3
    assert ledger.region_ids.tolist() == []


def test_append_records_tree_rows_and_rejects_a_prompt_chunk_after_them() -> None:
    """Appending tree rows extends the region (ids and parents, in row order); a prompt chunk may
    only extend the committed prefix when no tree region exists."""
    ledger = prefilled_ledger()
    s0, _ = ledger.admit(fig1_segment(0))
    ledger.append(s0)
    assert ledger.region_ids.tolist() == [0, 1, 2]
    assert ledger.region_parents.tolist() == [-1, 0, 0]
    assert (ledger.committed_len, ledger.kv_len) == (G0, G0 + 3)
    with pytest.raises(AssertionError):
        ledger.append(prefill_segment(1, 2, G0 + 3, version=0))


def test_attention_rejects_a_row_whose_ancestor_is_neither_in_kv_nor_committed() -> None:
    """Node 4's parent 1 was never processed or committed here: the stage cannot build its mask."""
    ledger = prefilled_ledger()
    seg, _ = ledger.admit(tree_segment(1, [4], [1], [6], version=0))
    with pytest.raises(AssertionError):
        ledger.attention(seg)


def test_reset_drops_kv_and_prunes_but_keeps_the_version_count() -> None:
    """A new request: G=0, empty region, every earlier prune (and committed id) forgotten, and the
    ledger's version jumps to the last received prune, which the first prompt chunk carries. Prunes
    keep arriving in global order (v3 next)."""
    ledger = prefilled_ledger()
    run(ledger, fig1_segment(0))
    ledger.receive(FIG1_PRUNE)
    ledger.sync()  # commits nodes 0 and 1
    ledger.receive(prune(2, [4], n_accepted=0))
    ledger.reset()
    assert (ledger.committed_len, ledger.kv_len, ledger.version) == (0, 0, 2)
    assert ledger.region_ids.tolist() == [] and ledger.region_parents.tolist() == []
    assert ledger.sync() is None

    chunk, _ = ledger.admit(prefill_segment(10, 2, 0, version=2))
    ledger.append(chunk)
    assert ledger.committed_len == 2
    # Node 1 was committed in the previous request only: no longer an ancestor this stage knows.
    stale, _ = ledger.admit(tree_segment(11, [4], [1], [3], version=2))
    with pytest.raises(AssertionError):
        ledger.attention(stale)
    with pytest.raises(AssertionError):
        ledger.receive(prune(1, [0], n_accepted=1))
    ledger.receive(prune(3, [20], n_accepted=0))
    assert ledger.sync() is not None and ledger.version == 3


# ---- protocol ----------------------------------------------------------------------------------


def test_prunes_must_arrive_in_version_order() -> None:
    """receive() accepts v1, v2, … only: a skipped, repeated or stale version is a protocol bug."""
    ledger = StageLedger()
    with pytest.raises(AssertionError):
        ledger.receive(prune(2, [0], 1))
    ledger.receive(prune(1, [0], 1))
    with pytest.raises(AssertionError):
        ledger.receive(prune(1, [0], 1))
    with pytest.raises(AssertionError):
        ledger.receive(prune(3, [0], 1))
    ledger.receive(prune(2, [0], 1))


def test_ready_waits_for_the_prune_a_segment_reflects() -> None:
    """A segment built after prune v2 is not ready until v2 has arrived (arrival alone suffices,
    sync is admit's business); admitting it early is a loud error."""
    ledger = prefilled_ledger()
    run(ledger, fig1_segment(0))
    late = tree_segment(3, [9], [7], [8], version=2)
    assert not ledger.ready(late)
    with pytest.raises(AssertionError):
        ledger.admit(late)
    ledger.receive(FIG1_PRUNE)
    assert not ledger.ready(late)
    ledger.receive(prune(2, [4, 7], n_accepted=0))
    assert ledger.ready(late)
    assert ledger.ready(fig1_segment(1, version=0))


def test_admit_requires_sync_first() -> None:
    """Rows are pruned to the ledger's version, so the KV must be at the last received prune."""
    ledger = prefilled_ledger()
    run(ledger, fig1_segment(0))
    ledger.receive(FIG1_PRUNE)
    with pytest.raises(AssertionError):
        ledger.admit(fig1_segment(1))
    ledger.sync()
    ledger.admit(fig1_segment(1))


def test_admit_applies_only_prunes_after_the_segment_version_once() -> None:
    """S3 holds nodes drafted after v1 (9, 10, 11 under 4, 7, 9), so v1's keep list cannot name
    them: re-applying v1 would drop every row. Admitted at ledger v1, all rows stay, the result
    reflects v1, and admitting the admitted segment again is a no-op."""
    ledger = prefilled_ledger()
    run(ledger, fig1_segment(0))
    run(ledger, fig1_segment(1))
    ledger.receive(FIG1_PRUNE)
    run(ledger, fig1_segment(2))
    s3 = tree_segment(3, [9, 10, 11], [4, 7, 9], [7, 8, 8], version=1)
    admitted, rows = ledger.admit(s3)
    assert rows.tolist() == [0, 1, 2]
    assert admitted.node_ids.tolist() == [9, 10, 11]
    assert admitted.version == ledger.version == 1
    again, rows = ledger.admit(admitted)
    assert rows.tolist() == [0, 1, 2]
    assert again.node_ids.tolist() == [9, 10, 11] and again.version == 1


def test_admit_of_a_prefill_segment_must_be_current() -> None:
    """No prune may reach a prompt chunk in flight: a stale version means the protocol broke."""
    ledger = prefilled_ledger()
    ledger.receive(prune(1, [], n_accepted=0))
    ledger.sync()
    with pytest.raises(AssertionError):
        ledger.admit(prefill_segment(5, 2, G0, version=0))
    chunk, rows = ledger.admit(prefill_segment(5, 2, G0, version=1))
    assert rows.tolist() == [0, 1] and chunk.version == 1


def test_sync_returns_none_when_nothing_changed() -> None:
    """No prune received since the last sync → None, so a backend skips its gather."""
    ledger = StageLedger()
    assert ledger.sync() is None
    ledger = prefilled_ledger()
    run(ledger, fig1_segment(0))
    assert ledger.sync() is None
    ledger.receive(FIG1_PRUNE)
    assert ledger.sync() is not None
    assert ledger.sync() is None


def fig1_three_prunes_ledger() -> StageLedger:
    """Region [4, 7, 9, 10, 11] at slots 6..10 (G=6, v1 applied), v2 and v3 not yet received."""
    ledger = prefilled_ledger()
    run(ledger, fig1_segment(0))
    run(ledger, fig1_segment(1))
    ledger.receive(FIG1_PRUNE)
    run(ledger, fig1_segment(2))
    run(ledger, tree_segment(3, [9, 10, 11], [4, 7, 9], [7, 8, 8], version=1))
    assert ledger.region_ids.tolist() == [4, 7, 9, 10, 11]
    return ledger


# v2: accept root 4, re-root at 7 (subtree [7, 10]); 9 and its child 11 go.
# v3: accept 7 and 10, round exit.
V2 = prune(2, [4, 7, 10], n_accepted=1)
V3 = prune(3, [7, 10], n_accepted=2, round_exit=True)


def test_sync_composes_several_prunes_into_one_slot_list() -> None:
    """v2 keeps slots [0..5 | 6 (4), 7 (7), 9 (10)]; then v3 keeps all 9. Received together, one
    sync returns the composition [0..7, 9], equal to gathering with each list in turn, and ends in
    the same state (G=9, empty region)."""
    one_by_one = fig1_three_prunes_ledger()
    one_by_one.receive(V2)
    s2 = one_by_one.sync()
    assert s2.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    assert one_by_one.region_ids.tolist() == [7, 10] and one_by_one.committed_len == 7
    one_by_one.receive(V3)
    s3 = one_by_one.sync()
    assert s3.tolist() == list(range(9))

    together = fig1_three_prunes_ledger()
    together.receive(V2)
    together.receive(V3)
    composed = together.sync()
    assert composed.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    assert composed.tolist() == s2[s3].tolist()
    for ledger in (one_by_one, together):
        assert (ledger.committed_len, ledger.version, ledger.region_ids.tolist()) == (9, 3, [])


def test_admit_composes_several_prunes_for_a_segment_in_flight() -> None:
    """A segment sent at v1 ([12, 13] under 10 and 11) and admitted after v2 and v3. D0 made v2
    after sending it, so v2 keeps 7's subtree ∩ sent = [7, 10, 12]: 13 (11's child) goes. v3 (an
    exit accepting 7, 10) drops 12 too: nothing left, and the segment reflects v3."""
    ledger = fig1_three_prunes_ledger()
    seg = tree_segment(4, [12, 13], [10, 11], [9, 9], version=1)
    ledger.receive(prune(2, [4, 7, 10, 12], n_accepted=1))
    ledger.sync()
    mid, rows = ledger.admit(seg)
    assert rows.tolist() == [0] and mid.node_ids.tolist() == [12] and mid.version == 2
    ledger.receive(V3)
    ledger.sync()
    out, rows = ledger.admit(seg)
    assert rows.tolist() == [] and out.version == 3 and len(out) == 0
    out, rows = ledger.admit(mid)  # from v2 on: the same answer
    assert rows.tolist() == [] and out.version == 3


# ---- property: the ledger against a reference over random trees and interleavings -------------


def _subtree(parents: list[int], node: int) -> set[int]:
    out = {node}
    for i in range(node + 1, len(parents)):
        if parents[i] in out:
            out.add(i)
    return out


def _ancestors_or_self(parents: list[int], node: int) -> set[int]:
    out = set()
    while node >= 0:
        out.add(node)
        node = parents[node]
    return out


@settings(derandomize=True, deadline=None, max_examples=500)
@given(data=st.data())
def test_ledger_matches_reference_for_random_trees_prunes_and_interleavings(data: st.DataObject) -> None:
    """For a random topological tree cut into contiguous segments, D0 issues valid prunes (each
    accepts a root-to-node path of nodes this stage has emitted, then re-roots at any child of
    its end, keeping that child's subtree ∩ nodes sent so far, or exits) while the stage receives
    prunes (syncing at once when idle, or batching them until the next forward), starts and
    finishes forwards in a random interleaving.

    The reference is D0's own tree: the full node list with every prune applied in order. Pinned:
    after every sync the region is exactly the processed surviving nodes in tree order, the KV
    (a list of node ids gathered with every slot list) is committed prompt + accepted paths in
    order followed by the region, every tree mask is ancestors-or-self, and every admitted /
    emitted segment holds exactly its surviving rows. And the checks a stage makes before applying
    a peer's message (`check_prune`, `check_segment`) accept every one of these valid messages.
    """
    n = data.draw(st.integers(2, 12), label="n_nodes")
    # parent = i - 1 - back: hypothesis favours small draws, which gives deep trees as well as bushy ones.
    parents = [-1] + [i - 1 - data.draw(st.integers(0, i - 1), label=f"back[{i}]") for i in range(1, n)]
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=5), label="cuts")))
    bounds = [0, *cuts, n]
    cut_nodes = [list(range(lo, hi)) for lo, hi in zip(bounds, bounds[1:])]
    g0 = data.draw(st.integers(0, 3), label="prompt_len")
    ids = [7 + 3 * i for i in range(n)]  # node ids differ from indices and from slots
    idx_of = {node_id: i for i, node_id in enumerate(ids)}
    depth = [0] * n
    for i in range(1, n):
        depth[i] = depth[parents[i]] + 1

    ledger = StageLedger()
    kv: list[int] = []  # what the stage's KV holds, slot by slot: -1 prompt, else node id
    if g0:
        ledger.reset()
        ledger.check_segment(prefill_segment(0, g0, 0, version=0))
        chunk, _ = ledger.admit(prefill_segment(0, g0, 0, version=0))
        assert ledger.attention(chunk).tolist() == np.tri(g0, dtype=bool).tolist()
        ledger.append(chunk)
        kv += [-1] * g0

    # D0's side (the reference)
    issued: list[Prune] = []
    alive = set(range(n))  # not committed, not pruned
    alive_at = {0: set(alive)}  # version -> alive set
    committed_at = {0: []}  # version -> committed node indices, in commit order
    root: int | None = 0
    n_sent = 0
    sent: set[int] = set()
    # the stage's side
    n_received = 0
    inbox: deque[Segment] = deque()
    busy: Segment | None = None
    appended: list[int] = []  # node indices in KV-append order
    emitted: set[int] = set()

    def check_after_sync() -> None:
        v = ledger.version
        assert v == len([p for p in issued if p.version <= v])
        region = [i for i in appended if i in alive_at[v]]
        assert ledger.region_ids.tolist() == [ids[i] for i in region]
        assert ledger.region_parents.tolist() == [ids[parents[i]] if parents[i] >= 0 else -1 for i in region]
        committed = committed_at[v]
        assert ledger.committed_len == g0 + len(committed)
        assert kv == [-1] * g0 + [ids[i] for i in committed] + [ids[i] for i in region]
        assert ledger.kv_len == len(kv)

    def sync() -> None:
        nonlocal kv
        slots = ledger.sync()
        if slots is not None:
            kv = [kv[s] for s in slots.tolist()]
        check_after_sync()

    def check_rows(original: Segment, admitted: Segment, rows: np.ndarray) -> None:
        expected = [nid for nid in original.node_ids.tolist() if idx_of[nid] in alive_at[ledger.version]]
        assert admitted.node_ids.tolist() == expected
        assert original.node_ids[rows].tolist() == expected
        assert admitted.positions.tolist() == [g0 + depth[idx_of[nid]] for nid in expected]
        assert admitted.version == ledger.version

    def do_send() -> None:
        nonlocal n_sent
        nodes = [i for i in cut_nodes[n_sent] if i in alive]
        inbox.append(tree_segment(n_sent, [ids[i] for i in nodes],
                                  [ids[parents[i]] if parents[i] >= 0 else -1 for i in nodes],
                                  [g0 + depth[i] for i in nodes], version=len(issued)))
        sent.update(cut_nodes[n_sent])
        n_sent += 1

    def do_prune() -> None:
        nonlocal alive, root
        assert root is not None
        ends = [root]  # nodes whose path from the root is all emitted
        for i in range(root + 1, n):
            if parents[i] in ends and i in emitted and i in alive:
                ends.append(i)
        end = data.draw(st.sampled_from(ends), label="accepted_end")
        path = sorted(_ancestors_or_self(parents, end) & alive)
        kids = [i for i in range(end + 1, n) if parents[i] == end]
        # Exit on about a quarter of the draws (and at a leaf) so that most runs see several prunes.
        exits = not kids or (data.draw(st.booleans(), label="exit?") and data.draw(st.booleans(), label="exit!"))
        child = None if exits else data.draw(st.sampled_from(kids), label="next_root")
        keep = set(path) | ((_subtree(parents, child) & sent) if child is not None else set())
        issued.append(prune(len(issued) + 1, [ids[i] for i in sorted(keep)], len(path),
                            round_exit=child is None))
        alive = _subtree(parents, child) if child is not None else set()
        root = child
        alive_at[len(issued)] = set(alive)
        committed_at[len(issued)] = committed_at[len(issued) - 1] + path

    def do_receive() -> None:
        nonlocal n_received
        ledger.check_prune(issued[n_received])
        ledger.receive(issued[n_received])
        n_received += 1
        # A driver may sync at once when idle; any backend may also batch receipts until its next
        # forward, so several prunes compose in one sync.
        if busy is None and data.draw(st.booleans(), label="sync_now"):
            sync()

    def do_start() -> None:
        nonlocal busy
        if g0 or n_received:  # a stage holds a prompt (or accepted nodes) before a tree
            ledger.check_segment(inbox[0])
        else:
            with pytest.raises(ProtocolError, match="a tree segment before any prompt"):
                ledger.check_segment(inbox[0])
        sync()
        seg = inbox.popleft()
        admitted, rows = ledger.admit(seg)
        check_rows(seg, admitted, rows)
        if len(admitted) == 0:  # emptied by pruning: nothing to run, the marker goes on
            return
        region = ledger.region_ids.tolist()
        columns = [idx_of[nid] for nid in region + admitted.node_ids.tolist()]
        expected = [[col in _ancestors_or_self(parents, idx_of[nid]) for col in columns]
                    for nid in admitted.node_ids.tolist()]
        assert ledger.attention(admitted).tolist() == expected
        ledger.append(admitted)
        kv.extend(admitted.node_ids.tolist())
        appended.extend(idx_of[nid] for nid in admitted.node_ids.tolist())
        busy = admitted

    def do_finish() -> None:
        nonlocal busy
        assert busy is not None
        sync()
        out, rows = ledger.admit(busy)
        check_rows(busy, out, rows)
        emitted.update(idx_of[nid] for nid in out.node_ids.tolist())
        busy = None

    def enabled() -> list[str]:
        # Progress first: hypothesis favours early entries of sampled_from.
        acts = []
        if root is not None and root in emitted:
            acts.append("prune")
        if busy is not None:
            acts.append("finish")
        if busy is None and inbox and ledger.ready(inbox[0]):
            acts.append("start")
        if root is not None and n_sent < len(cut_nodes):
            acts.append("send")
        if n_received < len(issued):
            acts.append("receive")
        return acts

    actions = {"send": do_send, "prune": do_prune, "receive": do_receive, "start": do_start,
               "finish": do_finish}
    for _ in range(data.draw(st.integers(5, 60), label="n_actions")):
        acts = enabled()
        if not acts:
            break
        actions[data.draw(st.sampled_from(acts), label="action")]()

    # Drain: every issued prune arrives, every sent segment goes through.
    while n_received < len(issued) or busy is not None or inbox:
        if busy is not None:
            do_finish()
        elif n_received < len(issued):
            do_receive()
        else:
            do_start()
    sync()
    assert ledger.version == len(issued)
    assert ledger.region_ids.tolist() == [ids[i] for i in appended if i in alive]


# ---- checks before a peer's message is applied (a stage rejects what fails them) -----------------


def _state(ledger: StageLedger) -> tuple:
    return (ledger.committed_len, ledger.region_ids.tolist(), ledger.region_parents.tolist(), ledger.version,
            ledger.received, sorted(ledger._committed_ids))  # fmt: skip


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (prune(2, [0, 1, 4, 7], 2), "prune v2: out of order, the last one received is v0"),
        (prune(1, [0, 1, 4, 7], 0), "n_accepted 0 outside 1..4"),
        (prune(1, [1, 0, 4], 2), "accepted path [1, 0] is not at the front of the stage's surviving nodes [0, 1, 4]"),
        (prune(1, [0, 9], 2), "accepted path [0, 9] is not at the front"),
        (prune(1, [0, 1, 4], 2, round_exit=True), "a round exit keeps 3 nodes, beyond its accepted path"),
        (prune(1, [0, 5], 1), "keeps node(s) [5] but not their parents"),
    ],
)
def test_check_prune_names_what_does_not_fit_and_changes_nothing(bad: Prune, message: str) -> None:
    """Fig. 1 after S0 and S1 (region [0..5], parents [-1, 0, 0, 1, 1, 2]): a prune out of order,
    one whose accepted path is not the front of the survivors, a round exit that keeps more, one
    that keeps node 5 but drops its parent 2. The valid Fig. 1 prune passes."""
    ledger = prefilled_ledger()
    run(ledger, fig1_segment(0))
    run(ledger, fig1_segment(1))
    before = _state(ledger)
    with pytest.raises(ProtocolError) as err:
        ledger.check_prune(bad)
    assert message in str(err.value)
    assert _state(ledger) == before
    ledger.check_prune(FIG1_PRUNE)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (tree_segment(1, [3, 4], [1, 1], [6, 6], version=0), "reflects prune v0, from before this request (v1)"),
        (tree_segment(1, [8, 9], [7, -1], [6, 5], version=2), "node 8: parent 7 is neither in this stage's KV"),
        (tree_segment(1, [8, 9], [9, 8], [6, 6], version=2), "node 8: parent 9 is neither"),
        (tree_segment(1, [8, 8], [-1, -1], [5, 5], version=2), "node ids [8, 8] must be >= 0, distinct and new"),
        (tree_segment(1, [1], [-1], [5], version=2), "node ids [1] must be >= 0, distinct and new to the stage"),
        (tree_segment(1, [9], [-1], [5], version=3), "reflects prune v3, the last one received is v2"),
        (dataclasses.replace(prefill_segment(1, 2, 5, version=2), reset=False),
         "a prompt chunk must extend a prompt (reset: start one), the stage holds 5 committed and 1 tree slots"),
        (dataclasses.replace(prefill_segment(1, 2, 3, version=2), reset=True),
         "prompt positions [3, 4] do not follow the 0 committed slots"),
        (dataclasses.replace(fig1_segment(0, version=2), reset=True), "only a prompt chunk starts a request"),
        (prefill_segment(1, 2, 0, version=1), "a prompt chunk reflecting prune v1, the stage is at v2"),
    ],
)
def test_check_segment_names_what_does_not_fit_and_changes_nothing(bad: Segment, message: str) -> None:
    """A ledger that served one request to prune v1, reset at v1 (so segments reflecting v0 belong
    to the earlier request), holds a 4-token prompt, ran S0 of Fig. 1 and took prune v2 (accept
    node 0, keep 1): committed 5, region [1]. Segments of the earlier request, orphans, cycles,
    repeated or known ids, a future version, misplaced prompt chunks are refused, and the ledger
    is as it was."""
    ledger = prefilled_ledger()
    run(ledger, fig1_segment(0))
    ledger.receive(prune(1, [0, 1], 1))
    ledger.reset()
    run(ledger, prefill_segment(0, G0, 0, version=1))
    run(ledger, fig1_segment(0, version=1))
    ledger.check_prune(prune(2, [0, 1], 1))
    ledger.receive(prune(2, [0, 1], 1))
    ledger.sync()
    assert (ledger.committed_len, ledger.region_ids.tolist(), ledger._floor) == (5, [1], 1)
    before = _state(ledger)
    with pytest.raises(ProtocolError) as err:
        ledger.check_segment(bad)
    assert message in str(err.value)
    assert _state(ledger) == before
