"""Wire format of the ZeroMQ runtime: one JSON header frame, then one raw frame per array.

Theory of operation
-------------------
A message is a list of frames. Frame 0 is a small UTF-8 JSON header:

    {"v": 1, "type": "segment", "sender": 2, "fields": {...},
     "arrays": [{"name": "node_ids", "dtype": "int32", "shape": [16]}, ...]}

and frame i+1 holds array i's bytes, C-contiguous, little-endian, so a receiver can wrap them
with `numpy.frombuffer` without a copy (pyzmq's `copy=False` frames expose the buffer protocol).
bfloat16, which numpy lacks, travels as its raw 16-bit pattern and decodes to a uint16 array that
torch can view back.

Every message is validated on receipt against a schema per type: the protocol version, the fields
and their types, the array names, dtypes, ranks and byte counts, and row counts that must agree.
Anything wrong raises `ProtocolError` naming the sender and the field, never a numpy error later.
Everything a peer declares is bounded before it is used (`MAX_HEADER_NBYTES`, `MAX_JSON_DEPTH`,
`MAX_ROWS`, `MAX_WIDTH`, `MAX_ELEMENTS`, integers within int64, floats finite): a hostile header
costs a linear scan of at most `MAX_HEADER_NBYTES`, never a recursion, an overflow or an allocation.
Rule: this module knows bytes and numpy only; it never imports zmq or torch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flowspec.config import MAX_BATCH
from flowspec.messages import Prune, Segment, SegmentKind
from flowspec.messages import ProtocolError

PROTOCOL_VERSION = 7  # 2: heartbeat and flush carry the sender's clock; 3: report carries computes and
# transfers; 4: a segment may carry the target's decisions (argmax, logits), a report its arrivals;
# 5: a report counts the frames the stage rejected; 6: a stage heartbeats with `status` (its progress);
# 7: segments and prunes name their batch lane, segments their group (several requests served at once)

# Bounds on what a header may declare. Every header but a report is under 1 KB and 4 levels deep; a
# report lists a run's spans (~80 bytes each), so its receiver (D0) raises the header bound.
MAX_HEADER_NBYTES = 64 * 1024
MAX_REPORT_NBYTES = 256 * 1024 * 1024  # D0's bound: a report of millions of spans
MAX_JSON_DEPTH = 8
MAX_ROWS = 8192  # rows of a segment: a tree (tree.total) or a prompt chunk (<= 64); far above either
MAX_WIDTH = 1 << 20  # the second dimension: hidden size or vocabulary (the largest vocabularies are ~256k)
MAX_ELEMENTS = 1 << 30  # one array: 4 GiB of float32 at most, whatever its shape
MAX_RANK = 1 << 16
INT64 = (-(1 << 63), (1 << 63) - 1)
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')  # a JSON string, escapes included

DTYPES: dict[str, np.dtype] = {
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),  # raw bits; the receiver views them as torch.bfloat16
}

# type -> (fields with their Python types, arrays: name -> (allowed dtypes, rank, optional))
_ROW_ARRAYS = {name: (("int32", "int64"), 1, False) for name in ("node_ids", "tokens", "parent_ids", "positions")}
SCHEMAS: dict[str, tuple[dict[str, type], dict[str, tuple[tuple[str, ...], int, bool]]]] = {
    "segment": (
        {"request_id": int, "round": int, "segment_id": int, "kind": str, "version": int, "reset": bool,
         "final": bool, "lane": int, "group": int, "group_size": int},
        {**_ROW_ARRAYS, "hidden": (("float32", "float16", "bfloat16"), 2, True),
         "argmax": (("int32", "int64"), 1, True), "logits": (("float32",), 2, True)},
    ),
    "prune": (
        {"request_id": int, "round": int, "version": int, "n_accepted": int, "round_exit": bool, "lane": int},
        {"keep_ids": (("int32", "int64"), 1, False)},
    ),
    "error": ({"message": str}, {}),
    "stop": ({}, {}),
    # control: a stage says hello once bound, D0 answers with where to send, the stage says ready
    # once its layers are loaded; both sides heartbeat while idle; after each run D0 sends flush and
    # every stage answers with a report of its spans.
    "hello": ({"address": str, "first_layer": int, "n_layers": int}, {}),
    "peers": ({"next": str, "clock_s": float}, {}),
    "ready": ({}, {}),
    # D0's clock travels in peers, heartbeat and flush: a stage takes the offset from the least-delayed
    # of them, so that its spans land on D0's time axis (see runtime.stage, `clock_offset_s`).
    "heartbeat": ({"clock_s": float}, {}),
    # a stage's heartbeat: alive, and how far it got — the last segment it passed on this run (-1:
    # none yet), when (D0's clock), and how many wait in its queue — so D0's progress watchdog can
    # tell a wedged stage that still heartbeats, and name it (runtime.draft_node)
    "status": ({"forwarded": int, "t_forwarded_s": float, "queued": int}, {}),
    "flush": ({"clock_s": float}, {}),  # a run ended: report its spans, then forget it (KV, ledger, spans)
    # computes and transfers: an emulated run's padded computes and paced messages (empty otherwise)
    "report": ({"spans": list, "computes": list, "transfers": list, "arrivals": list, "rejected": int}, {}),
}  # fmt: skip


@dataclass(frozen=True, slots=True, eq=False)
class Message:
    type: str
    sender: int
    fields: dict[str, object]
    arrays: dict[str, np.ndarray]  # bfloat16 arrives as uint16 (see `dtypes`)
    dtypes: dict[str, str]  # the dtype names as sent


def encode(type_: str, sender: int, fields: dict[str, object], arrays: dict[str, np.ndarray] | None = None,
           dtypes: dict[str, str] | None = None) -> list[bytes | memoryview]:  # fmt: skip
    """Frames for one message; `dtypes` names arrays whose dtype numpy cannot (bfloat16 as uint16)."""
    arrays = arrays or {}
    dtypes = dtypes or {}
    described = []
    buffers: list[bytes | memoryview] = []
    for name, array in arrays.items():
        dtype = dtypes.get(name, array.dtype.name)
        if dtype not in DTYPES:
            raise ValueError(f"{type_}.{name}: dtype {dtype} cannot travel (known: {', '.join(DTYPES)})")
        data = np.ascontiguousarray(array, dtype=DTYPES[dtype])
        described.append({"name": name, "dtype": dtype, "shape": list(data.shape)})
        buffers.append(memoryview(data.reshape(-1).view(np.uint8)))
    header = {"v": PROTOCOL_VERSION, "type": type_, "sender": sender, "fields": fields, "arrays": described}
    return [json.dumps(header, separators=(",", ":")).encode(), *buffers]


def json_depth(text: bytes) -> int:
    """How deeply `text` nests brackets outside strings: one linear pass, no recursion.

    >>> json_depth(b'{"a": [1, {"b": "[[["}]}')
    3
    """
    bare = np.frombuffer(_STRING.sub(b'""', text), dtype=np.uint8)
    step = np.isin(bare, (ord("["), ord("{"))).astype(np.int64) - np.isin(bare, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def decode(frames: Sequence[bytes | memoryview], sender_hint: str = "?", *,
           max_header_nbytes: int = MAX_HEADER_NBYTES) -> Message:  # fmt: skip
    """Validate and decode one message; `sender_hint` names the peer until the header does."""
    who = f"message from {sender_hint}"
    if not frames:
        raise ProtocolError(f"{who}: no frames")
    raw = memoryview(frames[0])
    if raw.nbytes > max_header_nbytes:
        raise ProtocolError(f"{who}: header of {raw.nbytes} bytes, at most {max_header_nbytes}")
    text = raw.tobytes()
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ProtocolError(f"{who}: header nests {depth} levels deep, at most {MAX_JSON_DEPTH}")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also an int of > 4300 digits
        raise ProtocolError(f"{who}: header is not JSON ({str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"{who}: header must be a JSON object")
    sender = header.get("sender")
    rank_ok = type(sender) is int and 0 <= sender <= MAX_RANK
    if rank_ok:
        who = f"message from rank {sender}"
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"{who}: field v: protocol version {_short(header.get('v'))}, expected {PROTOCOL_VERSION}")
    type_ = header.get("type")
    if not isinstance(type_, str) or type_ not in SCHEMAS:
        raise ProtocolError(f"{who}: field type: unknown message type {_short(type_)} (known: {', '.join(SCHEMAS)})")
    who = f"{type_} {who}"
    if not rank_ok:
        raise ProtocolError(f"{who}: field sender must be a rank 0..{MAX_RANK}, got {_short(sender)}")
    field_types, array_specs = SCHEMAS[type_]
    fields = header.get("fields")
    if not isinstance(fields, dict):
        raise ProtocolError(f"{who}: field fields must be an object")
    for name, kind in field_types.items():
        value = fields.get(name)
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not ok:
            raise ProtocolError(f"{who}: field {name} must be {kind.__name__}, got {_short(value)}")
        if kind is int and not INT64[0] <= value <= INT64[1]:  # type: ignore[operator]
            raise ProtocolError(f"{who}: field {name}: {_short(value)} does not fit 64 bits")
        if kind is float and not math.isfinite(value):  # type: ignore[arg-type]
            raise ProtocolError(f"{who}: field {name} must be finite, got {value!r}")
    extra = set(fields) - set(field_types)
    if extra:
        raise ProtocolError(f"{who}: unknown field(s) {', '.join(sorted(extra))[:80]}")
    described = header.get("arrays")
    if not isinstance(described, list) or len(described) != len(frames) - 1:
        raise ProtocolError(f"{who}: field arrays: {len(frames) - 1} data frames for "
                            f"{len(described) if isinstance(described, list) else '?'} described arrays")  # fmt: skip
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for spec, frame in zip(described, frames[1:]):
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or name not in array_specs or name in arrays:
            raise ProtocolError(f"{who}: array {_short(name)} is unknown or repeated")
        allowed, rank, _ = array_specs[name]
        dtype, shape = spec.get("dtype"), spec.get("shape")
        if dtype not in allowed:
            raise ProtocolError(f"{who}: array {name}: dtype {_short(dtype)} not in {', '.join(allowed)}")
        if not (isinstance(shape, list) and len(shape) == rank and all(type(d) is int and d >= 0 for d in shape)):
            raise ProtocolError(f"{who}: array {name}: shape {_short(shape)} must be {rank} sizes >= 0")
        bounds = (MAX_ROWS, MAX_WIDTH)[:rank]
        if any(d > b for d, b in zip(shape, bounds)) or math.prod(shape) > MAX_ELEMENTS:
            raise ProtocolError(f"{who}: array {name}: shape {_short(shape)} beyond the bounds "
                                f"{list(bounds)}, {MAX_ELEMENTS} elements")  # fmt: skip
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        nbytes = memoryview(frame).nbytes
        if nbytes != expected:
            raise ProtocolError(f"{who}: array {name}: {nbytes} bytes for shape {shape} {dtype} (expected {expected})")
        arrays[name] = np.frombuffer(frame, dtype=DTYPES[dtype]).reshape(shape)
        dtypes[name] = dtype
    missing = [n for n, (_, _, optional) in array_specs.items() if not optional and n not in arrays]
    if missing:
        raise ProtocolError(f"{who}: missing array(s) {', '.join(missing)}")
    rows = {n: len(a) for n, a in arrays.items() if n != "logits"}  # logits: the decided rows only
    if len(set(rows.values())) > 1 and type_ == "segment":
        raise ProtocolError(f"{who}: arrays disagree on the row count: {rows}")
    return Message(type_, sender, fields, arrays, dtypes)


def _short(value: object, limit: int = 80) -> str:
    """`repr(value)`, cut: an error message must not grow with what a peer sent."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- the core's payloads --------------------------------------------------------------------------


def encode_segment(seg: Segment, sender: int, hidden: np.ndarray | None = None, hidden_dtype: str | None = None,
                   *, decided: np.ndarray | None = None) -> list[bytes | memoryview]:  # fmt: skip
    """A segment and, after the first hop, its hidden states [L, H]; from a last stage that runs the
    target's LM head (`pipeline.head: last`), its decisions: argmax ids [L] (-1: none) or the
    logits of its decided rows [n, V]."""
    arrays = {"node_ids": seg.node_ids, "tokens": seg.tokens, "parent_ids": seg.parent_ids, "positions": seg.positions}
    dtypes = {name: "int32" for name in arrays}
    if hidden is not None:
        arrays["hidden"] = hidden
        dtypes["hidden"] = hidden_dtype or hidden.dtype.name
    if decided is not None:
        name = "logits" if decided.ndim == 2 else "argmax"
        arrays[name] = decided
        dtypes[name] = "float32" if name == "logits" else "int32"
    fields = {"request_id": seg.request_id, "round": seg.round, "segment_id": seg.segment_id, "kind": str(seg.kind),
              "version": seg.version, "reset": seg.reset, "final": seg.final, "lane": seg.lane, "group": seg.group,
              "group_size": seg.group_size}  # fmt: skip
    return encode("segment", sender, fields, arrays, dtypes)


def to_segment(msg: Message) -> Segment:
    f, a = msg.fields, msg.arrays
    try:
        kind = SegmentKind(f["kind"])
    except ValueError:
        raise ProtocolError(f"segment message from rank {msg.sender}: field kind: unknown {_short(f['kind'])}") from None
    return Segment(
        request_id=f["request_id"], round=f["round"], segment_id=f["segment_id"], kind=kind,
        node_ids=a["node_ids"].astype(np.int64), tokens=a["tokens"].astype(np.int64),
        parent_ids=a["parent_ids"].astype(np.int64), positions=a["positions"].astype(np.int64),
        version=f["version"], reset=f["reset"], final=f["final"], lane=_lane(msg), group=f["group"],
        group_size=_group_size(msg),
    )  # type: ignore[arg-type]  # fmt: skip


def encode_prune(prune: Prune, sender: int = 0) -> list[bytes | memoryview]:
    fields = {"request_id": prune.request_id, "round": prune.round, "version": prune.version,
              "n_accepted": prune.n_accepted, "round_exit": prune.round_exit, "lane": prune.lane}  # fmt: skip
    return encode("prune", sender, fields, {"keep_ids": prune.keep_ids}, {"keep_ids": "int32"})


def to_prune(msg: Message) -> Prune:
    f = msg.fields
    keep = msg.arrays["keep_ids"].astype(np.int64)
    if not 1 <= f["n_accepted"] <= len(keep):  # type: ignore[operator]
        raise ProtocolError(f"prune message from rank {msg.sender}: field n_accepted: {f['n_accepted']} "
                            f"outside 1..{len(keep)} (the keep list)")  # fmt: skip
    return Prune(request_id=f["request_id"], round=f["round"], version=f["version"], keep_ids=keep,
                 n_accepted=f["n_accepted"], round_exit=f["round_exit"], lane=_lane(msg))  # type: ignore[arg-type]  # fmt: skip


def _group_size(msg: Message) -> int:
    """How many segments travel in this one's group: a stage waits for them all, so it is bounded."""
    size = msg.fields["group_size"]
    if not 1 <= size <= MAX_BATCH:  # type: ignore[operator]
        raise ProtocolError(f"{msg.type} message from rank {msg.sender}: field group_size: {size} outside 1..{MAX_BATCH}")
    return size  # type: ignore[return-value]


def _lane(msg: Message) -> int:
    """A segment's or prune's batch lane: each is a KV cache a stage holds, so their number is bounded."""
    lane = msg.fields["lane"]
    if not 0 <= lane < MAX_BATCH:  # type: ignore[operator]
        raise ProtocolError(f"{msg.type} message from rank {msg.sender}: field lane: {lane} outside 0..{MAX_BATCH - 1}")
    return lane  # type: ignore[return-value]
