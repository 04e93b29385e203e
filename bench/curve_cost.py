"""What `runtime.security: curve` costs: tokens/s on loopback with and without it, side by side.

Builds a tiny random Llama (the tests' shapes: 5 layers, hidden 64), makes keys, and starts two
3-stage loopback clusters at once, one plain and one with CURVE; then serves the same requests on
each in turn, alternating, so both see the same machine load. Prints every run's tokens/s, the
medians and their ratio (and the ratio of each back-to-back pair). The tiny model's messages are
small, so this is CURVE's per-message cost; the round trips of 1 kB and 100 kB messages between two
Endpoints, and `--mbytes` (one-way throughput of messages of that size), are its cost per message
and per byte without a model in the way.

Usage: PYTHONPATH=. python bench/curve_cost.py [--repeats 7] [--requests 6] [--tokens 48] [--mbytes 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from flowspec.config import Policy, scenario_from_dict
from flowspec.lookup import PromptLookupDrafter
from flowspec.workload import one_after_another
from runtime import wire
from runtime.channel import Endpoint
from runtime.launcher import Cluster, Target, stage_scenario
from runtime.models import save_tiny_llama
from runtime.security import Keyring, make_keys

VOCAB = 97


def scenario(model: Path, keys: Path | None, n_new: int):
    rt = {"model": str(model), "stop_at_eos": False, "timeout_s": 300}  # the idle cluster hears no heartbeat from D0
    if keys is not None:
        rt |= {"security": "curve", "keys": str(keys)}
    return scenario_from_dict({"pipeline": {"n_stages": 3}, "decoding": {"max_new_tokens": n_new}, "runtime": rt})


def throughput_mb_s(keyring: tuple[Keyring, Keyring] | None, nbytes: int, n: int) -> float:
    """MB/s of `n` one-way messages of `nbytes` from one Endpoint to another on loopback."""
    a = Endpoint(1, keyring=None if keyring is None else keyring[0])
    b = Endpoint(0, keyring=None if keyring is None else keyring[1])
    try:
        b.connect(1, a.address)
        payload = np.zeros(nbytes // 4, np.float32)
        frames = [wire.encode("heartbeat", 0, {"clock_s": 0.0})[0], payload.tobytes()]
        b.send(1, frames)  # the handshake, outside the clock
        a.inbox.recv_multipart()
        t = time.perf_counter()
        for _ in range(n):
            b.send(1, frames)
        for _ in range(n):
            a.inbox.recv_multipart(copy=False)
        return n * nbytes / (time.perf_counter() - t) / 1e6
    finally:
        b.close()
        a.close()


def round_trip_us(keyring: tuple[Keyring, Keyring] | None, nbytes: int, n: int) -> float:
    """Median microseconds of a message of `nbytes` there and back between two Endpoints on loopback:
    two hops, what a token pays per pair of pipeline links."""
    a = Endpoint(1, keyring=None if keyring is None else keyring[0])
    b = Endpoint(0, keyring=None if keyring is None else keyring[1])
    try:
        b.connect(1, a.address)
        a.connect(0, b.address)
        frames = [wire.encode("heartbeat", 0, {"clock_s": 0.0})[0], bytes(nbytes)]
        times = []
        for i in range(n + 10):  # the first ten carry the handshakes
            t = time.perf_counter()
            b.send(1, frames)
            a.inbox.recv_multipart(copy=False)
            a.send(0, frames)
            b.inbox.recv_multipart(copy=False)
            if i >= 10:
                times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e6
    finally:
        b.close()
        a.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--mbytes", type=float, default=1.0, help="message size of the throughput test (0: skip)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, keys = Path(tmp) / "model", Path(tmp) / "keys"
        save_tiny_llama(model, vocab_size=VOCAB, max_positions=512)
        make_keys(keys, 3)
        prompts = [np.random.default_rng(i).integers(0, VOCAB, 12).tolist() for i in range(args.requests)]
        requests = one_after_another(prompts)
        plain_t = Target.load(scenario(model, None, args.tokens))
        curve_t = Target.load(scenario(model, keys, args.tokens))
        rates: dict[str, list[float]] = {"plain": [], "curve": []}
        outputs: dict[str, dict] = {}
        with Cluster(stage_scenario(plain_t.scenario, Policy.FLOWSPEC), plain_t) as plain, \
                Cluster(stage_scenario(curve_t.scenario, Policy.FLOWSPEC), curve_t) as curve:  # fmt: skip
            for i in range(args.repeats + 1):  # the first of each warms up
                for name, cluster, target in (("plain", plain, plain_t), ("curve", curve, curve_t)):
                    result = cluster.serve(stage_scenario(target.scenario, Policy.FLOWSPEC), PromptLookupDrafter(VOCAB),
                                           requests)  # fmt: skip
                    n = sum(len(v) for v in result.outputs.values())
                    outputs[name] = result.outputs
                    if i:
                        rates[name].append(n / result.elapsed_s)
                        print(f"run {i} {name}: {n} tokens in {result.elapsed_s:.2f} s = {n / result.elapsed_s:.1f} tok/s")
        med = {k: statistics.median(v) for k, v in rates.items()}
        paired = sorted(c / p for p, c in zip(rates["plain"], rates["curve"]))  # each pair ran back to back
        print(f"median tokens/s: plain {med['plain']:.1f}, curve {med['curve']:.1f}; curve/plain of the medians "
              f"{med['curve'] / med['plain']:.3f}, of each pair: median {statistics.median(paired):.3f} "
              f"(range {paired[0]:.3f}-{paired[-1]:.3f}); same tokens: {outputs['plain'] == outputs['curve']}")
        pair = (Keyring.load(keys, 1, 3), Keyring.load(keys, 0, 3))
        for nbytes in (1000, 100_000):
            rtt = {name: round_trip_us(ring, nbytes, 2000) for name, ring in (("plain", None), ("curve", pair))}
            print(f"round trip of {nbytes} bytes: plain {rtt['plain']:.0f} us, curve {rtt['curve']:.0f} us (median of 2000)")
        if args.mbytes:
            nbytes = int(args.mbytes * 1e6)
            for name, ring in (("plain", None), ("curve", pair)):
                rate = statistics.median(throughput_mb_s(ring, nbytes, 50) for _ in range(3))
                print(f"{args.mbytes:g} MB messages, {name}: {rate:.0f} MB/s")


if __name__ == "__main__":
    main()
