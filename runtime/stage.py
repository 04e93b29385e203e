"""A verification stage process: its layers, its KV cache, its ledger, and a ZeroMQ loop.

Theory of operation
-------------------
Start-up: bind the inbox, say `hello` to D0 (address and layer range), load the layers, let go of
the library pages only start-up touched (`runtime.working_set`), wait for `peers` (where to send
results; D0's clock, to report spans on one time axis), say `ready`. Where a stage sits is its
`StagePlan` (`runtime.stage_plan`).

Loop: drain every waiting message — prunes go straight into the `StageLedger` and compact the KV,
segments queue in arrival order — then run the first queued segment once the ledger has every
prune it reflects. A batching policy (`flowspec.batch`) has several lanes, each with its own ledger
and KV cache: the first ready segment of every lane runs as one batch (one after another here, the
batch's time padded as one on an emulated board), and a lane's segments never overtake each other. A forward follows the ledger protocol exactly as the in-memory driver does:
catch up (sync, admit), forward under the ledger's visibility, append; then drain again and catch
up once more, so prunes that arrived during the forward are applied before the surviving rows go
on to the next stage (D0 after the last). A segment emptied by pruning travels on as an empty
marker. Nothing is decided here; the ledger and the core decide.

One set of stage processes serves several runs (policies) in turn: after each, D0 sends `flush`
and the stage answers with a `report` of the run's spans and starts the next with an empty KV
and a fresh ledger (prune versions restart at 1 with every run's core).

Liveness: while idle the stage heartbeats to D0 with a `status` — the last segment it passed on,
when, and how many wait in its queue — which D0's progress watchdog reads to name a stage that
heartbeats but no longer moves; if D0 is silent for `runtime.timeout_s` (it heartbeats too) the
stage raises `StageTimeout`, as it does when the segment at the head of its queue has waited that
long for a prune it claims to reflect. Any failure is reported to D0 as an `error` message with
the traceback, and the process exits non-zero; `stop` ends it cleanly. SIGINT and SIGTERM are
failures too (`runtime.shutdown`): D0 hears which signal stopped which stage, and the exit code is
130 or 143.

Hostile or stray input: the inbox is reachable by anyone, so a frame is checked before anything is
applied — by `wire.decode`, then against the stage's state (`runtime.stage_inbox`): who may send
which type, token ids within the vocabulary, hidden states of this model's width, a bounded queue,
and the ledger's own `check_prune` / `check_segment` (a queued segment is checked again just before
its forward, on the state it will meet). A frame that fails is logged to stderr with its claimed
sender and the reason, counted (the count travels in the run's `report`) and dropped, leaving the
stage exactly as it was. Only a peer's `error`, D0's silence, a wedged queue and the stage's own
failures end it. The sender rank is a claim: a forged frame that fits the state is obeyed. What
narrows who can forge is the scenario's runtime.security (module `runtime.security`): on a testbed
only the scenario's hosts are heard, and with CURVE only holders of the testbed's keys, each for its
own rank.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path

import numpy as np
import torch

from flowspec.config import Scenario, load_scenario
from flowspec.kv import StageLedger
from flowspec.messages import ProtocolError, Segment, SegmentKind, n_decided
from flowspec.platform import batch_stage_ms, batch_verify_ms
from runtime import wire
from runtime.channel import Endpoint, RemoteError, StageTimeout, raise_fd_limit
from runtime.emulation import Emulation, PacedEndpoint, Pad
from runtime.llama import KVCache
from runtime.model_slice import LayerSlice, hidden_from_wire, hidden_to_wire
from runtime.models import read_head, torch_device
from runtime.shutdown import Interrupted, signals_raise
from runtime.stage_inbox import FrameBounds, Queued
from runtime.stage_plan import StagePlan, loopback_plan
from runtime.stage_plan import layer_ranges, testbed_plan  # noqa: F401 (the launcher and cli import them from here)
from runtime.working_set import let_go_of_startup_pages

MAX_DRAINED = 1000  # messages received in a row before the queue gets a turn: a flood cannot starve forwards
LOGGED_REJECTIONS = 50  # per report, each logged; after that every 1000th, so a flood cannot fill a disk
# Test hook: with this set to its rank, a stage stops running segments on SIGUSR1 while it keeps
# receiving and heartbeating — the wedge D0's progress watchdog exists for (tests/runtime/test_failures.py).
WEDGE_ENV = "FLOWSPEC_TEST_WEDGE"


class StageWorker:
    def __init__(self, plan: StagePlan, model_dir: Path, threads: int = 1, emulated: Scenario | None = None) -> None:
        self.plan = plan
        self.model_dir = model_dir
        self.threads = threads
        self.ledger = StageLedger()  # the lane in use's (`_use`); one ledger and KV cache per lane
        self.ledgers: dict[int, StageLedger] = {0: self.ledger}
        self.caches: dict[int, KVCache] = {}
        self.queue: deque[Queued] = deque()
        self._queued_nbytes = 0
        self._blocked: tuple[Queued, float] | None = None  # the queue's head and since when it waits for a prune
        self._running = False  # a forward is under way: its ledger state must not be flushed
        self.rejected = 0  # frames dropped since the last report
        self.spans: list[list] = []
        self.forwarded = -1  # the last segment passed on this run, and when (this stage's clock): the status
        self.t_forwarded = 0.0
        self.wedged = False  # the test hook (WEDGE_ENV)
        if os.environ.get(WEDGE_ENV) == str(plan.rank) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._wedge)
        self.stopping = False
        self.clock_offset_s = 0.0  # D0's clock minus this stage's (`_clock`)
        self._clock_samples = 0
        self.last_from_d0 = time.monotonic()
        self.last_to_d0 = 0.0
        self._parent = os.getppid()
        self.emulation = Emulation.of(emulated)  # None: compute and links as they are
        self.pad = None if self.emulation is None else Pad(self.emulation)
        self.bounds = FrameBounds.read(model_dir, plan.rank)  # what peers may send
        inner = Endpoint(plan.rank, plan.host, plan.port, plan.bind_host, max_frame_nbytes=self.bounds.max_frame_nbytes,
                         keyring=plan.keyring, allowed=plan.allowed)  # fmt: skip
        self.endpoint = PacedEndpoint(inner, self.emulation, plan.rank)
        self.endpoint.connect(0, plan.d0_address)
        self.next_rank = plan.rank + 1 if plan.rank < plan.n_stages else 0
        self.slice = None
        self.lm_head = None

    # ---- start-up -------------------------------------------------------------------------------

    def start(self) -> None:
        p = self.plan
        self._to_d0(wire.encode("hello", p.rank, {"address": self.endpoint.address, "first_layer": p.first_layer,
                                                 "n_layers": p.last_layer - p.first_layer}))  # fmt: skip
        torch.set_num_threads(self.threads)
        self.device = torch_device(p.device, f"stage {p.rank}: device {p.device}")
        dtype = getattr(torch, p.dtype)
        self.slice = LayerSlice.from_checkpoint(self.model_dir, p.first_layer, p.last_layer, device=self.device,
                                                dtype=dtype)  # its own layers only  # fmt: skip
        self.lm_head = read_head(self.model_dir, with_embedding=False)[0].to(self.device, dtype) if p.head else None
        let_go_of_startup_pages()  # torch's initialisers and the loader's code: ~55 MB a board need not hold
        deadline = time.monotonic() + p.startup_timeout_s
        while True:
            msg = self._receive(max(0.0, min(1.0, deadline - time.monotonic())))
            if msg is not None and msg.sender == 0 and msg.type == "stop":
                self.stopping = True
                return
            if msg is not None and self._peers(msg):
                break
            if time.monotonic() > deadline:
                raise StageTimeout(f"stage {p.rank}: D0 did not send the peer list within {p.startup_timeout_s:g} s")
            self._check_parent()
        self.last_from_d0 = time.monotonic()
        self._to_d0(wire.encode("ready", p.rank, {}))

    def _peers(self, msg: wire.Message) -> bool:
        """Whether `msg` is D0's peer list (then applied); anything else before it is rejected."""
        reason = self.bounds.peers_refusal(msg, has_next=self.next_rank != 0)
        if reason is not None:
            self._reject(ProtocolError(reason))
            return False
        self._clock(msg)
        if self.next_rank:
            self.endpoint.connect(self.next_rank, str(msg.fields["next"]))
        return True

    # ---- loop -----------------------------------------------------------------------------------

    def serve(self) -> None:
        heartbeat_s = self.plan.timeout_s / 4
        while not self.stopping:
            runnable = self._runnable()
            self._drain(0.0 if runnable else heartbeat_s)
            if self.stopping:
                break
            while self._runnable() and not self._run_one():
                pass  # the head was rejected: the next one may run
            now = time.monotonic()
            if now - self.last_to_d0 > heartbeat_s:
                self._to_d0(self._status(now))
            if now - self.last_from_d0 > self.plan.timeout_s:
                raise StageTimeout(f"stage {self.plan.rank}: no message from D0 for {now - self.last_from_d0:.1f} s "
                                   f"(runtime.timeout_s = {self.plan.timeout_s:g})")  # fmt: skip
            self._check_wedged(now)
            self._check_parent()

    def _runnable(self) -> bool:
        return self._next() is not None and not self.wedged

    def _next(self) -> list[int] | None:
        """Where in the queue the next batch is: the head's group (`Segment.group`, as D0 formed
        it; a segment alone is a group of one) once all of it is here and every member's prunes
        have arrived; None until then."""
        if not self.queue:
            return None
        head = self.queue[0].segment
        members = [i for i, item in enumerate(self.queue) if item.segment.group == head.group] if head.group >= 0 else [0]
        if len(members) < head.group_size:
            return None
        if not all(self._ledger(self.queue[i].segment.lane).ready(self.queue[i].segment) for i in members):
            return None
        return members

    def _ledger(self, lane: int) -> StageLedger:
        if lane not in self.ledgers:
            self.ledgers[lane] = StageLedger()
        return self.ledgers[lane]

    def _use(self, lane: int) -> None:
        """Make `lane`'s ledger and KV cache the ones the forward and the prunes work on."""
        self.ledger = self._ledger(lane)
        if lane not in self.caches:
            self.caches[lane] = KVCache()
        self.slice.cache = self.caches[lane]

    def _wedge(self, signum: int, frame: object) -> None:
        print(f"stage {self.plan.rank}: wedged on purpose ({WEDGE_ENV})", file=sys.stderr, flush=True)
        self.wedged = True

    def _status(self, now: float) -> list:
        """The heartbeat D0 reads progress from. While an emulated link still carries data the
        stage is moving (transmitting), so that counts as a forward now."""
        t_forwarded = now if self.endpoint.busy else self.t_forwarded
        t_d0 = 0.0 if self.forwarded < 0 and not self.endpoint.busy else t_forwarded + self.clock_offset_s
        return wire.encode("status", self.plan.rank, {"forwarded": self.forwarded, "t_forwarded_s": t_d0,
                                                     "queued": len(self.queue)})  # fmt: skip

    def _check_wedged(self, now: float) -> None:
        """Raise if the queue's head has waited `runtime.timeout_s` for a prune that has not come
        (D0 sent that prune before the segment, so it is lost, or the segment lies about it), or for
        the rest of its group (D0 sent them back to back)."""
        head = self.queue[0] if self.queue else None
        if head is None or self._next() is not None:
            self._blocked = None
        elif self._blocked is None or self._blocked[0] is not head:
            self._blocked = (head, now)
        elif now - self._blocked[1] > self.plan.timeout_s:
            seg = head.segment
            waited = f"stage {self.plan.rank}: segment {seg.segment_id} of request {seg.request_id} waited " \
                     f"{now - self._blocked[1]:.1f} s"  # fmt: skip
            if not self._ledger(seg.lane).ready(seg):
                raise StageTimeout(f"{waited} for prune v{seg.version}, which never came (the last received is "
                                   f"v{self._ledger(seg.lane).received}; runtime.timeout_s = {self.plan.timeout_s:g})")  # fmt: skip
            here = sum(item.segment.group == seg.group for item in self.queue)
            raise StageTimeout(f"{waited} for the rest of its group {seg.group}: {here} of {seg.group_size} came "
                               f"(runtime.timeout_s = {self.plan.timeout_s:g})")  # fmt: skip

    def _receive(self, timeout_s: float) -> wire.Message | None:
        """The next message that decodes; None when none came or the one that came was rejected."""
        try:
            return self.endpoint.recv(timeout_s)
        except ProtocolError as e:
            self._reject(e)
            return None

    def _drain(self, timeout_s: float) -> None:
        msg = self._receive(timeout_s)
        for _ in range(MAX_DRAINED):
            if msg is None:
                return
            self._handle(msg)
            msg = self._receive(0.0)
        if msg is not None:
            self._handle(msg)

    def _handle(self, msg: wire.Message) -> None:
        """Check `msg` against this stage's state, then apply it; a frame that fails is rejected."""
        try:
            self._apply(msg)
        except ProtocolError as e:
            self.endpoint.forget(self.endpoint.last_arrival)
            self._reject(e, msg)

    def _reject(self, error: ProtocolError, msg: wire.Message | None = None) -> None:
        """Count and log a frame that is dropped (`msg`: as decoded, when it decoded)."""
        self.rejected += 1
        text = str(error)
        if msg is not None and "from rank" not in text:
            text = f"{msg.type} message from rank {msg.sender}: {text}"
        if self.rejected <= LOGGED_REJECTIONS or self.rejected % 1000 == 0:
            print(f"stage {self.plan.rank}: rejected frame #{self.rejected}: {text[:300]}", file=sys.stderr, flush=True)

    def _apply(self, msg: wire.Message) -> None:
        rank = self.plan.rank
        self.bounds.check_sender(msg)
        if msg.type == "segment":
            item = self.bounds.admit(msg, self.endpoint.last_arrival, len(self.queue), self._queued_nbytes)
            self.queue.append(item)
            self._queued_nbytes += item.nbytes
        elif msg.type == "prune":
            prune = wire.to_prune(msg)
            self._use(prune.lane)
            self.ledger.check_prune(prune)
            self.ledger.receive(prune)
            self._compact(self.ledger.sync())
        elif msg.type == "stop":
            self.stopping = True
        elif msg.type == "flush":
            if self.queue or self._running:
                raise ProtocolError(f"flush message from rank 0: {len(self.queue) + self._running} segment(s) still "
                                    f"queued or running on stage {rank}")  # fmt: skip
            off = self.clock_offset_s  # the best estimate now, for every span of the run
            spans = [[*row[:5], row[5] + off, row[6] + off] for row in self.spans]
            sent = [[*row[:3], row[3] + off, None if math.isnan(row[4]) else row[4] + off] for row in self.endpoint.transfers]
            arrivals = [[src, kind, t + off] for src, kind, t in self.endpoint.arrivals]
            report: dict = {"spans": spans, "computes": [], "transfers": sent, "arrivals": arrivals,
                            "rejected": self.rejected}  # fmt: skip
            if self.pad is not None:
                report["computes"] = [[*row[:2], row[2] + off, *row[3:]] for row in self.pad.rows]
                self.pad.rows = []
            self.endpoint.transfers, self.endpoint.arrivals = [], []
            self._to_d0(wire.encode("report", self.plan.rank, report))
            self.spans = []
            self.rejected = 0
            self.forwarded, self.t_forwarded = -1, 0.0
            self.ledger = StageLedger()
            self.ledgers, self.caches = {0: self.ledger}, {}
            self.slice.reset()
        elif msg.type == "error":
            raise RemoteError(f"stage {self.plan.rank}: rank {msg.sender} failed: {msg.fields['message']}")
        if msg.sender == 0:  # accepted: D0 is alive, and its clock is a sample
            self.last_from_d0 = time.monotonic()
            if "clock_s" in msg.fields:
                self._clock(msg)

    def _drain_until(self, deadline: float) -> None:
        """Receive (and apply) messages until `deadline` (monotonic): the padding of a forward."""
        while (left := deadline - time.monotonic()) > 0:
            msg = self._receive(left)
            if msg is not None:
                self._handle(msg)

    def _clock(self, msg: wire.Message) -> None:
        """Offset of D0's clock from this stage's: D0's time in the message minus now, plus the
        message's delay, which is never negative, so the largest sample is the least delayed one.
        (The peers message waits while the layers load, seconds; a heartbeat to an idle stage, µs.)"""
        sample = float(msg.fields["clock_s"]) - time.monotonic()  # type: ignore[arg-type]
        self.clock_offset_s = sample if self._clock_samples == 0 else max(self.clock_offset_s, sample)
        self._clock_samples += 1

    def _compact(self, slots: np.ndarray | None) -> None:
        if slots is not None:
            self.slice.keep(torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)))

    def _run_one(self) -> bool:
        """Forward the next group as one batch (a policy serving one request at a time: the queue's
        head alone); a segment that does not fit its lane's state is rejected. Whether any ran."""
        picked = self._next()
        assert picked is not None, "only a runnable queue runs"
        batch = []
        for i in reversed(picked):
            item = self.queue[i]
            del self.queue[i]
            self._queued_nbytes -= item.nbytes
            self._use(item.segment.lane)
            try:
                self.ledger.check_segment(item.segment)  # on the state the forward will meet
            except ProtocolError as e:
                self.endpoint.forget(item.arrival)
                self._reject(ProtocolError(f"segment message from rank {self.plan.rank - 1}: {e}"))
                continue
            batch.insert(0, item)
        if not batch:
            return False
        self._running = True
        try:
            self._forward(batch)
        finally:
            self._running = False
        return True

    def _forward(self, batch: list[Queued]) -> None:
        """Each segment through this slice with its own lane's KV, then the batch's time as one
        forward (an emulated board: padded to `batch_stage_ms`, as the simulator charges it)."""
        t_start = time.monotonic()
        done: list[tuple[Segment, torch.Tensor, int]] = []  # (admitted segment, its output rows, KV length before)
        for item in batch:
            seg = item.segment
            self._use(seg.lane)
            if seg.reset:
                self.ledger.reset()
                self.slice.reset()
                self.caches[seg.lane] = self.slice.cache
            slots, seg, rows = self.ledger.catch_up(seg)
            self._compact(slots)
            kv_len = self.ledger.kv_len
            if item.hidden is None:
                x = torch.from_numpy(np.ascontiguousarray(seg.tokens, dtype=np.int64)).to(self.device)
            else:
                x = hidden_from_wire(item.hidden[rows], item.hidden_dtype).to(self.device, getattr(torch, self.plan.dtype))
            if len(seg):
                visible = torch.from_numpy(self.ledger.visibility(seg)).to(self.device)
                positions = torch.from_numpy(np.ascontiguousarray(seg.positions, dtype=np.int64)).to(self.device)
                out = self.slice(x, positions, visible)
                self.ledger.append(seg)
                assert self.slice.kv_len == self.ledger.kv_len, (self.slice.kv_len, self.ledger.kv_len)
            else:  # emptied by pruning: pass the marker on
                out = torch.zeros((0, self.slice.config.hidden_size))
            done.append((seg, out, kv_len))
        t_end = time.monotonic()
        ran = [(seg, kv_len) for seg, _, kv_len in done if len(seg)]
        if ran:
            first, n_rows, kv_max = ran[0][0], sum(len(s) for s, _ in ran), max(kv for _, kv in ran)
            owner = first.request_id if len({s.request_id for s, _ in ran}) == 1 else -1  # -1: several requests'
            if self.pad is not None:  # an emulated board: busy for its profiled time
                model_ms = batch_stage_ms(self.emulation.platform, self.plan.rank, n_rows, kv_max)
                t_end = self.pad.done(owner, str(first.kind), t_start, model_ms)
                self._drain_until(t_end)
            # on this stage's clock; moved to D0's when reported
            self.spans.append([owner, first.segment_id, str(first.kind), n_rows, kv_max, t_start, t_end])
        decided = self._decide(done) if self.lm_head is not None else [None] * len(done)
        done = [(seg, out.cpu(), kv_len) for seg, out, kv_len in done]
        self._drain(0.0)  # prunes that arrived during the forward
        for (seg, out, _), mine in zip(done, decided, strict=True):
            self._use(seg.lane)  # a prune may have switched to another lane
            slots, seg, rows = self.ledger.catch_up(seg)
            self._compact(slots)
            if mine is not None and (not self.plan.sampled or seg.kind is not SegmentKind.PREFILL):
                mine = mine[rows]  # argmax per row, or a tree segment's logits per row
            if self.lm_head is None or self.plan.features:
                hidden = out[torch.from_numpy(rows)]
                frames = wire.encode_segment(seg, self.plan.rank, hidden_to_wire(hidden, self.plan.dtype),
                                             self.plan.dtype, decided=mine)  # fmt: skip
            else:
                frames = wire.encode_segment(seg, self.plan.rank, decided=mine)
            nbytes = 0
            if self.emulation is not None:
                nbytes = self.emulation.wire.returned(len(seg), n_decided(seg)) if self.next_rank == 0 else \
                    self.emulation.wire.segment(len(seg), first_hop=False)  # fmt: skip
            self.endpoint.send_paced(self.next_rank, frames, nbytes, "segment")
            self.forwarded, self.t_forwarded = seg.segment_id, time.monotonic()
        if self.next_rank == 0:
            self.last_to_d0 = time.monotonic()

    def _decide(self, done: list[tuple[Segment, torch.Tensor, int]]) -> list[np.ndarray | None]:
        """The target's decisions on each segment's decided rows (`pipeline.head: last`): argmax ids
        for every row (-1 where none is decided) at temperature 0, else the fp32 logits of its
        decided rows [n, V]; None for a segment with none. One LM head's time for the batch."""
        t_start = time.monotonic()
        out_all: list[np.ndarray | None] = []
        with torch.inference_mode():
            for seg, out, _ in done:
                n_rows = n_decided(seg)
                if not n_rows:
                    out_all.append(None)
                    continue
                logits = out[len(seg) - n_rows :] @ self.lm_head.T
                if self.plan.sampled:
                    out_all.append(logits.float().cpu().numpy())
                else:
                    decided = np.full(len(seg), -1, dtype=np.int64)
                    decided[len(seg) - n_rows :] = logits.argmax(dim=-1).cpu().numpy()
                    out_all.append(decided)
        decided_segs = [seg for (seg, _, _), d in zip(done, out_all) if d is not None]
        if decided_segs:
            n_rows = sum(n_decided(seg) for seg in decided_segs)
            owner = decided_segs[0].request_id if len({s.request_id for s in decided_segs}) == 1 else -1
            t_end = time.monotonic()
            if self.pad is not None:
                t_end = self.pad.done(owner, "verify", t_start, batch_verify_ms(self.emulation.platform, n_rows,
                                                                               self.plan.rank))  # fmt: skip
                self._drain_until(t_end)
            self.spans.append([owner, decided_segs[0].segment_id, "verify", n_rows, 0, t_start, t_end])
        return out_all

    # ---- plumbing -------------------------------------------------------------------------------

    def _to_d0(self, frames: list) -> None:
        self.endpoint.send(0, frames)
        self.last_to_d0 = time.monotonic()

    def _check_parent(self) -> None:
        if self.plan.watch_parent and os.getppid() != self._parent:
            raise RemoteError(f"stage {self.plan.rank}: the launcher (pid {self._parent}) went away")

    def report_failure(self, error: BaseException) -> None:
        text = "".join(traceback.format_exception(error)).rstrip()
        if isinstance(error, Interrupted):  # not a bug: who stopped it is all D0 needs to say
            text = f"stage {self.plan.rank} (pid {os.getpid()}) was stopped: {error}"
        try:
            self._to_d0(wire.encode("error", self.plan.rank, {"message": text}))
        except Exception:  # the failure being reported may be the socket itself
            pass

    def close(self) -> None:
        self.endpoint.close()


def run_stage(plan: StagePlan, model_dir: Path, threads: int = 1, emulated: Scenario | None = None) -> int:
    """Serve until D0 says stop; the exit code (non-zero after a failure, which D0 is told about)."""
    raise_fd_limit()  # before the inbox exists: every connection to it, even a scanner's, holds a descriptor
    with signals_raise():
        worker = StageWorker(plan, model_dir, threads, emulated)
        try:
            worker.start()
            worker.serve()
            return 0
        except Interrupted as e:  # SIGINT or SIGTERM: D0 is told, as of any failure, without a traceback
            worker.report_failure(e)
            print(f"stage {plan.rank}: {e}", file=sys.stderr)
            return int(e.code)  # type: ignore[arg-type]
        except BaseException as e:
            worker.report_failure(e)
            print(f"stage {plan.rank} failed: {e}", file=sys.stderr)
            traceback.print_exc()
            return 1
        finally:
            worker.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of a loopback stage process (the launcher's children)."""
    parser = argparse.ArgumentParser(prog="python -m runtime.stage")
    parser.add_argument("scenario", type=Path, help="the resolved scenario the launcher wrote")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--d0", required=True, help="D0's inbox address")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--emulated", type=Path, help="the scenario as the simulator reads it: an emulated testbed")
    args = parser.parse_args(argv)
    scenario = load_scenario(args.scenario)
    emulated = None if args.emulated is None else load_scenario(args.emulated)
    plan = loopback_plan(scenario, args.rank, args.d0)
    return run_stage(plan, args.model_dir, scenario.runtime.torch_threads, emulated)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # sockets are closed already; skip the interpreter's slow teardown of torch
