"""The runtime's wire format: round trips, zero-copy decoding, and errors that name sender and field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flowspec.messages import Prune, Segment, SegmentKind
from flowspec.pipeline import ProtocolError
from runtime.wire import decode, encode, encode_prune, encode_segment, to_prune, to_segment

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
        (_tamper(GOOD, v=99), "message from rank 2: field v: protocol version 99, expected 4"),
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
         "prune message from V2?: field sender must be a rank >= 0, got -1"),
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
