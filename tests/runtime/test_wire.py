"""The runtime's wire format: round trips, zero-copy decoding, and errors that name sender and field."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from flowspec.messages import Prune, Segment, SegmentKind
from flowspec.pipeline import ProtocolError
from runtime.wire import MAX_REPORT_NBYTES, decode, encode, encode_prune, encode_segment, to_prune, to_segment

SEG = Segment(request_id=3, round=2, segment_id=17, kind=SegmentKind.TREE, node_ids=np.array([40, 41, 42]),
              tokens=np.array([7, 8, 9]), parent_ids=np.array([-1, 40, 40]), positions=np.array([12, 13, 13]),
              version=5)  # fmt: skip


def frames_of(parts) -> list[bytes]:
    """What a receiver gets: every frame as its own bytes object."""
    return [bytes(p) for p in parts]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_segment_round_trip_with_hidden_states(dtype: str) -> None:
    """Ids, positions and flags survive; hidden states come back bit for bit in their dtype."""
    hidden = np.arange(3 * 4, dtype=dtype).reshape(3, 4) / 7
    msg = decode(frames_of(encode_segment(SEG, sender=2, hidden=hidden)))
    seg = to_segment(msg)
    assert (msg.type, msg.sender) == ("segment", 2)
    assert [seg.node_ids.tolist(), seg.tokens.tolist(), seg.parent_ids.tolist(), seg.positions.tolist()] == [
        [40, 41, 42], [7, 8, 9], [-1, 40, 40], [12, 13, 13]]
    assert (seg.request_id, seg.round, seg.segment_id, seg.kind, seg.version, seg.reset, seg.final) == (
        3, 2, 17, SegmentKind.TREE, 5, False, False)
    assert msg.arrays["hidden"].dtype == np.dtype(dtype) and np.array_equal(msg.arrays["hidden"], hidden)


def test_bfloat16_travels_as_raw_bits() -> None:
    """numpy has no bfloat16: the 16-bit patterns travel as they are and decode to uint16."""
    bits = np.array([[0x3F80, 0xC000]], dtype=np.uint16)  # 1.0 and -2.0 in bfloat16
    one = Segment(request_id=0, round=0, segment_id=0, kind=SegmentKind.TREE, node_ids=np.array([1]),
                  tokens=np.array([5]), parent_ids=np.array([-1]), positions=np.array([0]), version=0)  # fmt: skip
    msg = decode(frames_of(encode_segment(one, 1, hidden=bits, hidden_dtype="bfloat16")))
    assert msg.dtypes["hidden"] == "bfloat16" and msg.arrays["hidden"].tolist() == [[0x3F80, 0xC000]]


def test_decoding_does_not_copy_array_frames() -> None:
    """Arrays are views of the received frames (zero-copy), not copies."""
    frames = frames_of(encode_segment(SEG, 1, hidden=np.ones((3, 576), dtype=np.float32)))
    msg = decode(frames)
    assert np.shares_memory(msg.arrays["hidden"], np.frombuffer(frames[-1], dtype=np.uint8))


def test_prune_round_trip_and_empty_segment() -> None:
    """A prune keeps its keep list and flags; a segment emptied by pruning has zero rows."""
    prune = Prune(request_id=1, round=4, version=9, keep_ids=np.array([3, 7, 8]), n_accepted=2, round_exit=False)
    back = to_prune(decode(frames_of(encode_prune(prune))))
    assert (back.keep_ids.tolist(), back.n_accepted, back.version, back.round_exit) == ([3, 7, 8], 2, 9, False)
    empty = SEG.select(np.array([], dtype=np.int64), version=6)
    seg = to_segment(decode(frames_of(encode_segment(empty, 3, hidden=np.zeros((0, 8), np.float32)))))
    assert len(seg) == 0 and seg.version == 6


def test_segments_and_prunes_carry_their_lane_within_the_batch_bound() -> None:
    """A batching policy's lane travels with every segment and prune; a stage holds one KV per lane,
    so a lane past pipeline.max_batch's bound is refused, naming the field."""
    seg = to_segment(decode(frames_of(encode_segment(dataclasses.replace(SEG, lane=3), 2,
                                                     hidden=np.zeros((3, 4), np.float32)))))  # fmt: skip
    assert seg.lane == 3 and seg.select(np.array([0]), 7).lane == 3
    prune = Prune(request_id=1, round=4, version=9, keep_ids=np.array([3]), n_accepted=1, round_exit=True, lane=2)
    assert to_prune(decode(frames_of(encode_prune(prune)))).lane == 2
    with pytest.raises(ProtocolError, match=r"segment message from rank 2: field lane: 256 outside 0\.\.255"):
        to_segment(decode(_tamper(GOOD, fields__lane=256)))
    with pytest.raises(ProtocolError, match=r"prune message from rank 0: field lane: -1 outside"):
        to_prune(decode(_tamper(encode_prune(prune), fields__lane=-1)))


def _tamper(parts, **changes) -> list[bytes]:
    frames = frames_of(parts)
    header = json.loads(frames[0])
    for key, value in changes.items():
        target = header
        *path, last = key.split("__")
        for p in path:
            target = target[p] if not p.isdigit() else target[int(p)]
        if value is _DROP:
            del target[last]
        else:
            target[last] = value
    return [json.dumps(header).encode(), *frames[1:]]


_DROP = object()
GOOD = encode_segment(SEG, 2, hidden=np.zeros((3, 4), np.float32))


@pytest.mark.parametrize(
    "frames, message",
    [
        ([b"{nope"], "message from V2?: header is not JSON"),
        (_tamper(GOOD, v=99), "message from rank 2: field v: protocol version 99, expected 7"),
        (_tamper(GOOD, type="gossip"), "message from rank 2: field type: unknown message type 'gossip'"),
        (_tamper(GOOD, fields__version=True), "segment message from rank 2: field version must be int, got True"),
        (_tamper(GOOD, fields__reset=_DROP), "segment message from rank 2: field reset must be bool, got None"),
        (_tamper(GOOD, fields__color="red"), "segment message from rank 2: unknown field(s) color"),
        (_tamper(GOOD, arrays__4__dtype="int8"), "segment message from rank 2: array hidden: dtype 'int8'"),
        (_tamper(GOOD, arrays__4__shape=[3, 5]), "segment message from rank 2: array hidden: 48 bytes for shape [3, 5]"),
        (_tamper(GOOD, arrays__0__name="ids"), "segment message from rank 2: array 'ids' is unknown or repeated"),
        (frames_of(GOOD)[:-1], "segment message from rank 2: field arrays: 4 data frames for 5 described arrays"),
        (frames_of(encode("segment", 2, dict(json.loads(frames_of(GOOD)[0])["fields"]),
                          {"node_ids": np.array([1], np.int32)})), "missing array(s) tokens, parent_ids, positions"),
        (_tamper(encode_prune(Prune(0, 0, 1, np.array([4]), 1, True)), sender=-1),
         "prune message from V2?: field sender must be a rank 0..65536, got -1"),
    ],
)
def test_malformed_frames_name_sender_and_field(frames, message: str) -> None:
    """Every malformed message is a ProtocolError whose text says who sent it and what is wrong."""
    with pytest.raises(ProtocolError) as err:
        decode(frames, sender_hint="V2?")
    assert message in str(err.value)


def test_rows_must_agree_and_kinds_and_counts_must_make_sense() -> None:
    """Row arrays of different lengths, an unknown segment kind, n_accepted beyond the keep list."""
    bad_rows = encode("segment", 1, dict(json.loads(frames_of(GOOD)[0])["fields"]),
                      {"node_ids": np.array([1, 2], np.int32), "tokens": np.array([1], np.int32),
                       "parent_ids": np.array([1], np.int32), "positions": np.array([1], np.int32)})  # fmt: skip
    with pytest.raises(ProtocolError, match="arrays disagree on the row count"):
        decode(frames_of(bad_rows))
    with pytest.raises(ProtocolError, match="field kind: unknown 'leaf'"):
        to_segment(decode(_tamper(GOOD, fields__kind="leaf")))
    with pytest.raises(ProtocolError, match=r"field n_accepted: 3 outside 1..2"):
        to_prune(decode(frames_of(encode_prune(Prune(0, 0, 1, np.array([4, 5]), 3, True)))))


HEARTBEAT = encode("heartbeat", 0, {"clock_s": 1.0})


def _text(parts, old: bytes, new: bytes) -> list[bytes]:
    frames = frames_of(parts)
    assert old in frames[0]
    return [frames[0].replace(old, new, 1), *frames[1:]]


@pytest.mark.parametrize(
    "frames, message",
    [
        ([b"{" + b" " * 70_000 + b"}"], "message from V2?: header of 70002 bytes, at most 65536"),
        ([b"[" * 9 + b"]" * 9], "message from V2?: header nests 9 levels deep, at most 8"),
        ([b"[" * 30_000 + b"]" * 30_000], "message from V2?: header nests 30000 levels deep"),
        ([b'{"s": "' + b"[" * 100 + b'"}'], "message from V2?: field v: protocol version None"),  # brackets in a string do not nest
        (_text(HEARTBEAT, b'"sender":0', b'"sender":' + b"7" * 5000), "header is not JSON (Exceeds the limit (4300 digits)"),
        (_text(GOOD, b'"segment_id":17', b'"segment_id":' + b"9" * 30),
         "segment message from rank 2: field segment_id: 999999999999999999999999999999 does not fit 64 bits"),
        (_text(GOOD, b'"sender":2', b'"sender":70000'), "field sender must be a rank 0..65536, got 70000"),
        (_text(HEARTBEAT, b"1.0", b"NaN"), "heartbeat message from rank 0: field clock_s must be finite, got nan"),
        (_text(HEARTBEAT, b"1.0", b"-Infinity"), "field clock_s must be finite, got -inf"),
        (_text(HEARTBEAT, b'"heartbeat"', b'["heartbeat"]'), "field type: unknown message type ['heartbeat']"),
        (_tamper(GOOD, arrays__0__name=["node_ids"]), "array ['node_ids'] is unknown or repeated"),
        (_tamper(GOOD, arrays__0__shape=[2**31]), "array node_ids: shape [2147483648] beyond the bounds [8192], 1073741824 elements"),
        (_tamper(GOOD, arrays__4__shape=[3, 2**70]), "array hidden: shape [3, 1180591620717411303424] beyond the bounds"),
        (_tamper(GOOD, arrays__4__shape=[8192, 2**20]), "array hidden: shape [8192, 1048576] beyond the bounds"),
        (_tamper(GOOD, arrays__4__shape=[3, 4.0]), "array hidden: shape [3, 4.0] must be 2 sizes >= 0"),
        (_tamper(GOOD, arrays__4__shape=[3, True]), "array hidden: shape [3, True] must be 2 sizes >= 0"),
        (_tamper(GOOD, type="x" * 1000), "field type: unknown message type 'xxxxxxxx"),
    ],
)
def test_declared_sizes_depths_and_numbers_are_bounded(frames, message: str) -> None:
    """What a header declares is bounded before it is used: its bytes, its nesting (counted, never
    recursed into), integers (64 bits; json refuses > 4300 digits), floats (finite), array shapes
    (rows, width, elements: no overflow, no allocation), and the type and names (strings)."""
    with pytest.raises(ProtocolError) as err:
        decode(frames, sender_hint="V2?")
    assert message in str(err.value)
    assert len(str(err.value)) < 400  # what a peer sent is quoted cut, never whole


def test_a_larger_header_bound_admits_a_large_report() -> None:
    """D0 raises the header bound for stages' reports, which list a run's spans."""
    spans = [[0, i, "tree", 4, 12, 1.0, 2.0] for i in range(3000)]
    frames = frames_of(encode("report", 1, {"spans": spans, "computes": [], "transfers": [], "arrivals": [], "rejected": 2}))
    with pytest.raises(ProtocolError, match="at most 65536"):
        decode(frames)
    msg = decode(frames, max_header_nbytes=MAX_REPORT_NBYTES)
    assert (len(msg.fields["spans"]), msg.fields["rejected"]) == (3000, 2)
