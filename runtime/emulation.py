"""An emulated edge testbed on one machine: compute padded to its profiled time, links paced.

Theory of operation
-------------------
With `emulate.dilation` k > 0 the runtime stands in for the scenario's boards and links. The
emulated scenario is the one the simulator reads — its `model` section, `devices` profiles and
`network` links — while the processes execute the runtime's real model (SmolLM2 standing in for
a 7B on Jetsons, say). Every cost comes from `flowspec.platform`, the simulator's own cost model,
so the emulation and the simulator disagree only where the simulator's *model* is wrong (an order
it does not respect, work it does not charge), which is what `flowspec validate` measures.

- Compute: a device records when a compute starts, runs it for real, then waits until k times
  what the platform charges for it has passed (`Pad`). While a stage waits it keeps receiving, as
  a busy board's NIC does: prunes land in its ledger and apply after the forward, as in the
  simulator. A compute whose real time exceeds its padded time by more than `emulate.slack_ms` is
  an overrun; any overrun means the machine could not keep up at this k and the run is invalid.
- Links (`PacedEndpoint`): each device has one egress link, as in the simulator; a message of the
  emulated model's size holds it for k x its send time and arrives k x the latency later. The
  sender keeps the frames until then, so nothing depends on the receiver's clock. Control traffic
  (heartbeats, reports) is not paced: the simulator does not carry it.
- Time: D0 reports every time divided by k, so frames, metrics and plots are in emulated time.

A link fault, for tests (`LinkDelay`): with FLOWSPEC_TEST_LINK_DELAY=SRC>DST:SECONDS in its
environment, device SRC's endpoint holds every message to DST for SECONDS once SIGUSR2 reaches it,
as a congested or flapping link would: the sender has let go of the message (its link is not
`busy`), the receiver does not have it. D0 must then end the run within 2 x runtime.timeout_s,
naming the stage the work never reached (`runtime.progress`), or the one whose heartbeats are late.

What dilation cannot emulate: work outside the padded computes (the wire encoding after a forward,
the poll loop, a message's real loopback time) shrinks by k in emulated time; that is why k should
be only as large as overruns require (`flowspec validate` reports the residue).
"""

from __future__ import annotations

import heapq
import itertools
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field

from flowspec.config import Scenario
from flowspec.messages import WireSizes
from flowspec.platform import PROFILES_DIR, Platform, build_platform, wire_sizes
from runtime import wire
from runtime.channel import Endpoint


@dataclass(frozen=True, slots=True)
class Emulation:
    """The emulated testbed of one policy's run: its cost model and its dilation."""

    dilation: float
    slack_ms: float
    platform: Platform
    wire: WireSizes  # what the emulated model's messages weigh

    @classmethod
    def of(cls, emulated: Scenario | None, profiles_dir=PROFILES_DIR) -> Emulation | None:
        """None when `emulated` is None or not emulated; `emulated` is the policy's scenario as the
        simulator reads it (`flowspec.policy.device_scenario` applied by `build_platform`)."""
        if emulated is None or not emulated.emulate.dilation:
            return None
        return cls(emulated.emulate.dilation, emulated.emulate.slack_ms, build_platform(emulated, profiles_dir),
                   wire_sizes(emulated))  # fmt: skip

    def padded_s(self, model_ms: float) -> float:
        return self.dilation * model_ms / 1000.0


LINK_DELAY_ENV = "FLOWSPEC_TEST_LINK_DELAY"


@dataclass(slots=True)
class LinkDelay:
    """The test hook of the module docstring: messages to `dst` held `delay_s` once `on`. It holds
    what goes through a `PacedEndpoint` (all of a stage's traffic; D0's data, not its broadcasts)."""

    dst: int
    delay_s: float
    on: bool = False

    @classmethod
    def from_env(cls, rank: int) -> LinkDelay | None:
        """The hook for device `rank`'s endpoint, armed on SIGUSR2; None unless LINK_DELAY_ENV names
        `rank` as the sender (and this is the main thread, where signal handlers live)."""
        spec = os.environ.get(LINK_DELAY_ENV)
        if not spec:
            return None
        m = re.fullmatch(r"(\d+)>(\d+):(\d+(?:\.\d*)?)", spec)
        if m is None:
            raise ValueError(f"{LINK_DELAY_ENV}={spec!r}: expected SRC>DST:SECONDS, e.g. 2>3:6")
        if int(m[1]) != rank or threading.current_thread() is not threading.main_thread():
            return None
        hook = cls(int(m[2]), float(m[3]))
        signal.signal(signal.SIGUSR2, hook._arm)
        return hook

    def _arm(self, signum: int, frame: object) -> None:
        self.on = True

    def holds(self, rank: int) -> bool:
        return self.on and rank == self.dst


@dataclass(slots=True)
class Pad:
    """The padded computes of one device, as rows [request_id, kind, t_start, model_ms, padded_ms,
    real_ms] on this process's monotonic clock; `overruns` counts those past their padding."""

    emulation: Emulation
    rows: list[list] = field(default_factory=list)
    overruns: int = 0

    def done(self, request_id: int, kind: str, t_start: float, model_ms: float) -> float:
        """Record a compute that started at `t_start` and has just ended; its padded end."""
        now = time.monotonic()
        padded_s = self.emulation.padded_s(model_ms)
        real_s = now - t_start
        if real_s * 1000.0 > padded_s * 1000.0 + self.emulation.slack_ms:
            self.overruns += 1
        self.rows.append([request_id, kind, t_start, model_ms, padded_s * 1000.0, real_s * 1000.0])
        return t_start + max(padded_s, real_s)


class PacedEndpoint:
    """An `Endpoint` whose data messages travel an emulated link (or at once, without emulation).

    `recv` and `hold` release due messages while they wait, so a caller that only ever waits
    through them never delays a message past its arrival time by more than a poll.

    Every data message (segment, prune) is recorded where it leaves, as [dst, kind, nbytes, t_send,
    t_recv]: emulated, the bytes are the emulated model's and t_recv the paced arrival; otherwise
    the bytes are the frames' own and t_recv is unknown here (NaN), so the receiver records
    [src, kind, t_recv] in `arrivals` and D0 pairs the two (`pair_transfers`)."""

    def __init__(self, inner: Endpoint, emulation: Emulation | None, rank: int) -> None:
        self.inner = inner
        self.emulation = emulation
        self.rank = rank
        self._due: list[tuple[float, int, int, list]] = []  # heap of (arrival, seq, dst, frames)
        self._seq = itertools.count()
        self._link_free = 0.0
        self.transfers: list[list] = []  # [dst, kind, nbytes, t_send, t_recv], monotonic clock
        self.arrivals: list[list] = []  # [src, kind, t_recv] of data messages received (not emulated)
        self.last_arrival: list | None = None  # the row of the message `recv` returned last, if it made one
        self.delay = LinkDelay.from_env(rank)
        self._late: list[tuple[float, int, int, list]] = []  # heap as `_due`: messages the delay hook holds

    @property
    def address(self) -> str:
        return self.inner.address

    def connect(self, rank: int, address: str) -> None:
        self.inner.connect(rank, address)

    def send(self, rank: int, frames: list) -> None:
        """Control traffic: at once."""
        self._deliver(rank, frames)

    def _deliver(self, rank: int, frames: list) -> None:
        """Hand `frames` to ZeroMQ now, or to the delay hook's heap when it holds this link."""
        if self.delay is not None and self.delay.holds(rank):
            heapq.heappush(self._late, (time.monotonic() + self.delay.delay_s, next(self._seq), rank, frames))
        else:
            self.inner.send(rank, frames)

    def send_all(self, frames: list) -> None:
        self.inner.send_all(frames)

    def send_paced(self, rank: int, frames: list, nbytes: int, kind: str) -> None:
        em = self.emulation
        if em is None:
            self.transfers.append([rank, kind, sum(memoryview(f).nbytes for f in frames), time.monotonic(), float("nan")])
            self._deliver(rank, frames)
            return
        now = time.monotonic()
        t_send = max(now, self._link_free)
        self._link_free = t_send + em.padded_s(em.platform.send_ms(self.rank, nbytes))
        t_recv = self._link_free + em.padded_s(em.platform.latency_ms(self.rank, rank))
        self.transfers.append([rank, kind, nbytes, t_send, t_recv])
        heapq.heappush(self._due, (t_recv, next(self._seq), rank, frames))
        self._release()

    @property
    def busy(self) -> bool:
        """Whether data messages are still on this device's emulated link (always False without emulation)."""
        return bool(self._due)

    def _release(self) -> None:
        now = time.monotonic()
        while self._due and self._due[0][0] <= now:
            _, _, rank, frames = heapq.heappop(self._due)
            self._deliver(rank, frames)
        while self._late and self._late[0][0] <= now:
            _, _, rank, frames = heapq.heappop(self._late)
            self.inner.send(rank, frames)

    def _next_due(self) -> float:
        """When the next held message falls due (monotonic; inf when none is held)."""
        return min(self._due[0][0] if self._due else float("inf"), self._late[0][0] if self._late else float("inf"))

    def recv(self, timeout_s: float) -> wire.Message | None:
        deadline = time.monotonic() + timeout_s
        while True:
            self._release()
            now = time.monotonic()
            wait = min(deadline, self._next_due()) - now
            self.last_arrival = None
            msg = self.inner.recv(max(0.0, wait))
            if msg is not None and self.emulation is None and msg.type in DATA_MESSAGES:
                self.last_arrival = [msg.sender, msg.type, time.monotonic()]
                self.arrivals.append(self.last_arrival)
            if msg is not None or time.monotonic() >= deadline:
                self._release()
                return msg

    def forget(self, arrival: list | None) -> None:
        """A message its receiver rejected carried nothing: drop its arrival (`last_arrival` when it
        was received), or its pairing with what the sender really sent would shift by one."""
        for i in range(len(self.arrivals) - 1, -1, -1):
            if self.arrivals[i] is arrival:
                del self.arrivals[i]
                return

    def hold(self, until: float) -> None:
        """Wait without receiving until `until` (monotonic), releasing messages as they fall due."""
        while True:
            self._release()
            now = time.monotonic()
            if now >= until:
                return
            time.sleep(max(0.0, min(until, self._next_due()) - now))

    def settle(self) -> None:
        """Wait until every paced message has been handed to ZeroMQ."""
        while self._due:
            self.hold(self._due[0][0])

    def close(self) -> None:
        self.inner.close()


DATA_MESSAGES = ("segment", "prune")  # what a link carries in the simulator; control traffic is not recorded


def pair_transfers(sent: dict[int, list[list]], arrived: dict[int, list[list]]) -> list[list]:
    """[src, dst, kind, nbytes, t_send, t_recv] of every data message of a run that was not
    emulated, from what each device recorded sending (`sent[src]`: [dst, kind, nbytes, t_send, nan])
    and receiving (`arrived[dst]`: [src, kind, t_recv]), all on one clock. ZeroMQ delivers each
    sender's messages to a peer in order, so the k-th message of a kind from src to dst is the k-th
    one dst received of that kind from src; a message still in flight when the run ended has no
    arrival and is left out.

    >>> pair_transfers({0: [[1, "segment", 40, 1.0, float("nan")], [1, "prune", 8, 2.0, float("nan")]]},
    ...                {1: [[0, "prune", 2.5], [0, "segment", 1.5]]})
    [[0, 1, 'segment', 40, 1.0, 1.5], [0, 1, 'prune', 8, 2.0, 2.5]]
    """
    queues: dict[tuple[int, int, str], list[float]] = {}
    for dst, rows in arrived.items():
        for src, kind, t_recv in rows:
            queues.setdefault((src, dst, kind), []).append(t_recv)
    out, taken = [], {}
    for src, rows in sent.items():
        for dst, kind, nbytes, t_send, _ in rows:
            key = (src, dst, kind)
            k = taken.get(key, 0)
            if k < len(queues.get(key, ())):
                out.append([src, dst, kind, nbytes, t_send, queues[key][k]])
                taken[key] = k + 1
    return out


def dilation_for(computes, *, quantile: float = 0.99, margin: float = 1.25) -> float:
    """The dilation an emulation needs, from the computes of a calibration run (any dilation): the
    `quantile` of real / modelled time over every compute the model charges, times `margin`, at
    least 1, rounded up to a whole number.

    >>> import pandas as pd
    >>> dilation_for(pd.DataFrame({"model_ms": [1.0, 2.0, 0.0], "real_ms": [3.0, 2.0, 0.5]}), quantile=1.0)
    4.0
    """
    import math

    charged = computes[computes["model_ms"] > 0]
    if charged.empty:
        raise ValueError("no compute the cost model charges: nothing to size the dilation by")
    ratio = float((charged["real_ms"] / charged["model_ms"]).quantile(quantile))
    return float(max(1, math.ceil(ratio * margin)))
