"""A stage that survives its network (issue 16): malformed, stray or hostile frames are rejected,
counted and dropped while the stage keeps serving; raw TCP does not stop it; a segment that can
never run ends the run within the deadline, named.

Each test starts one stage process as `flowspec run` does (a one-stage loopback cluster on the tiny
random Llama) and attacks its inbox from a PUSH socket of its own that claims to be a peer. The
test plays D0 where the protocol needs it: the cluster's D0 endpoint heartbeats, and a prompt
chunk the stage accepts comes back to it.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import zmq

from flowspec.config import Policy, scenario_from_dict
from flowspec.lookup import PromptLookupDrafter
from flowspec.messages import ProtocolError, Prune, Segment, SegmentKind
from flowspec.workload import one_after_another
from runtime import wire
from runtime.channel import RemoteError
from runtime.launcher import Cluster, Target, stage_scenario

pytestmark = pytest.mark.runtime

SEED = 16
N_FRAMES = 10_000
HIDDEN = 64  # the tiny model's
PROMPT = 12  # tokens of the prompt the stage holds while it is attacked
N_STATE_CATEGORIES = 23
MUTATIONS = ("flip", "truncate", "frames", "noise", "field", "shape", "nest", "bloat", "digits", "utf8", "nan")
JUNK = [None, -1, 0, 1.5, True, "x", [], {}, [1, [2]], 2**31, 2**70, -(2**80), "segment", float("nan")]


@contextmanager
def one_stage(tiny, timeout_s: float) -> Iterator[tuple[Cluster, Target, zmq.Socket]]:
    """A one-stage cluster and an attacker's PUSH socket connected to the stage's inbox; both end here."""
    sc = scenario_from_dict({
        "decoding": {"max_new_tokens": tiny.n_new},
        "runtime": {"model": str(tiny.folder), "stop_at_eos": False, "timeout_s": timeout_s},
    })  # fmt: skip
    target = Target.load(sc)
    ctx = zmq.Context()
    try:
        with Cluster(stage_scenario(target.scenario, Policy.SINGLE_SD), target) as cluster:
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(cluster.node.addresses[1])
            yield cluster, target, push
    finally:
        ctx.destroy(linger=0)


def assert_lossless(cluster: Cluster, target: Target, tiny) -> None:
    """A well-formed run on the same stage still equals the target's greedy output."""
    sc = stage_scenario(target.scenario, Policy.SINGLE_SD)
    result = cluster.serve(sc, PromptLookupDrafter(tiny.vocab), one_after_another(tiny.prompts))
    assert [result.outputs[i] for i in range(len(tiny.prompts))] == tiny.outputs


def await_d0(cluster: Cluster, kind: str, timeout_s: float = 30.0) -> wire.Message:
    """The next `kind` message at D0's inbox (the stage's heartbeats pass by)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = cluster.endpoint.recv(0.2)
        if msg is not None and msg.type == kind:
            return msg
        cluster.check()
    pytest.fail(f"no {kind} message reached D0 within {timeout_s:g} s")


def segment(kind: SegmentKind, node_ids, tokens, parent_ids, positions, *, version: int = 0,
            reset: bool = False) -> Segment:  # fmt: skip
    return Segment(request_id=0, round=-1 if kind is SegmentKind.PREFILL else 0, segment_id=0, kind=kind,
                   node_ids=np.asarray(node_ids), tokens=np.asarray(tokens), parent_ids=np.asarray(parent_ids),
                   positions=np.asarray(positions), version=version, reset=reset, final=True)  # fmt: skip


def prompt_chunk(n: int = PROMPT, start: int = 0, reset: bool = True, **kw) -> Segment:
    return segment(SegmentKind.PREFILL, [-1] * n, [(3 * i) % 97 for i in range(n)], [-1] * n, range(start, start + n),
                   reset=reset, **kw)  # fmt: skip


def tree(node_ids, parent_ids, tokens=None, positions=None, **kw) -> Segment:
    n = len(node_ids)
    return segment(SegmentKind.TREE, node_ids, tokens if tokens is not None else [5] * n, parent_ids,
                   positions if positions is not None else [PROMPT] * n, **kw)  # fmt: skip


# ---- frames that decode but contradict a stage holding a 12-token prompt, v0, nothing else ----------


def state_frame(rng: np.random.Generator) -> tuple[str, list[bytes]]:
    """(category, frames) of one random frame that `wire.decode` accepts and the stage must reject:
    wrong senders and types, out-of-vocabulary ids, hidden states where none belong, trees the KV
    cannot hold, prompt chunks that do not continue the prompt, prunes out of order or of unknown
    nodes. Ids stay within int32, which is what they travel as."""
    n = int(rng.integers(1, 6))
    ids = rng.choice(np.arange(1000, 9000), n, replace=False)
    chain = np.concatenate([[-1], ids[:-1]])  # a valid path: each node's parent is the row before
    other = int(rng.integers(1, 10))  # any rank but D0, which stage 1 takes segments and control from
    h = rng.standard_normal((n, HIDDEN)).astype(np.float32)
    cases: list[tuple[str, Callable[[], list]]] = [
        ("segment from a rank other than D0", lambda: wire.encode_segment(tree(ids, chain), other)),
        ("token id beyond the vocabulary", lambda: wire.encode_segment(
            tree(ids, chain, tokens=rng.integers(97, 2**31 - 1, n)), 0)),
        ("negative token id", lambda: wire.encode_segment(tree(ids, chain, tokens=-rng.integers(1, 2**31, n)), 0)),
        ("negative position", lambda: wire.encode_segment(tree(ids, chain, positions=-rng.integers(1, 99, n)), 0)),
        ("hidden states on the first hop", lambda: wire.encode_segment(tree(ids, chain), 0, h)),
        ("hidden states of another width", lambda: wire.encode_segment(tree(ids, chain), 0, h[:, :7])),
        ("decisions sent to a stage", lambda: wire.encode_segment(tree(ids, chain), 0, decided=np.zeros(n, np.int64))),
        ("parent not in the KV", lambda: wire.encode_segment(tree(ids, [int(rng.integers(10, 999))] + list(chain[1:])), 0)),
        ("parent is a later row (a cycle)", lambda: wire.encode_segment(tree([7, 8], [8, 7]), 0)),
        ("duplicate node ids", lambda: wire.encode_segment(tree([ids[0], ids[0]], [-1, -1]), 0)),
        ("negative node id", lambda: wire.encode_segment(tree([-int(rng.integers(2, 99))], [-1]), 0)),
        ("segment from before the request", lambda: wire.encode_segment(tree(ids, chain, version=-int(rng.integers(1, 9))), 0)),
        ("prompt chunk that does not follow the prompt", lambda: wire.encode_segment(
            prompt_chunk(n, start=int(rng.choice([0, 5, 13, 40])), reset=False), 0)),
        ("first prompt chunk at the wrong version", lambda: wire.encode_segment(prompt_chunk(n, version=-1), 0)),
        ("first chunk that is a tree", lambda: wire.encode_segment(tree(ids, chain, reset=True), 0)),
        ("prune out of order", lambda: wire.encode_prune(
            Prune(0, 0, int(rng.choice([0, 2, 3, 9, 2**40])), ids, 1, False))),
        ("prune of nodes the stage does not hold", lambda: wire.encode_prune(Prune(0, 0, 1, ids, n, False))),
        ("control message from a stage", lambda: wire.encode("stop", other, {}) if rng.random() < 0.3 else
            wire.encode(str(rng.choice(["flush", "heartbeat"])), other, {"clock_s": 1.0})),
        ("error from a stranger", lambda: wire.encode("error", other, {"message": "boo"})),
        ("a message only D0 receives", lambda: wire.encode("report", 1, {"spans": [], "computes": [], "transfers": [],
                                                                         "arrivals": [], "rejected": 0})),
        ("hello to a stage", lambda: wire.encode("hello", 2, {"address": "tcp://x:1", "first_layer": 0, "n_layers": 1})),
        ("ready to a stage", lambda: wire.encode("ready", 0, {})),
        ("peers after the start", lambda: wire.encode("peers", 0, {"next": "tcp://127.0.0.1:9", "clock_s": 1.0})),
    ]  # fmt: skip
    assert len(cases) == N_STATE_CATEGORIES
    name, make = cases[int(rng.integers(len(cases)))]
    frames = [bytes(f) for f in make()]
    wire.decode(frames)  # precondition: it is the stage's state that must say no
    return name, frames


# ---- frames that fail `wire.decode` --------------------------------------------------------------


def valid_frames() -> list[list[bytes]]:
    """Real well-formed messages of every type, the material mutations start from."""
    msgs = [
        wire.encode_segment(prompt_chunk(), 0),
        wire.encode_segment(tree([1000, 1001], [-1, 1000]), 0, np.zeros((2, HIDDEN), np.float32)),
        wire.encode_segment(tree([1000], [-1]), 2, np.zeros((1, HIDDEN), np.uint16), "bfloat16",
                            decided=np.zeros((1, 97), np.float32)),
        wire.encode_prune(Prune(0, 0, 1, np.array([1000, 1001, 1002]), 2, False)),
        wire.encode("heartbeat", 0, {"clock_s": 12.5}),
        wire.encode("flush", 0, {"clock_s": 12.5}),
        wire.encode("stop", 0, {}),
        wire.encode("error", 0, {"message": "a traceback"}),
        wire.encode("report", 1, {"spans": [[0, 1, "tree", 4, 12, 1.0, 2.0]], "computes": [], "transfers": [],
                                  "arrivals": [], "rejected": 0}),
        wire.encode("hello", 1, {"address": "tcp://127.0.0.1:5555", "first_layer": 0, "n_layers": 2}),
        wire.encode("peers", 0, {"next": "tcp://127.0.0.1:5556", "clock_s": 1.0}),
    ]  # fmt: skip
    return [[bytes(f) for f in m] for m in msgs]


def _set(header: dict, rng: np.random.Generator, value: object) -> None:
    """Set one random place of a header (top level, a field, an array's description) to `value`."""
    places: list[tuple[object, object]] = [(header, k) for k in ("v", "type", "sender", "fields", "arrays")]
    places += [(header["fields"], k) for k in header["fields"]] + [(header["fields"], "extra")]
    for spec in header["arrays"]:
        places += [(spec, k) for k in ("name", "dtype", "shape")]
        places += [(spec["shape"], i) for i in range(len(spec["shape"]))]
    where, key = places[int(rng.integers(len(places)))]
    where[key] = value  # type: ignore[index]


def mutate(frames: list[bytes], rng: np.random.Generator) -> tuple[str, list[bytes]]:
    """(mutation, frames): one random mutation of a well-formed message."""
    op = str(rng.choice(MUTATIONS))
    out = list(frames)
    i = int(rng.integers(len(out)))
    if op == "flip":  # a few bytes of one frame
        b = bytearray(out[i])
        if b:
            at = rng.integers(0, len(b), int(rng.integers(1, 9)))
            for j in at:
                b[j] ^= int(rng.integers(1, 256))
        out[i] = bytes(b)
    elif op == "truncate":
        out[i] = out[i][: int(rng.integers(0, max(1, len(out[i]))))]
    elif op == "frames":  # a data frame missing, or one too many
        out = out[:-1] if len(out) > 1 and rng.random() < 0.5 else [*out, rng.bytes(int(rng.integers(0, 64)))]
    elif op == "noise":  # nothing but random bytes
        out = [rng.bytes(int(rng.integers(0, 256))) for _ in range(int(rng.integers(1, 4)))]
    else:
        header = json.loads(out[0])
        if op == "field":
            _set(header, rng, JUNK[int(rng.integers(len(JUNK)))])
        elif op == "shape":  # a declared shape that disagrees with the bytes, or is vast
            value = [int(rng.choice([2**31, 2**62, 2**70, 3, 0])), int(rng.integers(0, 2**20))]
            _set(header, rng, value[: int(rng.integers(1, 3))])
        elif op == "nest":
            depth = int(rng.choice([9, 50, 3000, 100_000]))
            text = json.dumps(header)
            out[0] = ("[" * depth + text + "]" * depth).encode()
            return op, out
        elif op == "bloat":  # a header beyond the bound
            header["fields"]["pad"] = "x" * int(rng.integers(wire.MAX_HEADER_NBYTES, 2 * wire.MAX_HEADER_NBYTES))
        elif op == "digits":  # an integer json.loads refuses (> 4300 digits) or one beyond 64 bits
            _set(header, rng, 0)
            text = json.dumps(header).replace(": 0", ": " + "9" * int(rng.choice([25, 5000])), 1)
            out[0] = text.encode()
            return op, out
        elif op == "utf8":
            text = json.dumps(header).encode()
            at = int(rng.integers(len(text)))
            out[0] = text[:at] + b"\xff\xfe" + text[at:]
            return op, out
        elif op == "nan":
            _set(header, rng, float(rng.choice([np.nan, np.inf, -np.inf])))
        out[0] = json.dumps(header).encode()
    return op, out


def fails_decode(frames: list[bytes]) -> bool:
    try:
        wire.decode(frames)
    except ProtocolError:
        return True
    return False


def test_malformed_and_contradicting_frames_are_rejected_and_the_stage_keeps_serving(tiny) -> None:
    """≥ 10,000 random and mutated frames of every category (decode failures and frames that
    contradict the stage's state) reach a live stage: it stays up, counts exactly those frames as
    rejected in its report, logs why, and afterwards a request still decodes losslessly."""
    rng = np.random.default_rng(SEED)
    base = valid_frames()
    with one_stage(tiny, timeout_s=60) as (cluster, target, push):
        stage = cluster.procs[1]
        push.send_multipart([bytes(f) for f in wire.encode_segment(prompt_chunk(), 0)])  # accepted: the prompt to hold
        await_d0(cluster, "segment")
        sent, by_category = 0, {}
        t_heartbeat = time.monotonic()
        while sent < N_FRAMES:
            if rng.random() < 0.3:
                name, frames = state_frame(rng)
            else:
                name, frames = mutate(base[int(rng.integers(len(base)))], rng)
                if not fails_decode(frames):
                    continue  # a mutation that still decodes: whether it fits the state is not known here
            push.send_multipart(frames)
            sent += 1
            by_category[name] = by_category.get(name, 0) + 1
            if time.monotonic() - t_heartbeat > 1.0:  # D0 is alive (the forged frames claiming rank 0 do not count)
                cluster.endpoint.send(1, wire.encode("heartbeat", 0, {"clock_s": time.monotonic()}))
                t_heartbeat = time.monotonic()
        assert len(by_category) == N_STATE_CATEGORIES + len(MUTATIONS), sorted(by_category)  # every category
        # behind every frame on this pipe: a chunk that is accepted, then D0's flush (both handled)
        push.send_multipart([bytes(f) for f in wire.encode_segment(prompt_chunk(3, start=PROMPT, reset=False), 0)])
        await_d0(cluster, "segment", timeout_s=120)
        push.send_multipart([bytes(f) for f in wire.encode("flush", 0, {"clock_s": time.monotonic()})])
        report = await_d0(cluster, "report")
        while cluster.endpoint.recv(0.2) is not None:  # the stage's heartbeats: D0's inbox starts clean
            pass
        assert stage.poll() is None, "the stage died"
        assert report.fields["rejected"] == sent
        log = cluster.logs[1].read_text()
        assert "rejected frame #1: " in log and f"rejected frame #{N_FRAMES}: " in log and "Traceback" not in log
        assert_lossless(cluster, target, tiny)
        assert cluster.node.rejected == {1: 0}
        assert stage.poll() is None


def test_raw_tcp_connections_and_a_zmtp1_greeting_leave_the_stage_serving(tiny) -> None:
    """500 TCP connections that never speak ZeroMQ (a port scanner), then a peer greeting in ZMTP
    1.0 and sending one message: the stage rejects the message and still serves a request."""
    with one_stage(tiny, timeout_s=30) as (cluster, target, push):
        port = int(cluster.node.addresses[1].rsplit(":", 1)[1])
        conns = []
        try:
            for _ in range(500):
                conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            greeting = socket.create_connection(("127.0.0.1", port), timeout=5)
            conns.append(greeting)
            greeting.sendall(bytes([1, 0]))  # ZMTP 1.0: an empty identity (length 1, flags 0)
            greeting.sendall(bytes([6, 0]) + b"hello")  # one 5-byte message
            time.sleep(1.0)
            assert cluster.procs[1].poll() is None, "the stage died"
            assert_lossless(cluster, target, tiny)
        finally:
            for conn in conns:
                conn.close()
        assert cluster.node.rejected == {1: 1}  # the ZMTP 1.0 peer's message
        assert "header is not JSON" in cluster.logs[1].read_text()


def test_a_segment_waiting_for_a_prune_that_never_comes_ends_the_run_named(tiny) -> None:
    """A prompt chunk claiming prune v5, which D0 never sent, heads the stage's queue: instead of a
    wedge that heartbeats forever, the run ends within the deadline with an error that names the
    stage, the segment and the prune it waited for."""
    timeout_s = 2.0
    with one_stage(tiny, timeout_s=timeout_s) as (cluster, target, push):
        push.send_multipart([bytes(f) for f in wire.encode_segment(prompt_chunk(version=5), 0)])
        t = time.monotonic()
        with pytest.raises(RemoteError) as err:
            assert_lossless(cluster, target, tiny)
        elapsed = time.monotonic() - t
        text = str(err.value)
        assert "stage 1" in text and "segment 0 of request 0 waited" in text and "for prune v5" in text, text
        assert elapsed < 2 * timeout_s + 2.0, f"took {elapsed:.1f} s"
        assert cluster.procs[1].wait(timeout=10) == 1
