"""The link profiler behind `flowspec profile link`: one-way time and throughput by message size.

Theory of operation
-------------------
Two processes, usually on two hosts. The **listener** (`serve`) binds one ZeroMQ ROUTER socket and
answers whoever connects: `hello` with its own provenance, `echo` with the same frames back, `sink`
with nothing (it counts them), `sync` with how many sinks arrived since the last sync. The **peer**
(`measure`) connects a DEALER socket and goes over the grid of sizes `PASSES` times, smallest
first, so that a burst of load from elsewhere on a shared machine spreads over all sizes instead
of bending a few. At each size in each pass it

1. warms up (a few untimed echoes), then times echoes: one-way = RTT / 2, since the echo carries
   the same bytes both ways. Median, p10 and p90 over every pass go into the profile.
2. streams K messages back to back, then a `sync`. The listener sees the sync only after every
   sink before it (one connection is FIFO), so the stream took (reply time - start - one sync RTT)
   and throughput = K * size / that. The median over the passes goes into the profile.

A message is a multipart frame `[kind, payload]`: like the runtime's `[header, arrays...]`, the
per-message cost of a second frame is in the measurement, and `nbytes` is the payload, as the
simulator counts it. Payloads are random bytes, so a compressing tunnel cannot flatter the link.

The time budget is shared among the (pass, size) slots still to measure, half echoes and half
the stream; every slot gets at least `MIN_ECHOES` echoes and `MIN_STREAM` streamed messages even
if that overruns it (the card records the elapsed time). Every receive waits through a poller with a timeout, and
sends time out too: a listener that vanished is an error that names its address, not a hang.

Rules: the profile written here follows profiles/README.md ("Link profile") to the letter;
`flowspec.links.LinkProfile.load` is its validator, and its column names are the ones written here
(the tests load what this writes).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import zmq
from tqdm import tqdm

from flowspec.links import TRANSFER_COLUMNS
from runtime.provenance import cpu_model, git_revision

log = logging.getLogger("flowspec.runtime")

PROTOCOL = 1
# 16 B (a prune, one token id row) to 4 MiB (128 rows of 4096 fp32 hidden states is 2 MiB).
DEFAULT_SIZES = tuple(2**k for k in range(4, 23))
WARMUP_S = 0.5  # untimed empty echoes before the first size
WARMUP_ECHOES = 5  # untimed, before each size in each pass: buffers grown, pages touched
PASSES = 3
MIN_ECHOES, MAX_ECHOES = 2, 400  # per size and pass
MIN_STREAM, MAX_STREAM = 4, 4096  # messages per stream, one stream per size and pass
_UNITS = {"": 1, "K": 1024, "M": 1024**2}


class LinkProfileError(RuntimeError):
    """The listener is unreachable or answered outside the protocol; the text names its address."""


@dataclass(frozen=True, slots=True)
class SizePoint:
    """One row of transfer.csv: what one message size costs on the link."""

    nbytes: int
    one_way_ms_median: float
    one_way_ms_p10: float
    one_way_ms_p90: float
    n_echoes: int
    throughput_mbps: float
    n_streamed: int


@dataclass(frozen=True, slots=True)
class LinkMeasurement:
    address: str
    points: tuple[SizePoint, ...]
    listener: dict  # the listener's `host_info()`, sent in its hello
    peer: dict  # this host's
    sync_rtt_ms: float  # the round trip of an empty message, subtracted from every stream
    elapsed_s: float


def parse_address(text: str, *, default_host: str | None) -> tuple[str, int]:
    """`HOST:PORT` or, when `default_host` is given, just `PORT`: (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host = default_host or ""
    if not host or not port.isdigit() or int(port) > 65535:
        form = "[HOST:]PORT" if default_host else "HOST:PORT"
        raise ValueError(f"address must look like {form} with PORT in 0..65535, got {text!r}")
    return host.strip("[]"), int(port)


def parse_sizes(text: str) -> tuple[int, ...]:
    """Message sizes from `64,4K,1M` (K = KiB, M = MiB), ascending and distinct.

    >>> parse_sizes("64, 4K,1M")
    (64, 4096, 1048576)
    """
    sizes = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([KM]?)i?B?\s*", item, flags=re.IGNORECASE)
        if not m or int(m[1]) < 1:
            raise ValueError(f"sizes must be positive byte counts such as 64, 4K or 1M, got {item.strip()!r}")
        sizes.append(int(m[1]) * _UNITS[m[2].upper()])
    if sizes != sorted(set(sizes)):
        raise ValueError(f"sizes must be ascending and distinct, got {text!r}")
    return tuple(sizes)


def endpoint(host: str, port: int | str) -> str:
    """The ZeroMQ address of host:port (IPv6 hosts in brackets)."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def host_info(command: str) -> dict:
    """Who measured: the provenance each side contributes to the card."""
    sha, dirty = git_revision()
    return {"hostname": socket.gethostname(), "cpu_model": cpu_model(), "os": platform.platform(),
            "python_version": platform.python_version(), "pyzmq_version": zmq.__version__,
            "libzmq_version": zmq.zmq_version(), "git_sha": sha, "git_dirty": dirty, "command": command}  # fmt: skip


# ---- the listener -------------------------------------------------------------------------------


def serve(host: str, port: int, *, duration_s: float | None, command: str,
          on_ready: Callable[[str], None] = lambda address: None) -> int:  # fmt: skip
    """Answer peers at tcp://host:port until Ctrl-C, SIGTERM or `duration_s`; messages served.

    `on_ready` gets the bound address (with the real port when `port` is 0) once peers can connect.
    A malformed message is logged and dropped: it never ends the listener.
    """
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, ":" in host)
    try:
        try:
            if port:
                sock.bind(endpoint(host, port))
            else:
                port = sock.bind_to_random_port(endpoint(host, "*").rpartition(":")[0])
        except zmq.ZMQError as e:
            raise LinkProfileError(f"cannot listen on {endpoint(host, port or '*')}: {e}") from None
        hello = json.dumps({"protocol": PROTOCOL, **host_info(command)}).encode()
        on_ready(endpoint(host, port))
        deadline = None if duration_s is None else time.monotonic() + duration_s
        sinks: dict[bytes, int] = {}
        served = 0
        try:
            while deadline is None or time.monotonic() < deadline:
                if not sock.poll(100):
                    continue
                frames = sock.recv_multipart(copy=False)
                served += 1
                kind = frames[1].bytes if len(frames) >= 2 else b""
                peer = frames[0].bytes
                if kind == b"echo":
                    sock.send_multipart([frames[0], b"echo", *frames[2:]], copy=False)
                elif kind == b"sink":
                    sinks[peer] = sinks.get(peer, 0) + 1
                elif kind == b"sync":
                    sock.send_multipart([frames[0], b"sync", str(sinks.pop(peer, 0)).encode()])
                elif kind == b"hello":
                    sock.send_multipart([frames[0], b"hello", hello])
                else:
                    log.warning("link listener: dropped a message of kind %r (%d frames)", kind[:32], len(frames))
        except KeyboardInterrupt:
            pass
        return served
    finally:
        sock.close(linger=0)
        context.term()


# ---- the peer -----------------------------------------------------------------------------------


class _Peer:
    """A DEALER connected to the listener; every receive and send is bounded by `timeout_s`."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self.address, self.timeout_ms = address, int(timeout_s * 1000)
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        self.sock.setsockopt(zmq.IPV6, address.startswith("tcp://["))
        self.sock.connect(address)

    def send(self, frames: Sequence[bytes]) -> None:
        try:
            self.sock.send_multipart(frames, copy=False)
        except zmq.Again:
            raise LinkProfileError(f"{self.address}: the listener took no message for "
                                   f"{self.timeout_ms / 1000:g} s (stopped?)") from None  # fmt: skip

    def recv(self, kind: bytes) -> list[zmq.Frame]:
        if not self.sock.poll(self.timeout_ms):
            raise LinkProfileError(f"{self.address}: no answer within {self.timeout_ms / 1000:g} s; is "
                                   f"`flowspec profile link --listen` running there?")  # fmt: skip
        frames = self.sock.recv_multipart(copy=False)
        if frames[0].bytes != kind:
            raise LinkProfileError(f"{self.address}: expected a {kind.decode()} reply, got {frames[0].bytes[:32]!r}")
        return frames

    def echo_s(self, payload: bytes) -> float:
        t0 = time.perf_counter()
        self.send([b"echo", payload])
        frames = self.recv(b"echo")
        t1 = time.perf_counter()
        if len(frames) != 2 or len(frames[1]) != len(payload):
            raise LinkProfileError(f"{self.address}: echo of {len(payload)} B came back as {[len(f) for f in frames]}")
        return t1 - t0

    def stream_s(self, payload: bytes, n_messages: int, sync_rtt_s: float) -> float:
        """Seconds the link took to carry `n_messages` copies of `payload` back to back."""
        t0 = time.perf_counter()
        for _ in range(n_messages):
            self.send([b"sink", payload])
        self.send([b"sync"])
        count = int(self.recv(b"sync")[1].bytes)
        elapsed = time.perf_counter() - t0
        if count != n_messages:
            raise LinkProfileError(f"{self.address}: streamed {n_messages} messages, the listener counted {count}")
        # The sync's own round trip is not stream time; the floor keeps noise from inventing speed.
        return max(elapsed - sync_rtt_s, elapsed / 2)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


def measure(host: str, port: int, *, sizes: Sequence[int], budget_s: float, timeout_s: float, command: str,
            progress: bool = True) -> LinkMeasurement:  # fmt: skip
    """Measure the link to the listener at tcp://host:port over `sizes` within about `budget_s`."""
    assert list(sizes) == sorted(set(sizes)) and sizes[0] >= 1, sizes
    address = endpoint(host, port)
    start = time.monotonic()
    peer = _Peer(address, timeout_s)
    rng = np.random.default_rng(0)
    try:
        peer.send([b"hello"])
        listener = json.loads(peer.recv(b"hello")[1].bytes)
        if listener.pop("protocol", None) != PROTOCOL:
            raise LinkProfileError(f"{address}: the listener speaks another protocol version (this side: {PROTOCOL})")
        warm_until = time.monotonic() + WARMUP_S  # the connection, buffers, caches, clock speed
        while time.monotonic() < warm_until:
            peer.echo_s(b"")
        sync_rtt_s = float(np.median([peer.echo_s(b"") for _ in range(30)]))
        payloads = [rng.bytes(n) for n in sizes]
        samples = [_Samples() for _ in sizes]
        slots = [i for _ in range(PASSES) for i in range(len(sizes))]
        bar = tqdm(total=len(slots), desc="profile link", unit="size", disable=not progress, leave=False)
        for k, i in enumerate(slots):
            share_s = max(0.0, budget_s - (time.monotonic() - start)) / (len(slots) - k)
            samples[i].add(peer, payloads[i], share_s, sync_rtt_s)
            bar.update()
            bar.set_postfix_str(f"{_show_bytes(sizes[i])}: {samples[i].one_way_ms(50):.3f} ms one way, "
                                f"{np.median(samples[i].rates_mbps):,.0f} Mbit/s")  # fmt: skip
        bar.close()
    finally:
        peer.close()
    points = tuple(s.point(n) for s, n in zip(samples, sizes))
    return LinkMeasurement(address, points, listener, host_info(command), sync_rtt_s * 1000, time.monotonic() - start)


@dataclass(slots=True)
class _Samples:
    """What the passes measured at one size: echo round trips and one stream's rate per pass."""

    rtts_s: list[float] = field(default_factory=list)
    rates_mbps: list[float] = field(default_factory=list)
    n_streamed: int = 0

    def one_way_ms(self, percentile: float) -> float:
        return float(np.percentile(self.rtts_s, percentile)) * 1000 / 2

    def add(self, peer: _Peer, payload: bytes, share_s: float, sync_rtt_s: float) -> None:
        for _ in range(WARMUP_ECHOES):
            peer.echo_s(payload)
        n, t_end = 0, time.monotonic() + share_s / 2
        while n < MAX_ECHOES and (n < MIN_ECHOES or time.monotonic() < t_end):
            self.rtts_s.append(peer.echo_s(payload))
            n += 1
        # One-way time bounds a message's gap in a stream from above, so this K fills the share or less.
        k = int(np.clip(share_s / 2 / (self.one_way_ms(50) / 1000), MIN_STREAM, MAX_STREAM))
        self.rates_mbps.append(k * len(payload) * 8 / peer.stream_s(payload, k, sync_rtt_s) / 1e6)
        self.n_streamed += k

    def point(self, nbytes: int) -> SizePoint:
        p10, median, p90 = (self.one_way_ms(q) for q in (10, 50, 90))
        return SizePoint(nbytes, median, p10, p90, len(self.rtts_s), float(np.median(self.rates_mbps)), self.n_streamed)


def _show_bytes(nbytes: int) -> str:
    for unit, size in (("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= size and nbytes % size == 0:
            return f"{nbytes // size} {unit}"
    return f"{nbytes} B"


# ---- the profile --------------------------------------------------------------------------------


def write_profile(out: str | os.PathLike, m: LinkMeasurement, *, budget_s: float, notes: str | None) -> None:
    """transfer.csv and meta.json in `out` (created), as profiles/README.md describes them."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "transfer.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TRANSFER_COLUMNS)
        for p in m.points:
            w.writerow([p.nbytes, f"{p.one_way_ms_median:.6f}", f"{p.one_way_ms_p10:.6f}", f"{p.one_way_ms_p90:.6f}",
                        p.n_echoes, f"{p.throughput_mbps:.3f}", p.n_streamed])  # fmt: skip
    peer = m.peer
    meta = {
        "link": folder.name,
        "source": "measured",
        "transport": "tcp",
        "address": m.address,
        "method": (f"{peer['command']} (peer, on {peer['hostname']}) against {m.listener['command']} "
                   f"(listener, on {m.listener['hostname']}); one-way = median echo RTT / 2 over ZeroMQ "
                   f"DEALER-ROUTER, frames [kind, payload], {PASSES} passes over the sizes; throughput = median "
                   f"over the passes of a stream of back-to-back messages, timed to a sync reply minus one "
                   f"empty-message round trip ({m.sync_rtt_ms:.3f} ms)"),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_sha": peer["git_sha"],
        "listener": m.listener,
        "peer": peer,
        "budget_s": budget_s,
        "elapsed_s": round(m.elapsed_s, 3),
        "notes": notes or "",
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

