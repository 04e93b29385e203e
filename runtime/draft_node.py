"""The draft node D0: the scheduling core, the drafter, the target's LM head, and a ZeroMQ loop.

Theory of operation
-------------------
D0 is the coordinator. `connect` waits for every stage's `hello` (checking that each holds the
layers this scenario gives it), tells each where to send its results, and waits until all are
`ready`. `serve` then runs one policy's requests: it feeds `PipelineCore.handle` with arrivals,
returned segments and finished drafts, and carries out the commands it gets back —

- `SendSegment`: token ids to V1 (V1 embeds them);
- `BroadcastPrune`: the pruning message to every stage;
- `Draft`: the drafter already ran inside `handle` (it is real here), so `DraftDone` follows at
  once; its measured time becomes a "draft" span;
- `EmitTokens`: streamed to `on_tokens` (the CLI prints the text as it grows).

A drafter with an `observe` method (the EAGLE head) is shown every returned row's hidden states
before the core sees the verdict, since it drafts from the target's features.

A batching policy (`flowspec.batch`) runs on a `BatchCore` with one drafter per lane (the lane a
returned segment names is the drafter that observes it); D0 takes every message waiting, runs the
LM head over each, then handles all their events before sending anything (`_handle_batch`), as
the simulator charges it.

A segment coming back from VN holds post-norm hidden states; D0 applies the LM head (argmax at
T = 0, the softmax at T > 0) and hands the result to the core, which verifies, prunes and expands.
After the last request, `flush` collects every stage's spans and leaves the stages clean for the
next run. No decision is made here: the core decides, this module moves bytes and runs the head.

Liveness: every wait is a poll with a timeout. A stage silent for `runtime.timeout_s` raises
`StageTimeout` naming it; a stage that reports an error raises `RemoteError` with its traceback;
`check_peers` (the launcher's watch over its child processes) runs on every loop.

Progress: a stage can heartbeat and never pass its segment on, so D0 also watches the pipeline
move (`runtime.progress`); the target's decisions on a returned segment come from
`runtime.lm_head`.

A run that fails part-way keeps what it finished: `completed()` is the result of the requests that
finished before the failure (their outputs and D0's records of them).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
import torch

from flowspec.config import HeadPlacement, Scenario
from flowspec.messages import (
    BroadcastPrune,
    Command,
    Draft,
    DraftDone,
    EmitTokens,
    Event,
    FinishRequest,
    RequestArrived,
    Segment,
    SegmentReturned,
    SendSegment,
    n_decided,
)
from flowspec.batch import BatchCore, make_core
from flowspec.pipeline import PipelineCore, ProtocolError
from flowspec.platform import batch_draft_ms, batch_verify_ms, d0_draft_cost_ms, d0_step_cost_ms, joint_draft
from flowspec.records import ComputeRecord, LinkTransfer, RunRecords, RunResult, StageSpan
from flowspec.workload import Request
from flowspec.tree import Drafter, DraftTree, IntArray
from runtime import wire
from runtime.channel import Endpoint, RemoteError, StageTimeout
from runtime.emulation import Emulation, PacedEndpoint, Pad, pair_transfers
from runtime.lm_head import TargetHead
from runtime.model_slice import hidden_from_wire
from runtime.models import torch_device
from runtime.progress import ProgressWatch


class TimedDrafter:
    """Measures the time spent in `propose`, so D0 can record its drafting as spans."""

    def __init__(self, inner: Drafter) -> None:
        self.inner = inner
        self.elapsed_s = 0.0

    def propose(self, context: IntArray, pool: DraftTree, frontier: IntArray, k: int) -> tuple[IntArray, np.ndarray]:
        t = time.perf_counter()
        try:
            return self.inner.propose(context, pool, frontier, k)
        finally:
            self.elapsed_s += time.perf_counter() - t


def _no_check() -> None:
    pass


class DraftNode:
    def __init__(
        self,
        scenario: Scenario,
        endpoint: Endpoint,
        lm_head: torch.Tensor,  # [V, H] the target's output embedding
        layer_ranges: list[tuple[int, int]],
        *,
        check_peers: Callable[[], None] = _no_check,
    ) -> None:
        self.scenario = scenario
        self.endpoint = endpoint
        device, dtype = scenario.stage_compute(0)
        self.device = torch_device(device, f"runtime.device: {device}")
        self.lm_head = lm_head.to(self.device, getattr(torch, dtype))  # the target's decisions, in its precision
        self.head_last = scenario.pipeline.head is HeadPlacement.LAST
        self.layer_ranges = layer_ranges
        self.n_stages = len(layer_ranges)
        self.check_peers = check_peers
        self.addresses: dict[int, str] = {}
        self.last_seen: dict[int, float] = {}
        self._last_heartbeat = 0.0
        self._reports: dict[int, dict] = {}
        self.rejected: dict[int, int] = {}  # frames each stage rejected during the last run (its report)
        self.progress = ProgressWatch(self.n_stages, self.addresses, scenario.runtime.timeout_s)
        self.finished: set[int] = set()  # request ids the current (or last) run finished
        self.core: PipelineCore | BatchCore | None = None  # the current (or last) run's

    # ---- start-up -------------------------------------------------------------------------------

    def connect(self) -> None:
        rt = self.scenario.runtime
        deadline = time.monotonic() + rt.startup_timeout_s
        self._await("hello", deadline, "say hello")
        for rank in range(1, self.n_stages + 1):
            self.endpoint.connect(rank, self.addresses[rank])
        for rank in range(1, self.n_stages + 1):
            nxt = self.addresses.get(rank + 1, "")
            self.endpoint.send(rank, wire.encode("peers", 0, {"next": nxt, "clock_s": time.monotonic()}))
        self._await("ready", deadline, "load its layers")

    def _await(self, kind: str, deadline: float, what: str) -> dict[int, wire.Message]:
        got: dict[int, wire.Message] = {}
        while len(got) < self.n_stages:
            msg = self.endpoint.recv(min(0.25, max(0.0, deadline - time.monotonic())))
            if msg is not None:
                self._control(msg)
                if msg.type == kind:
                    got[msg.sender] = msg
                    if kind == "hello":
                        self._hello(msg)
            self.check_peers()
            if time.monotonic() > deadline and len(got) < self.n_stages:
                missing = [r for r in range(1, self.n_stages + 1) if r not in got]
                raise StageTimeout(f"stage(s) {', '.join(map(str, missing))} did not {what} within "
                                   f"{self.scenario.runtime.startup_timeout_s:g} s (runtime.startup_timeout_s)")  # fmt: skip
        return got

    def _hello(self, msg: wire.Message) -> None:
        rank = msg.sender
        if not 1 <= rank <= self.n_stages:
            raise ProtocolError(f"hello message from rank {rank}: field sender: this run has stages 1..{self.n_stages}")
        first, last = self.layer_ranges[rank - 1]
        got = (msg.fields["first_layer"], msg.fields["n_layers"])
        if got != (first, last - first):
            raise ProtocolError(f"hello message from rank {rank}: field first_layer/n_layers: holds {got[1]} layers "
                                f"from {got[0]}, this scenario gives it {last - first} from {first}")  # fmt: skip
        self.addresses[rank] = str(msg.fields["address"])

    def _control(self, msg: wire.Message) -> None:
        """Bookkeeping every message gets: liveness, and failures reported by a stage."""
        self.last_seen[msg.sender] = time.monotonic()
        if msg.type == "error":
            raise RemoteError(f"stage {msg.sender} failed:\n{msg.fields['message']}")
        if msg.type == "report":
            self._reports[msg.sender] = msg.fields
        if msg.type == "status":
            self.progress.status(msg.sender, msg.fields, self.last_seen[msg.sender])

    # ---- one run --------------------------------------------------------------------------------

    def serve(
        self,
        scenario: Scenario,
        drafter: Drafter | Sequence[Drafter],
        requests: list[Request],
        *,
        run_id: str = "run",
        on_tokens: Callable[[int, tuple[int, ...]], None] | None = None,
        emulated: Scenario | None = None,
    ) -> RunResult:
        """Serve `requests` (ids are list positions, arrivals as they say) with `scenario.policy`; every
        stage ends clean. The run is traced (`flowspec.replay`), so the simulator can replay it.
        `drafter`: one, or one per lane for a batching policy whose drafter keeps a request's state.
        `emulated`: the policy's scenario as the simulator reads it, for an emulated testbed
        (`runtime.emulation`); its times are then reported divided by the dilation."""
        self.core = None
        self.emulation = Emulation.of(emulated)
        self.pad = None if self.emulation is None else Pad(self.emulation)
        self.dilation = 1.0 if self.emulation is None else self.emulation.dilation
        self.link = PacedEndpoint(self.endpoint, self.emulation, 0)
        self.prompt_len = {r.request_id: len(r.prompt) for r in requests}
        self.computes: list[ComputeRecord] = []
        self.transfers: list[LinkTransfer] = []
        self._sent: dict[int, list] = {}  # by device: data messages sent, and received (runs not emulated)
        self._arrived: dict[int, list] = {}
        drafters = list(drafter) if isinstance(drafter, Sequence) else [drafter]
        self.timed = [TimedDrafter(d) for d in drafters]  # one per lane (or one for all lanes)
        lanes = self.timed if len(self.timed) > 1 else self.timed[0]
        core = make_core(scenario, lanes, np.random.default_rng(scenario.seed), run_id=run_id, source="runtime",
                         trace=True)  # fmt: skip
        self.run_id = run_id
        self.head = TargetHead(self.lm_head, scenario.decoding.temperature, scenario.relaxed)
        self.core = core
        self.batched = isinstance(core, BatchCore)
        self._stashed: list[tuple] = []  # a batch's returned segments, (message, segment), till their groups are whole
        self._partial: dict[int, int] = {}  # returned groups not whole yet: group -> segments here
        self.spans: list[StageSpan] = []
        self.t0 = time.monotonic()
        closed_loop = any(r.t_arrival_s is None for r in requests)  # `single`: each arrives when the last finished
        arrivals = [r.t_arrival_s or 0.0 for r in requests]
        pending = deque(range(len(requests)))
        events: deque[Event] = deque()
        finished = self.finished = set()
        self.progress = ProgressWatch(self.n_stages, self.addresses, self.scenario.runtime.timeout_s)
        heartbeat_s = scenario.runtime.timeout_s / 4
        for rank in self.last_seen:
            self.last_seen[rank] = time.monotonic()

        def arrive(rid: int) -> None:
            req = requests[rid]
            t_arrival = None if closed_loop else float(arrivals[rid])
            events.append(RequestArrived(req.request_id, req.prompt, req.max_new_tokens, t_arrival))

        if closed_loop and pending:
            arrive(pending.popleft())
        while len(finished) < len(requests) or not core.idle:  # segments of a finished request still return
            now = self.now()
            while not closed_loop and pending and arrivals[pending[0]] <= now:
                arrive(pending.popleft())
            while events:
                if self.batched:  # every waiting event at once (DraftDone inside)
                    cmds = self._handle_batch(list(events))
                    events.clear()
                else:
                    cmds = self._handle(events.popleft())
                for cmd in cmds:
                    if isinstance(cmd, Draft) and not self.batched:
                        events.appendleft(DraftDone(cmd.draft_id))
                    elif isinstance(cmd, EmitTokens):
                        if on_tokens is not None:
                            on_tokens(cmd.request_id, cmd.tokens)
                    elif isinstance(cmd, FinishRequest):
                        finished.add(cmd.request_id)
                        if closed_loop and pending:
                            arrive(pending.popleft())
            if len(finished) == len(requests) and core.idle:
                break
            wait = heartbeat_s
            if not closed_loop and pending:
                wait = min(wait, max(0.0, arrivals[pending[0]] - self.now()) * self.dilation)
            msg = self.link.recv(wait)
            drained = True
            while msg is not None:
                event = self._on_message(msg)
                if event is not None:
                    events.append(event)
                    drained = False
                    if not self.batched:
                        break  # handle returns in arrival order, between them the commands they cause
                msg = self.link.recv(0.0)  # a batch: every returned segment that is here
                if msg is None and self._partial:  # and the rest of a group, on its way back to back
                    msg = self.link.recv(heartbeat_s)
            if self._stashed and not self._partial:  # whole groups back: one LM head over them
                events += self._verify_batch()
                drained = False
            self._keep_alive(heartbeat_s)
            if drained:
                self.progress.check(time.monotonic(), self.link.busy)
        wall_s = self.now()
        self.link.settle()  # the last prunes are still on D0's emulated link
        self._flush()
        records = core.records
        records.stage_spans = sorted(self.spans, key=lambda s: (s.t_start_s, s.stage))
        if self.pad is not None:
            records.emulated = True
            self._emulation_records(0, self.pad.rows, self.link.transfers)
            records.computes = sorted(self.computes, key=lambda c: (c.t_start_s, c.device))
        else:  # each message's send (its sender's record) and arrival (its receiver's), paired
            self._sent[0], self._arrived[0] = self.link.transfers, self.link.arrivals
            for src, dst, kind, nbytes, t_send, t_recv in pair_transfers(self._sent, self._arrived):
                self.transfers.append(LinkTransfer(run_id=self.run_id, source="runtime", src=src, dst=dst, kind=kind,
                                                   nbytes=nbytes, t_send_s=self._emulated(t_send),
                                                   t_recv_s=self._emulated(t_recv)))  # fmt: skip
        records.link_transfers = sorted(self.transfers, key=lambda t: (t.t_send_s, t.src, t.dst))
        return RunResult(core.outputs, records, wall_s)

    def now(self) -> float:
        """Seconds since the run started: emulated seconds (real / dilation) on an emulated testbed."""
        return self._emulated(time.monotonic())

    def _emulated(self, t_monotonic: float) -> float:
        return (t_monotonic - self.t0) / self.dilation

    def _drafted_s(self) -> float:
        return sum(t.elapsed_s for t in self.timed)

    def _handle(self, event: Event) -> list[Command]:
        before = self._drafted_s()
        t_real = time.monotonic()
        t = self.now()
        lane = self.core.lane_for(event)  # the single-request core that decides (None: an arrival)
        size = 0 if lane is None else lane.tree_size
        cmds = self.core.handle(event, now=t)
        drafted = self._drafted_s() - before
        size = max(size, 0 if lane is None else lane.tree_size)
        request_id = -1 if lane is None else lane.active_request_id
        draft = next((c for c in cmds if isinstance(c, Draft)), None)
        if draft is not None:
            request_id = draft.request_id
        if self.pad is not None:
            self._pad_step(event, cmds, t_real, size, request_id)
        self._send(cmds)
        if self.pad is None and (cmds or drafted > 0):  # measured, as the simulator charges it: bookkeeping, then drafting
            self._measured_spans(t, drafted, request_id, getattr(event, "segment_id", -1), size)
        return cmds

    def _handle_batch(self, events: list[Event]) -> list[Command]:
        """A batching policy's D0: every event that was waiting, handled before any command goes
        out — each lane's bookkeeping, then one joint draft (padded as `sim.engine` charges it:
        the steps' sum, then `batch_draft_ms` of `joint_draft`) — then the finished drafts' sends."""
        before = self._drafted_s()
        t_real = time.monotonic()
        t = self.now()
        cmds: list[Command] = []
        step_ms, size_max = 0.0, 0
        platform = None if self.emulation is None else self.emulation.platform
        for event in events:
            lane = self.core.lane_for(event)
            size = 0 if lane is None else lane.tree_size
            out = self.core.handle(event, now=t)
            size = max(size, 0 if lane is None else lane.tree_size)
            if platform is not None:
                step_ms += d0_step_cost_ms(platform, event, out, size)
            size_max = max(size_max, size)
            cmds += out
        drafted = self._drafted_s() - before
        drafts = [c for c in cmds if isinstance(c, Draft)]
        if self.pad is not None:
            joint = joint_draft(drafts) if drafts else None
            draft_ms = 0.0
            if joint is not None:
                kv_len = max(self.prompt_len[d.request_id] + len(self.core.outputs[d.request_id]) for d in drafts)
                draft_ms = batch_draft_ms(self.emulation.platform, joint, kv_len)
            if step_ms + draft_ms > 0:
                end = self.pad.done(-1, "step", t_real, step_ms + draft_ms)
                self.link.hold(end)
                t0, t_step = self._emulated(t_real), self._emulated(t_real + self.emulation.padded_s(step_ms))
                for kind, a, b, n in (("step", t0, t_step, size_max),
                                      ("draft", t_step, self._emulated(end), 0 if joint is None else joint.n_rows)):  # fmt: skip
                    if b > a:
                        self.spans.append(StageSpan(run_id=self.run_id, source="runtime", request_id=-1, stage=0,
                                                    segment_id=-1, kind=kind, n_tokens=n, kv_len=0, t_start_s=a,
                                                    t_end_s=b))  # fmt: skip
        elif cmds or drafted > 0:
            self._measured_spans(t, drafted, -1, -1, size_max)
        for draft in drafts:
            done = self.core.handle(DraftDone(draft.draft_id), now=self.now())
            assert not any(isinstance(c, Draft) for c in done), "a finished draft only sends"
            cmds += done
        self._send(self.core.grouped(cmds))  # the segments in groups, each a batch (flowspec.batch)
        return cmds

    def _send(self, cmds: list[Command]) -> None:
        em = self.emulation
        for cmd in cmds:
            if isinstance(cmd, SendSegment):
                self.progress.sent(cmd.segment.segment_id, cmd.segment.request_id, time.monotonic())
                nbytes = 0 if em is None else em.wire.segment(len(cmd.segment), first_hop=True)
                self.link.send_paced(1, wire.encode_segment(cmd.segment, 0), nbytes, "segment")
            elif isinstance(cmd, BroadcastPrune):
                frames = wire.encode_prune(cmd.prune)
                for rank in range(1, self.n_stages + 1):
                    self.link.send_paced(rank, frames, cmd.prune.nbytes, "prune")

    def _measured_spans(self, t: float, drafted: float, request_id: int, segment_id: int, size: int) -> None:
        """D0's bookkeeping since `t`, then `drafted` seconds of drafting, as measured."""
        t_step = t + max(self.now() - t - drafted, 0.0)
        for kind, a, b, seg_id in (("step", t, t_step, segment_id), ("draft", t_step, t_step + drafted, -1)):
            if b > a:
                self.spans.append(StageSpan(run_id=self.run_id, source="runtime", request_id=request_id, stage=0,
                                            segment_id=seg_id, kind=kind, n_tokens=size if kind == "step" else 0,
                                            kv_len=0, t_start_s=a, t_end_s=b))  # fmt: skip

    def _pad_step(self, event: Event, cmds: list[Command], t_real: float, size: int, request_id: int) -> None:
        """Emulated D0: bookkeeping and drafting padded to what the simulator charges for them —
        the step by tree size when a returned segment led to commands, the draft when one ran
        (`sim.engine` charges the same, in the same order) — before the commands go out."""
        assert self.emulation is not None and self.pad is not None
        platform = self.emulation.platform
        step_ms = d0_step_cost_ms(platform, event, cmds, size)
        draft = next((c for c in cmds if isinstance(c, Draft)), None)
        draft_ms = 0.0
        if draft is not None:
            kv_len = self.prompt_len[draft.request_id] + len(self.core.outputs[draft.request_id])
            draft_ms = d0_draft_cost_ms(platform, draft, kv_len)
        if step_ms + draft_ms == 0:
            return
        end = self.pad.done(request_id, "step", t_real, step_ms + draft_ms)
        self.link.hold(end)
        t0, t_step = self._emulated(t_real), self._emulated(t_real + self.emulation.padded_s(step_ms))
        segment_id = getattr(event, "segment_id", -1)
        for kind, a, b, n in (("step", t0, t_step, size),
                              ("draft", t_step, self._emulated(end), 0 if draft is None else draft.n_rows)):  # fmt: skip
            if b > a:
                self.spans.append(StageSpan(run_id=self.run_id, source="runtime", request_id=request_id, stage=0,
                                            segment_id=segment_id if kind == "step" else -1, kind=kind, n_tokens=n,
                                            kv_len=0, t_start_s=a, t_end_s=b))  # fmt: skip

    def _emulation_records(self, device: int, computes: list, transfers: list) -> None:
        """Rows of one device's padded computes and paced messages (monotonic clock) as records."""
        for request_id, kind, t_start, model_ms, padded_ms, real_ms in computes:
            self.computes.append(ComputeRecord(run_id=self.run_id, source="runtime", request_id=request_id,
                                               device=device, kind=kind, t_start_s=self._emulated(t_start),
                                               model_ms=model_ms, padded_ms=padded_ms, real_ms=real_ms))  # fmt: skip
        for dst, kind, nbytes, t_send, t_recv in transfers:
            self.transfers.append(LinkTransfer(run_id=self.run_id, source="runtime", src=device, dst=dst, kind=kind,
                                               nbytes=nbytes, t_send_s=self._emulated(t_send),
                                               t_recv_s=self._emulated(t_recv)))  # fmt: skip

    def _on_message(self, msg: wire.Message) -> Event | None:
        """The event a message from the last stage brings (None for control messages). A batching
        policy's returned segments wait (`_stashed`) until their groups are whole; `_verify_batch`
        then runs the LM head over all of them as one."""
        self._control(msg)
        if msg.type in ("heartbeat", "status", "ready"):
            return None
        if msg.type != "segment" or msg.sender != self.n_stages:
            raise ProtocolError(f"{msg.type} message from rank {msg.sender}: D0 expects segments from "
                                f"stage {self.n_stages} only while serving")  # fmt: skip
        seg = wire.to_segment(msg)
        t_real = time.monotonic()
        self.progress.returned(seg.segment_id, t_real)
        if self.batched:
            if seg.group >= 0:  # D0 waits for all of its group (`serve`)
                self._partial[seg.group] = self._partial.get(seg.group, 0) + 1
                if self._partial[seg.group] >= seg.group_size:
                    del self._partial[seg.group]
            self._stashed.append((msg, seg))
            return None
        event, n_rows = self._decide(msg, seg)
        t_end = time.monotonic()
        if self.head_last:
            return event
        if self.pad is not None and n_rows:  # as the simulator: the LM head over the rows it ran on
            t_end = self.pad.done(seg.request_id, "verify", t_real, self.emulation.platform.verify_ms(n_rows))
            self.link.hold(t_end)
        if len(seg):
            self.spans.append(StageSpan(run_id=self.run_id, source="runtime", request_id=seg.request_id, stage=0,
                                        segment_id=seg.segment_id, kind="verify", n_tokens=n_rows, kv_len=0,
                                        t_start_s=self._emulated(t_real), t_end_s=self._emulated(t_end)))  # fmt: skip
        return event

    def _decide(self, msg: wire.Message, seg: Segment) -> tuple[SegmentReturned, int]:
        """The target's decisions on a returned segment (the LM head here, or the last stage's), shown
        to a drafter that reads the target's features; the event and its decided rows."""
        hidden = msg.arrays.get("hidden")
        h = None if hidden is None else hidden_from_wire(hidden, msg.dtypes["hidden"])
        timed = self.timed[seg.lane] if len(self.timed) > 1 else self.timed[0]
        observe = getattr(timed.inner, "observe", None)  # drafters that read the target's features
        n_rows = n_decided(seg)
        if self.head_last:  # the last stage decided: its argmax ids, or logits to sample from
            argmax, probs = self.head.returned(msg, seg, n_rows)
        else:
            if h is None:
                raise ProtocolError(f"segment message from rank {msg.sender}: field hidden: missing")
            argmax, probs = self.head.over_hidden(seg, h, n_rows)
        if observe is not None and len(seg):
            if h is None:
                raise ProtocolError(f"segment message from rank {msg.sender}: field hidden: missing (the drafter reads it)")
            observe(seg.request_id, seg.node_ids, seg.parent_ids, seg.tokens, seg.positions, h, seg.reset)
        return SegmentReturned(seg.segment_id, seg.node_ids, seg.version, argmax=argmax, probs=probs), n_rows

    def _verify_batch(self) -> list[Event]:
        """Every stashed returned segment (whole groups): the LM head over all of them as one, from
        now (`batch_verify_ms`, as the simulator charges it once the group is back); their events."""
        t_real = time.monotonic()
        stashed, self._stashed = self._stashed, []
        decided = [(seg, *self._decide(msg, seg)) for msg, seg in stashed]
        t_end = time.monotonic()
        ran = [(seg, n) for seg, _, n in decided if len(seg)]
        n_rows = sum(n for _, n in ran)
        if ran and not self.head_last:
            if self.pad is not None and n_rows:
                t_end = self.pad.done(-1, "verify", t_real, batch_verify_ms(self.emulation.platform, n_rows))
                self.link.hold(t_end)
            owner = ran[0][0].request_id if len({s.request_id for s, _ in ran}) == 1 else -1
            self.spans.append(StageSpan(run_id=self.run_id, source="runtime", request_id=owner, stage=0,
                                        segment_id=ran[0][0].segment_id, kind="verify", n_tokens=n_rows, kv_len=0,
                                        t_start_s=self._emulated(t_real), t_end_s=self._emulated(t_end)))  # fmt: skip
        return [event for _, event, _ in decided]

    def _keep_alive(self, heartbeat_s: float) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat > heartbeat_s:
            self.endpoint.send_all(wire.encode("heartbeat", 0, {"clock_s": time.monotonic()}))
            self._last_heartbeat = now
        timeout = self.scenario.runtime.timeout_s
        for rank, seen in self.last_seen.items():
            if now - seen > timeout:
                raise StageTimeout(f"stage {rank} ({self.addresses.get(rank, '?')}) silent for {now - seen:.1f} s "
                                   f"(runtime.timeout_s = {timeout:g})")  # fmt: skip
        self.check_peers()

    def completed(self) -> RunResult | None:
        """The requests the last run finished — their outputs and D0's records of them — for a run
        that failed part-way (`serve` returns the full result otherwise). The stages' spans and the
        link transfers are not in it: they come with the stages' reports after a flush, which a
        failed pipeline cannot give. Outputs hold every request that started, committed tokens so
        far; only the finished ones have records. None if the run failed before it began."""
        if self.core is None:
            return None
        done = self.finished
        rec = self.core.records

        def keep(rows: list) -> list:
            return [r for r in rows if r.request_id in done]

        records = RunRecords(steps=keep(rec.steps), nodes=keep(rec.nodes), rounds=keep(rec.rounds),
                             requests=keep(rec.requests), stage_spans=keep(sorted(self.spans, key=lambda s: s.t_start_s)),
                             commands=keep(rec.commands), proposals=keep(rec.proposals), decisions=keep(rec.decisions),
                             traced=rec.traced)  # fmt: skip
        outputs = {rid: list(tokens) for rid, tokens in self.core.outputs.items()}
        return RunResult(outputs, records, self.now())

    def _flush(self) -> None:
        self._reports = {}
        self.endpoint.send_all(wire.encode("flush", 0, {"clock_s": time.monotonic()}))
        deadline = time.monotonic() + self.scenario.runtime.timeout_s
        while len(self._reports) < self.n_stages:
            msg = self.endpoint.recv(min(0.25, self.scenario.runtime.timeout_s))
            if msg is not None:
                self._control(msg)
                if msg.type not in ("report", "heartbeat", "status"):
                    raise ProtocolError(f"{msg.type} message from rank {msg.sender}: expected a report after flush")
            self.check_peers()
            if time.monotonic() > deadline:
                missing = [r for r in range(1, self.n_stages + 1) if r not in self._reports]
                raise StageTimeout(f"stage(s) {', '.join(map(str, missing))} did not report within "
                                   f"{self.scenario.runtime.timeout_s:g} s")  # fmt: skip
        self.rejected = {rank: report["rejected"] for rank, report in sorted(self._reports.items())}
        for rank, report in sorted(self._reports.items()):
            for request_id, segment_id, kind, n_tokens, kv_len, t_start, t_end in report["spans"]:
                self.spans.append(StageSpan(run_id=self.run_id, source="runtime", request_id=request_id, stage=rank,
                                            segment_id=segment_id, kind=kind, n_tokens=n_tokens, kv_len=kv_len,
                                            t_start_s=self._emulated(t_start), t_end_s=self._emulated(t_end)))  # fmt: skip
            if self.pad is not None:
                self._emulation_records(rank, report["computes"], report["transfers"])
            else:
                self._sent[rank], self._arrived[rank] = report["transfers"], report["arrivals"]

    def stop(self) -> None:
        try:
            self.endpoint.send_all(wire.encode("stop", 0, {}))
        except Exception:  # closing down after a failure: best effort
            pass
