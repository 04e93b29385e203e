"""How a live stage takes hostile or stray input: one bad frame per category, then raw TCP.

Starts a one-stage loopback cluster on a tiny random Llama (as `flowspec run` starts its stages),
sends each category's frames to the stage's inbox from a PUSH socket that claims to be a peer, and
checks a second later whether the stage process still runs; a dead stage is counted and a fresh
cluster started for the next category. Then 500 raw TCP connections that never speak ZeroMQ and a
ZMTP 1.0 greeting, after which one request must still complete. Prints one line per category and
the number of categories that killed the stage (issue 16: 32 of 34 before the stage rejected bad
frames).

Usage: PYTHONPATH=. python bench/hostile_stage.py [--tcp 500]
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from flowspec.config import Policy, scenario_from_dict
from flowspec.messages import Prune, Segment, SegmentKind
from flowspec.lookup import PromptLookupDrafter
from flowspec.workload import one_after_another
from runtime import wire
from runtime.launcher import Cluster, Target, stage_scenario
from runtime.models import save_tiny_llama

VOCAB = 97


def prefill(tokens: list[int], version: int = 0, **kw) -> Segment:
    n = len(tokens)
    return Segment(request_id=0, round=-1, segment_id=0, kind=SegmentKind.PREFILL, node_ids=np.full(n, -1),
                   tokens=np.array(tokens), parent_ids=np.full(n, -1), positions=np.arange(n), version=version,
                   reset=True, final=True, **kw)  # fmt: skip


def tree(parents: list[int], version: int = 0) -> Segment:
    n = len(parents)
    return Segment(request_id=0, round=0, segment_id=1, kind=SegmentKind.TREE, node_ids=np.arange(100, 100 + n),
                   tokens=np.ones(n, dtype=np.int64), parent_ids=np.array(parents), positions=np.arange(12, 12 + n),
                   version=version)  # fmt: skip


def header(frames: list, **changes) -> list[bytes]:
    h = json.loads(bytes(frames[0]))
    h.update(changes)
    return [json.dumps(h).encode(), *map(bytes, frames[1:])]


def categories() -> dict[str, list[list[bytes]]]:
    """Name -> the frames (one or more messages) that make up the attack."""
    good = wire.encode_segment(prefill([1, 2, 3]), 0)
    described = json.loads(bytes(good[0]))
    huge = dict(described, arrays=[dict(described["arrays"][0], shape=[2**31]), *described["arrays"][1:]])
    vast = dict(described, arrays=[dict(described["arrays"][0], shape=[2**70]), *described["arrays"][1:]])
    heartbeat = wire.encode("heartbeat", 0, {"clock_s": 1.0})
    return {
        "random bytes": [[np.random.default_rng(0).bytes(64)]],
        "empty frame": [[b""]],
        "non-UTF-8 header": [[b"\xff\xfe\xfd{"]],
        "truncated header": [[bytes(good[0])[:20]]],
        "header not an object": [[b"[1, 2]"]],
        "unknown message type": [header(good, type="gossip")],
        "wrong protocol version": [header(good, v=1)],
        "byte count disagrees with shape": [[bytes(good[0]), b"\0" * 5, *map(bytes, good[2:])]],
        "2^31-element shape": [[json.dumps(huge).encode(), *map(bytes, good[1:])]],
        "2^70-element shape": [[json.dumps(vast).encode(), *map(bytes, good[1:])]],
        "deeply nested JSON": [[b"[" * 100_000 + b"]" * 100_000]],
        "5000-digit integer": [[bytes(good[0]).replace(b'"segment_id":0', b'"segment_id":' + b"9" * 5000), *good[1:]]],
        "infinite clock": [[bytes(heartbeat[0]).replace(b"1.0", b"Infinity")]],
        "more data frames than arrays": [[*map(bytes, good), b"extra"]],
        "unknown segment kind": [header(good, fields=dict(described["fields"], kind="leaf"))],
        "segment from the wrong rank": [wire.encode_segment(prefill([1, 2]), 5)],
        "hidden states on the first hop": [wire.encode_segment(prefill([1, 2]), 0, np.zeros((2, 3), np.float32))],
        "token id beyond the vocabulary": [wire.encode_segment(prefill([1, 10**6]), 0)],
        "negative token id": [wire.encode_segment(prefill([1, -5]), 0)],
        "negative position": [wire.encode_segment(Segment(**{**_fields(prefill([1, 2])), "positions": np.array([-3, 0])}), 0)],
        "tree before any prompt": [wire.encode_segment(tree([-1, 100]), 0)],
        "parents not in the KV": [wire.encode_segment(prefill([1, 2]), 0), wire.encode_segment(tree([40, 41]), 0)],
        "duplicate node ids": [wire.encode_segment(prefill([1, 2]), 0),
                               wire.encode_segment(Segment(**{**_fields(tree([-1, -1])), "node_ids": np.array([7, 7])}), 0)],
        "negative segment version": [wire.encode_segment(prefill([1, 2]), 0), wire.encode_segment(tree([-1], version=-1), 0)],
        "prune out of order": [wire.encode_prune(Prune(0, 0, 7, np.array([1]), 1, False))],
        "prune of nodes not in the KV": [wire.encode_prune(Prune(0, 0, 1, np.array([55, 56]), 1, False))],
        "prune n_accepted beyond keep list": [wire.encode_prune(Prune(0, 0, 1, np.array([1]), 3, False))],
        "flush while segments are queued": [wire.encode_segment(prefill([1]), 0),
                                            wire.encode("flush", 0, {"clock_s": 1.0})],
        "hello to a stage": [wire.encode("hello", 0, {"address": "x", "first_layer": 0, "n_layers": 1})],
        "report to a stage": [wire.encode("report", 0, {"spans": [], "computes": [], "transfers": [], "arrivals": []})],
        "ready to a stage": [wire.encode("ready", 0, {})],
        "peers after start": [wire.encode("peers", 0, {"next": "tcp://127.0.0.1:1", "clock_s": 1.0})],
        "error from a stranger": [wire.encode("error", 9, {"message": "boo"})],
        "argmax array to a stage": [wire.encode_segment(prefill([1, 2]), 0, decided=np.array([1, 2]))],
    }  # fmt: skip


def _fields(seg: Segment) -> dict:
    return {name: getattr(seg, name) for name in Segment.__dataclass_fields__}


def start(folder: Path) -> tuple[Cluster, Target]:
    sc = scenario_from_dict({
        "decoding": {"max_new_tokens": 8},
        "runtime": {"model": str(folder), "stop_at_eos": False, "timeout_s": 30},
    })  # fmt: skip
    target = Target.load(sc)
    cluster = Cluster(stage_scenario(target.scenario, Policy.SINGLE_SD), target).__enter__()
    return cluster, target


def alive_after(cluster: Cluster, wait_s: float) -> bool:
    time.sleep(wait_s)
    return cluster.procs[1].poll() is None


def one_request(cluster: Cluster, target: Target) -> list[int]:
    while cluster.endpoint.recv(0.5) is not None:  # what the stage returned for accepted forged chunks
        pass
    prompt = [5, 6, 7, 8, 9, 10]
    sc = stage_scenario(target.scenario, Policy.SINGLE_SD)
    result = cluster.serve(sc, PromptLookupDrafter(VOCAB), one_after_another([prompt]))
    return result.outputs[0]


def report_tcp(cluster: Cluster, target: Target, what: str) -> None:
    if not alive_after(cluster, 1.0):
        print(f"{what}: stage DEAD", flush=True)
        return
    t = time.monotonic()
    try:
        out = one_request(cluster, target)
        print(f"{what}: stage alive, a request afterwards: {len(out)} tokens in {time.monotonic() - t:.1f} s", flush=True)
    except Exception as e:  # what is measured here is whether it fails
        print(f"{what}: stage alive, a request afterwards FAILED: {type(e).__name__}: {str(e)[:200]!r}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tcp", type=int, default=500, help="raw TCP connections to open")
    p.add_argument("--tcp-only", action="store_true", help="skip the frame categories")
    p.add_argument("--stage-nofile", type=int, help="the stage's soft open-file limit (a board's ulimit -n)")
    p.add_argument("--stage-hard-nofile", type=int, help="set the running stage's soft and hard limits (prlimit)")
    args = p.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="hostile-"))
    save_tiny_llama(folder, vocab_size=VOCAB)
    ctx = zmq.Context()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if args.stage_nofile:  # the children inherit it; this process then takes its hard limit back
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.stage_nofile, hard))
    cluster, target = start(folder)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.stage_hard_nofile:  # a board that allows no more: the stage cannot raise its own limit
        n = args.stage_hard_nofile
        resource.prlimit(cluster.procs[1].pid, resource.RLIMIT_NOFILE, (n, n))
    killed = []
    try:
        for name, messages in ({} if args.tcp_only else categories()).items():
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(cluster.node.addresses[1])
            for frames in messages:
                push.send_multipart(frames)
            ok = alive_after(cluster, 1.0)
            push.close()
            print(f"{'survived' if ok else 'KILLED  '}  {name}", flush=True)
            if not ok:
                killed.append(name)
                cluster.close()
                cluster, target = start(folder)
        if not args.tcp_only:
            print(f"{len(killed)} of {len(categories())} categories killed the stage", flush=True)
        port = int(cluster.node.addresses[1].rsplit(":", 1)[1])
        t = time.monotonic()
        socks, refused = [], 0
        for _ in range(args.tcp):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:  # the stage's listen backlog is full: it no longer accepts
                refused += 1
        report_tcp(cluster, target, f"{args.tcp} raw TCP connections, {refused} not accepted "
                                    f"({time.monotonic() - t:.1f} s)")  # fmt: skip
        try:
            greet = socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError as e:
            print(f"then a ZMTP 1.0 greeting: cannot connect ({e})", flush=True)
            return 0
        greet.sendall(bytes([1, 0]))  # ZMTP 1.0: a one-byte length (1), flags 0: an anonymous identity
        greet.sendall(bytes([6, 0]) + b"hello")  # then one 5-byte message
        report_tcp(cluster, target, "then a ZMTP 1.0 greeting")
        rejected = getattr(cluster.node, "rejected", {}).get(1)
        print(f"the stage reported {rejected} rejected frame(s) in the last run", flush=True)
        for s in (*socks, greet):
            s.close()
    finally:
        cluster.close()
        ctx.destroy(linger=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
