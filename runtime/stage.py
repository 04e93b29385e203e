"""A verification stage process: its layers, its KV cache, its ledger, and a ZeroMQ loop.

Theory of operation
-------------------
Start-up: bind the inbox, say `hello` to D0 (address and layer range), load the layers, wait for
`peers` (where to send results; D0's clock, to report spans on one time axis), say `ready`.

Loop: drain every waiting message — prunes go straight into the `StageLedger` and compact the KV,
segments queue in arrival order — then run the first queued segment once the ledger has every
prune it reflects. A forward follows the ledger protocol exactly as the in-memory driver does:
catch up (sync, admit), forward under the ledger's visibility, append; then drain again and catch
up once more, so prunes that arrived during the forward are applied before the surviving rows go
on to the next stage (D0 after the last). A segment emptied by pruning travels on as an empty
marker. Nothing is decided here; the ledger and the core decide.

One set of stage processes serves several runs (policies) in turn: after each, D0 sends `flush`
and the stage answers with a `report` of the run's spans and starts the next with an empty KV
and a fresh ledger (prune versions restart at 1 with every run's core).

Liveness: while idle the stage heartbeats to D0; if D0 is silent for `runtime.timeout_s` (it
heartbeats too) the stage raises `StageTimeout`. Any failure is reported to D0 as an `error`
message with the traceback, and the process exits non-zero; `stop` ends it cleanly.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowspec.config import HeadPlacement, Scenario, load_scenario
from flowspec.kv import StageLedger
from flowspec.messages import ProtocolError, Segment, SegmentKind, n_decided
from runtime import wire
from runtime.channel import Endpoint, RemoteError, StageTimeout
from runtime.emulation import Emulation, PacedEndpoint, Pad
from runtime.model_slice import LayerSlice, hidden_from_wire, hidden_to_wire
from runtime.models import read_head, torch_device


@dataclass(frozen=True, slots=True)
class StagePlan:
    rank: int  # 1..N
    n_stages: int
    first_layer: int  # 0-based, inclusive
    last_layer: int  # exclusive
    d0_address: str
    host: str  # the address peers reach this stage at
    port: int  # 0: any free port
    bind_host: str | None  # None: bind on `host`
    timeout_s: float
    startup_timeout_s: float
    device: str  # runtime.device (or this stage's override)
    dtype: str  # the stage's weights, and its hidden states on the wire
    watch_parent: bool  # exit if the launcher that started us goes away (loopback runs)
    head: bool = False  # the last stage with `pipeline.head: last`: it computes the target's decisions
    sampled: bool = False  # temperature > 0: it returns logits, not argmax ids
    features: bool = True  # it returns hidden states (always, unless `head` and D0's drafter does not read them)


def _plan(scenario: Scenario, rank: int, d0: str, host: str, port: int, bind_host: str | None,
          watch_parent: bool) -> StagePlan:  # fmt: skip
    rt = scenario.runtime
    first, last = layer_ranges(scenario)[rank - 1]
    head = rank == scenario.pipeline.n_stages and scenario.pipeline.head is HeadPlacement.LAST
    return StagePlan(rank, scenario.pipeline.n_stages, first, last, d0, host, port, bind_host, rt.timeout_s,
                     rt.startup_timeout_s, *scenario.stage_compute(rank), watch_parent=watch_parent, head=head,
                     sampled=scenario.decoding.temperature > 0, features=not head or scenario.features_on_the_wire)  # fmt: skip


def layer_ranges(scenario: Scenario) -> list[tuple[int, int]]:
    """[first, last) of every stage's layers, V1 first."""
    bounds = np.concatenate([[0], np.cumsum(scenario.stage_layers)]).tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def testbed_plan(scenario: Scenario, rank: int) -> StagePlan:
    """Where stage `rank` listens and whom it reports to, from `runtime.hosts` and `base_port`."""
    rt = scenario.runtime
    return _plan(scenario, rank, f"tcp://{rt.hosts[0]}:{rt.base_port}", rt.hosts[rank], rt.base_port + rank, "0.0.0.0",
                 watch_parent=False)  # fmt: skip


class StageWorker:
    def __init__(self, plan: StagePlan, model_dir: Path, threads: int = 1, emulated: Scenario | None = None) -> None:
        self.plan = plan
        self.model_dir = model_dir
        self.threads = threads
        self.ledger = StageLedger()
        self.queue: deque[tuple[Segment, np.ndarray | None]] = deque()
        self.spans: list[list] = []
        self.stopping = False
        self.clock_offset_s = 0.0  # D0's clock minus this stage's (`_clock`)
        self._clock_samples = 0
        self.last_from_d0 = time.monotonic()
        self.last_to_d0 = 0.0
        self._parent = os.getppid()
        self.emulation = Emulation.of(emulated)  # None: compute and links as they are
        self.pad = None if self.emulation is None else Pad(self.emulation)
        self.endpoint = PacedEndpoint(Endpoint(plan.rank, plan.host, plan.port, plan.bind_host), self.emulation, plan.rank)
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
        deadline = time.monotonic() + p.startup_timeout_s
        while True:
            msg = self.endpoint.recv(max(0.0, min(1.0, deadline - time.monotonic())))
            if msg is not None and msg.type == "peers":
                self._clock(msg)
                if self.next_rank:
                    self.endpoint.connect(self.next_rank, str(msg.fields["next"]))
                break
            if msg is not None and msg.type == "stop":
                self.stopping = True
                return
            if time.monotonic() > deadline:
                raise StageTimeout(f"stage {p.rank}: D0 did not send the peer list within {p.startup_timeout_s:g} s")
            self._check_parent()
        self.last_from_d0 = time.monotonic()
        self._to_d0(wire.encode("ready", p.rank, {}))

    # ---- loop -----------------------------------------------------------------------------------

    def serve(self) -> None:
        heartbeat_s = self.plan.timeout_s / 4
        while not self.stopping:
            runnable = bool(self.queue) and self.ledger.ready(self.queue[0][0])
            self._drain(0.0 if runnable else heartbeat_s)
            if self.stopping:
                break
            if self.queue and self.ledger.ready(self.queue[0][0]):
                self._run_one()
            now = time.monotonic()
            if now - self.last_to_d0 > heartbeat_s:
                self._to_d0(wire.encode("heartbeat", self.plan.rank, {"clock_s": time.monotonic()}))
            if now - self.last_from_d0 > self.plan.timeout_s:
                raise StageTimeout(f"stage {self.plan.rank}: no message from D0 for {now - self.last_from_d0:.1f} s "
                                   f"(runtime.timeout_s = {self.plan.timeout_s:g})")  # fmt: skip
            self._check_parent()

    def _drain(self, timeout_s: float) -> None:
        msg = self.endpoint.recv(timeout_s)
        while msg is not None:
            self._handle(msg)
            msg = self.endpoint.recv(0.0)

    def _handle(self, msg: wire.Message) -> None:
        if msg.sender == 0:
            self.last_from_d0 = time.monotonic()
            if "clock_s" in msg.fields:
                self._clock(msg)
        if msg.type == "segment":
            expected = self.plan.rank - 1
            if msg.sender != expected:
                raise ProtocolError(f"stage {self.plan.rank}: segment from rank {msg.sender}, expected rank {expected}")
            hidden = msg.arrays.get("hidden")
            if self.plan.rank > 1 and hidden is None:
                raise ProtocolError(f"segment message from rank {msg.sender}: field hidden: missing after the first hop")
            self.queue.append((wire.to_segment(msg), None if hidden is None else (hidden, msg.dtypes["hidden"])))
        elif msg.type == "prune":
            self.ledger.receive(wire.to_prune(msg))
            self._compact(self.ledger.sync())
        elif msg.type == "stop":
            self.stopping = True
        elif msg.type == "flush":
            if self.queue:
                raise ProtocolError(f"stage {self.plan.rank}: flush with {len(self.queue)} segment(s) still queued")
            off = self.clock_offset_s  # the best estimate now, for every span of the run
            spans = [[*row[:5], row[5] + off, row[6] + off] for row in self.spans]
            sent = [[*row[:3], row[3] + off, None if math.isnan(row[4]) else row[4] + off] for row in self.endpoint.transfers]
            arrivals = [[src, kind, t + off] for src, kind, t in self.endpoint.arrivals]
            report: dict = {"spans": spans, "computes": [], "transfers": sent, "arrivals": arrivals}
            if self.pad is not None:
                report["computes"] = [[*row[:2], row[2] + off, *row[3:]] for row in self.pad.rows]
                self.pad.rows = []
            self.endpoint.transfers, self.endpoint.arrivals = [], []
            self._to_d0(wire.encode("report", self.plan.rank, report))
            self.spans = []
            self.ledger = StageLedger()
            self.slice.reset()
        elif msg.type == "error":
            raise RemoteError(f"stage {self.plan.rank}: rank {msg.sender} failed: {msg.fields['message']}")
        elif msg.type != "heartbeat":
            raise ProtocolError(f"{msg.type} message from rank {msg.sender}: not expected by stage {self.plan.rank}")

    def _drain_until(self, deadline: float) -> None:
        """Receive (and apply) messages until `deadline` (monotonic): the padding of a forward."""
        while (left := deadline - time.monotonic()) > 0:
            msg = self.endpoint.recv(left)
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

    def _run_one(self) -> None:
        seg, carried = self.queue.popleft()
        if seg.reset:
            self.ledger.reset()
            self.slice.reset()
        slots, seg, rows = self.ledger.catch_up(seg)
        self._compact(slots)
        t_start = time.monotonic()
        kv_len = self.ledger.kv_len
        if carried is None:
            x = torch.from_numpy(np.ascontiguousarray(seg.tokens, dtype=np.int64)).to(self.device)
        else:
            x = hidden_from_wire(carried[0][rows], carried[1]).to(self.device, getattr(torch, self.plan.dtype))
        decided: np.ndarray | None = None  # pipeline.head: last: argmax per row, or logits per decided row
        if len(seg):
            visible = torch.from_numpy(self.ledger.visibility(seg)).to(self.device)
            positions = torch.from_numpy(np.ascontiguousarray(seg.positions, dtype=np.int64)).to(self.device)
            out = self.slice(x, positions, visible)
            self.ledger.append(seg)
            assert self.slice.kv_len == self.ledger.kv_len, (self.slice.kv_len, self.ledger.kv_len)
        else:  # emptied by pruning: pass the marker on
            out = torch.zeros((0, self.slice.config.hidden_size))
        t_end = time.monotonic()
        if self.pad is not None and len(seg):  # an emulated board: busy for its profiled time
            model_ms = self.emulation.platform.stage_ms(self.plan.rank, len(seg), kv_len)
            t_end = self.pad.done(seg.request_id, str(seg.kind), t_start, model_ms)
            self._drain_until(t_end)
        if len(seg):  # on this stage's clock; moved to D0's when reported
            self.spans.append([seg.request_id, seg.segment_id, str(seg.kind), len(seg), kv_len, t_start, t_end])
        n_rows, per_row = n_decided(seg), not self.plan.sampled or seg.kind is not SegmentKind.PREFILL
        if self.lm_head is not None and n_rows:
            decided = self._decide(seg, out, n_rows)
        out = out.cpu()
        self._drain(0.0)  # prunes that arrived during the forward
        slots, seg, rows = self.ledger.catch_up(seg)
        self._compact(slots)
        if decided is not None and per_row:
            decided = decided[rows]  # argmax per row, or a tree segment's logits per row
        if self.lm_head is None or self.plan.features:
            hidden = out[torch.from_numpy(rows)]
            frames = wire.encode_segment(seg, self.plan.rank, hidden_to_wire(hidden, self.plan.dtype), self.plan.dtype,
                                         decided=decided)  # fmt: skip
        else:
            frames = wire.encode_segment(seg, self.plan.rank, decided=decided)
        nbytes = 0
        if self.emulation is not None:
            nbytes = self.emulation.wire.returned(len(seg), n_decided(seg)) if self.next_rank == 0 else \
                self.emulation.wire.segment(len(seg), first_hop=False)  # fmt: skip
        self.endpoint.send_paced(self.next_rank, frames, nbytes, "segment")
        if self.next_rank == 0:
            self.last_to_d0 = time.monotonic()

    def _decide(self, seg: Segment, out: torch.Tensor, n_rows: int) -> np.ndarray:
        """The target's decisions on the last `n_rows` rows (`pipeline.head: last`): argmax ids for
        every row (-1 where none is decided) at temperature 0, else their fp32 logits [n_rows, V]."""
        t_start = time.monotonic()
        with torch.inference_mode():
            logits = out[len(seg) - n_rows :] @ self.lm_head.T
            if self.plan.sampled:
                decided = logits.float().cpu().numpy()
            else:
                decided = np.full(len(seg), -1, dtype=np.int64)
                decided[len(seg) - n_rows :] = logits.argmax(dim=-1).cpu().numpy()
        t_end = time.monotonic()
        if self.pad is not None:
            t_end = self.pad.done(seg.request_id, "verify", t_start, self.emulation.platform.verify_ms(n_rows, self.plan.rank))
            self._drain_until(t_end)
        self.spans.append([seg.request_id, seg.segment_id, "verify", n_rows, 0, t_start, t_end])
        return decided

    # ---- plumbing -------------------------------------------------------------------------------

    def _to_d0(self, frames: list) -> None:
        self.endpoint.send(0, frames)
        self.last_to_d0 = time.monotonic()

    def _check_parent(self) -> None:
        if self.plan.watch_parent and os.getppid() != self._parent:
            raise RemoteError(f"stage {self.plan.rank}: the launcher (pid {self._parent}) went away")

    def report_failure(self, error: BaseException) -> None:
        text = "".join(traceback.format_exception(error)).rstrip()
        try:
            self._to_d0(wire.encode("error", self.plan.rank, {"message": text}))
        except Exception:  # the failure being reported may be the socket itself
            pass

    def close(self) -> None:
        self.endpoint.close()


def run_stage(plan: StagePlan, model_dir: Path, threads: int = 1, emulated: Scenario | None = None) -> int:
    """Serve until D0 says stop; the exit code (non-zero after a failure, which D0 is told about)."""
    worker = StageWorker(plan, model_dir, threads, emulated)
    try:
        worker.start()
        worker.serve()
        return 0
    except KeyboardInterrupt:
        return 130
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
    plan = _plan(scenario, args.rank, args.d0, "127.0.0.1", 0, None, watch_parent=True)
    return run_stage(plan, args.model_dir, scenario.runtime.torch_threads, emulated)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # sockets are closed already; skip the interpreter's slow teardown of torch
