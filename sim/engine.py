"""The SimPy backend: devices, links and the draft node as timed processes around one PipelineCore.

Theory of operation
-------------------
The simulator charges time; the core decides. Processes:

- D0 (`_draft_node`): takes events from its inbox one at a time, charges their cost (the target's
  LM head over a returned segment), feeds the core, charges the core's own bookkeeping for the
  step by tree size (a "step" span), then the drafting time when the commands hold a `Draft`, and
  only then executes them and feeds `DraftDone` back: verification, drafting and the sends
  (the prune among them) are serialized on D0 in the runtime's order, where the drafter runs
  inside `handle`.
- Stages (`_stage`): a FIFO inbox each, a `StageLedger` each, and the ledger protocol the runtime
  stage workers follow: wait for the prunes a segment reflects, sync, admit, forward (timed by the
  platform at the ledger's KV length), sync and admit again, send the survivors on. A running
  forward is never cancelled, because the runtime cannot cancel one either; it is pruned after.
- Links (`_send`): each device has one egress link that carries one message at a time, in order;
  a message holds it for its send time, then travels the latency. Delivery between two devices
  is FIFO, as in ZeroMQ.
- A shared host (`devices.host_cores`, a loopback run): a compute first waits for one of the host's
  cores, first come first served, and holds it while it runs.
- The workload (`_arrivals`): requests arrive at their times, or — closed loop — when the previous
  one finished.

Target outputs come from a synthetic target (`ContextOracle`) and drafts from an `OracleDrafter`
calibrated by the scenario's acceptance profile; both are injectable. A process failure ends the run
with the scenario name and simulated time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import simpy

from flowspec.config import Scenario, ScenarioError
from flowspec.kv import StageLedger
from flowspec.messages import (
    BroadcastPrune,
    Command,
    Draft,
    DraftDone,
    FinishRequest,
    Prune,
    RequestArrived,
    Segment,
    SegmentKind,
    SegmentReturned,
    SendSegment,
    n_decided,
)
from flowspec.batch import make_core
from flowspec.policy import spec
from flowspec.records import LinkTransfer, RunResult, StageSpan
from flowspec.synthetic import ContextOracle
from flowspec.tree import Drafter
from flowspec.costs import ProfileError
from flowspec.platform import (Platform, batch_draft_ms, batch_stage_ms, batch_verify_ms, d0_draft_cost_ms, d0_step_cost_ms,
                               joint_draft, wire_sizes)
from flowspec.workload import Request


class SimulationError(RuntimeError):
    """A simulated process failed; the message names the scenario and the simulated time."""


@dataclass(slots=True, eq=False)
class _Stage:
    rank: int
    ledger: StageLedger = field(default_factory=StageLedger)
    inbox: simpy.Store | None = None
    wake: simpy.Event | None = None  # a prune arrived (or, batched, a segment)
    ledgers: dict[int, StageLedger] = field(default_factory=dict)  # batched: one per request
    waiting: list[Segment] = field(default_factory=list)  # batched: segments in arrival order


class SimEngine:
    def __init__(
        self,
        scenario: Scenario,
        platform: Platform,
        drafter: Drafter,
        target: ContextOracle,
        requests: list[Request],
        *,
        run_id: str = "sim",
        trace: bool = False,
    ) -> None:
        if scenario.relaxed:  # its target is an argmax oracle: there is no distribution to relax against
            raise ScenarioError(f"dsd.tau = {scenario.dsd.tau}: the simulator models dsd's strict verification only "
                                "(dsd.tau: 0); relaxed acceptance runs in the runtime (`flowspec run`)")  # fmt: skip
        self.scenario = scenario
        self.platform = platform
        self.target = target
        self.requests = requests
        self.run_id = run_id
        self.env = simpy.Environment()
        self.batched = spec(scenario.policy).batched
        self.core = make_core(scenario, drafter, np.random.default_rng(scenario.seed), run_id=run_id, source="sim",
                              trace=trace)  # fmt: skip
        n_stages = scenario.pipeline.n_stages  # the policy's: one for single-sd (flowspec.policy.device_scenario)
        self.stages = [_Stage(rank, inbox=simpy.Store(self.env)) for rank in range(1, n_stages + 1)]
        self._link_free = [0.0] * (n_stages + 1)  # when each device's egress link falls free
        self.d0_inbox = simpy.Store(self.env)
        cores = scenario.devices.host_cores
        self.cores = simpy.Resource(self.env, capacity=cores) if cores else None
        self.finished: dict[int, simpy.Event] = {r.request_id: self.env.event() for r in requests}
        self.prompts = {r.request_id: list(r.prompt) for r in requests}
        self.spans: list[StageSpan] = []
        self.transfers: list[LinkTransfer] = []
        self.wire = wire_sizes(scenario)

    # ---- running --------------------------------------------------------------------------------

    def run(self) -> RunResult:
        d0, stage = (self._batched_draft_node, self._batched_stage) if self.batched else (self._draft_node, self._stage)
        procs = [self.env.process(d0()), self.env.process(self._arrivals())]
        procs += [self.env.process(stage(s)) for s in self.stages]
        try:
            self.env.run()
        except SimulationError:
            raise
        except ProfileError as e:  # bad input met mid-run (a cost off the profile's grid): keep its kind
            raise type(e)(f"{e} (scenario {self.scenario.name!r}, policy {self.scenario.policy}, "
                          f"t={self.env.now:.6f} s)") from e  # fmt: skip
        except Exception as e:  # a process failed: say where and when
            raise SimulationError(f"scenario {self.scenario.name!r} failed at t={self.env.now:.6f} s: {e!r}") from e
        if not self.core.idle or not all(ev.triggered for ev in self.finished.values()):
            raise SimulationError(
                f"scenario {self.scenario.name!r} stalled at t={self.env.now:.6f} s with work left"
            )
        records = self.core.records
        records.stage_spans = self.spans
        records.link_transfers = self.transfers
        return RunResult(self.core.outputs, records, self.env.now)

    def _arrivals(self):
        previous = None
        for req in self.requests:
            if req.t_arrival_s is None:
                assert previous is not None, "the first request needs an arrival time"
                yield self.finished[previous]
            else:
                yield self.env.timeout(max(0.0, req.t_arrival_s - self.env.now))
            event = RequestArrived(req.request_id, req.prompt, req.max_new_tokens, t_arrival_s=self.env.now)
            self.d0_inbox.put((event, 0.0, len(req.prompt), -1, 1))
            previous = req.request_id

    # ---- the draft node -------------------------------------------------------------------------

    def _draft_node(self):
        env = self.env
        while True:
            event, cost_ms, n_tokens, _, _ = yield self.d0_inbox.get()
            lane = self.core.lane_for(event)  # the single-request core that decides (a batch's lane)
            request_id = -1 if lane is None else lane.active_request_id
            if cost_ms > 0:
                yield from self._busy(0, request_id, event.segment_id, "verify", n_tokens, 0, cost_ms)
            size = 0 if lane is None else lane.tree_size
            cmds = self.core.handle(event, now=env.now)
            # The real draft node sends a step's commands only once `handle` returns: charge its
            # bookkeeping, then the draft, then send.
            size = max(size, 0 if lane is None else lane.tree_size)
            cost_ms = d0_step_cost_ms(self.platform, event, cmds, size)
            if cost_ms > 0:
                yield from self._busy(0, request_id, event.segment_id, "step", size, 0, cost_ms)
            while cmds:
                draft = next((c for c in cmds if isinstance(c, Draft)), None)
                if draft is not None:
                    kv_len = len(self.prompts[draft.request_id]) + len(self.core.outputs[draft.request_id])
                    cost_ms = d0_draft_cost_ms(self.platform, draft, kv_len)
                    yield from self._busy(0, draft.request_id, -1, "draft", draft.n_rows, kv_len, cost_ms)
                self._execute(cmds)
                if draft is None:
                    break
                cmds = self.core.handle(DraftDone(draft.draft_id), now=env.now)

    def _batched_draft_node(self):
        """D0 under a batching policy: every event waiting when it falls free, returned groups whole,
        is one batch — one LM head over all their rows, each lane's bookkeeping, one batched draft for every
        lane that asks (`joint_draft`) — and only then are the batch's commands sent, its segments
        grouped (`BatchCore.grouped`). The runtime's D0 does the same (`runtime.draft_node`)."""
        env, core = self.env, self.core
        while True:
            batch = [(yield self.d0_inbox.get())]
            while self.d0_inbox.items or not self._whole(batch):  # all that waits, and whole groups
                batch.append((yield self.d0_inbox.get()))
            n_rows = sum(n for _, cost_ms, n, _, _ in batch if cost_ms > 0)
            if n_rows:
                first = next(e for e, cost_ms, *_ in batch if cost_ms > 0)
                cost_ms = batch_verify_ms(self.platform, n_rows)
                yield from self._busy(0, -1, first.segment_id, "verify", n_rows, 0, cost_ms)
            step_ms, sizes, cmds = 0.0, [], []
            for event, *_ in batch:
                lane = core.lane_for(event)
                size = 0 if lane is None else lane.tree_size
                out = core.handle(event, now=env.now)
                size = max(size, 0 if lane is None else lane.tree_size)
                step_ms += d0_step_cost_ms(self.platform, event, out, size)
                sizes.append(size)
                cmds += out
            if step_ms > 0:
                yield from self._busy(0, -1, -1, "step", max(sizes), 0, step_ms)
            drafts = [c for c in cmds if isinstance(c, Draft)]
            if drafts:
                kv_len = max(len(self.prompts[d.request_id]) + len(core.outputs[d.request_id]) for d in drafts)
                joint = joint_draft(drafts)
                cost_ms = batch_draft_ms(self.platform, joint, kv_len)
                yield from self._busy(0, -1, -1, "draft", joint.n_rows, kv_len, cost_ms)
            for draft in drafts:
                done = core.handle(DraftDone(draft.draft_id), now=env.now)
                assert not any(isinstance(c, Draft) for c in done), "a finished draft only sends"
                cmds += done
            self._execute(core.grouped(cmds))

    @staticmethod
    def _whole(batch: list[tuple]) -> bool:
        """Whether every returned group in D0's `batch` is complete."""
        counts: dict[int, list[int]] = {}
        for _, _, _, group, size in batch:
            if group >= 0:
                counts.setdefault(group, [0, size])[0] += 1
        return all(n >= size for n, size in counts.values())

    def _busy(self, rank: int, request_id: int, segment_id: int, kind: str, n_tokens: int, kv_len: int, cost_ms: float):
        if self.cores is not None:  # devices sharing a host's cores: wait for one, hold it while computing
            with self.cores.request() as core:
                yield core
                yield from self._compute(rank, request_id, segment_id, kind, n_tokens, kv_len, cost_ms)
        else:
            yield from self._compute(rank, request_id, segment_id, kind, n_tokens, kv_len, cost_ms)

    def _compute(self, rank: int, request_id: int, segment_id: int, kind: str, n_tokens: int, kv_len: int,
                 cost_ms: float):  # fmt: skip
        t0 = self.env.now
        yield self.env.timeout(cost_ms / 1000.0)
        self.spans.append(StageSpan(run_id=self.run_id, source="sim", request_id=request_id, stage=rank,
                                    segment_id=segment_id, kind=kind, n_tokens=n_tokens, kv_len=kv_len,
                                    t_start_s=t0, t_end_s=self.env.now))  # fmt: skip

    def _execute(self, cmds: list[Command]) -> None:
        """Start every send and finish every request the commands name."""
        for cmd in cmds:
            if isinstance(cmd, SendSegment):
                seg = cmd.segment
                if seg.reset and not self.batched:  # a new request: every earlier segment has drained
                    self.target.forget()
                if seg.kind is SegmentKind.TREE:
                    output = self.core.outputs[seg.request_id]
                    self.target.register(seg.node_ids, seg.tokens, seg.parent_ids, seg.positions,
                                         self.prompts[seg.request_id] + output[:-1])  # fmt: skip
                nbytes = self.wire.segment(len(seg), first_hop=True)
                self._send(0, 1, "segment", nbytes, lambda seg=seg: self._arrive(self.stages[0], seg))
            elif isinstance(cmd, BroadcastPrune):
                for stage in self.stages:
                    self._send(0, stage.rank, "prune", cmd.prune.nbytes,
                               lambda s=stage, p=cmd.prune: self._prune_arrives(s, p))  # fmt: skip
            elif isinstance(cmd, FinishRequest):
                self.finished[cmd.request_id].succeed()

    # ---- stages ---------------------------------------------------------------------------------

    def _prune_arrives(self, stage: _Stage, prune: Prune) -> None:
        ledger = stage.ledgers.get(prune.request_id) if self.batched else stage.ledger
        if ledger is None:
            raise SimulationError(f"stage {stage.rank}: prune v{prune.version} of request {prune.request_id}, "
                                  "whose first prompt chunk never reached it")  # fmt: skip
        ledger.receive(prune)
        self._wake(stage)

    def _arrive(self, stage: _Stage, seg: Segment) -> None:
        if self.batched:
            stage.waiting.append(seg)
            self._wake(stage)
        else:
            stage.inbox.put(seg)

    @staticmethod
    def _wake(stage: _Stage) -> None:
        if stage.wake is not None and not stage.wake.triggered:
            stage.wake.succeed()

    def _stage(self, stage: _Stage):
        env, ledger = self.env, stage.ledger
        last = stage.rank == len(self.stages)
        while True:
            seg: Segment = yield stage.inbox.get()
            while not ledger.ready(seg):
                stage.wake = env.event()
                yield stage.wake
            if seg.reset:
                ledger.reset()
            _, seg, _ = ledger.catch_up(seg)
            if len(seg):
                kv_len = ledger.kv_len
                ledger.append(seg)
                cost_ms = self.platform.stage_ms(stage.rank, len(seg), kv_len)
                yield from self._busy(stage.rank, seg.request_id, seg.segment_id, str(seg.kind), len(seg), kv_len, cost_ms)
                n_rows = n_decided(seg) if last and self.wire.head_last else 0
                if n_rows:  # the target's decisions, here
                    cost_ms = self.platform.verify_ms(n_rows, stage.rank)
                    yield from self._busy(stage.rank, seg.request_id, seg.segment_id, "verify", n_rows, 0, cost_ms)
                _, seg, _ = ledger.catch_up(seg)  # prunes that arrived during the forward
            self._pass_on(stage, seg)

    def _batched_stage(self, stage: _Stage):
        """A stage under a batching policy: each group D0 sent (one step of several requests) is one
        batch — one forward over all their rows at the longest KV — once all of it has arrived;
        then its segments go on to the next device, one message each, still one group."""
        env = self.env
        last = stage.rank == len(self.stages)
        while True:
            batch = self._ready(stage)
            if not batch:
                stage.wake = env.event()
                yield stage.wake
                continue
            admitted, kv_lens = [], []
            for seg in batch:
                ledger = self._ledger(stage, seg)
                _, seg, _ = ledger.catch_up(seg)
                if len(seg):
                    kv_lens.append(ledger.kv_len)
                    ledger.append(seg)
                admitted.append(seg)
            n_rows = sum(len(s) for s in admitted)
            if n_rows:
                first = next(s for s in admitted if len(s))
                owner = first.request_id if len({s.request_id for s in admitted}) == 1 else -1
                cost_ms = batch_stage_ms(self.platform, stage.rank, n_rows, max(kv_lens))
                yield from self._busy(stage.rank, owner, first.segment_id, str(first.kind), n_rows, max(kv_lens), cost_ms)
                n_head = sum(n_decided(s) for s in admitted) if last and self.wire.head_last else 0
                if n_head:
                    cost_ms = batch_verify_ms(self.platform, n_head, stage.rank)
                    yield from self._busy(stage.rank, owner, first.segment_id, "verify", n_head, 0, cost_ms)
                admitted = [stage.ledgers[s.request_id].catch_up(s)[1] for s in admitted]
            for seg in admitted:  # one message per request, as the runtime's wire carries them
                self._pass_on(stage, seg)

    def _pass_on(self, stage: _Stage, seg: Segment) -> None:
        """Send a forwarded segment to the next stage, or back to D0 from the last."""
        if stage.rank == len(self.stages):
            nbytes = self.wire.returned(len(seg), n_decided(seg))
            self._send(stage.rank, 0, "segment", nbytes, lambda s=seg: self._returned(s))
        else:
            nxt = self.stages[stage.rank]
            nbytes = self.wire.segment(len(seg), first_hop=False)
            self._send(stage.rank, nxt.rank, "segment", nbytes, lambda s=seg, n=nxt: self._arrive(n, s))

    @staticmethod
    def _ready(stage: _Stage) -> list[Segment]:
        """Take the first waiting group (`Segment.group`, as D0 formed it) once all of it is here
        and every member's prunes have arrived; [] until then. Groups go in arrival order."""
        if not stage.waiting:
            return []
        head = stage.waiting[0]
        members = [s for s in stage.waiting if s.group == head.group] if head.group >= 0 else [head]
        if len(members) < head.group_size:
            return []
        for seg in members:
            ledger = stage.ledgers.get(seg.request_id)
            if not (seg.reset or (ledger is not None and ledger.ready(seg))):
                return []
        chosen = {id(s) for s in members}
        stage.waiting = [s for s in stage.waiting if id(s) not in chosen]
        return members

    @staticmethod
    def _ledger(stage: _Stage, seg: Segment) -> StageLedger:
        if seg.reset:  # the request's first chunk: its own ledger, at its lane's prune version
            stage.ledgers[seg.request_id] = StageLedger(seg.version)
        return stage.ledgers[seg.request_id]

    def _returned(self, seg: Segment) -> None:
        if seg.kind is SegmentKind.PREFILL:
            argmax = np.full(len(seg), -1, dtype=np.int64)
            if seg.final:
                argmax[-1] = self.target.after(self.prompts[seg.request_id])
        else:
            argmax = self.target.argmax(seg.node_ids)
        n_rows = n_decided(seg)
        event = SegmentReturned(seg.segment_id, seg.node_ids, seg.version, argmax=argmax)
        cost_ms = 0.0 if self.wire.head_last or not n_rows else self.platform.verify_ms(n_rows)
        self.d0_inbox.put((event, cost_ms, n_rows, seg.group, seg.group_size))  # its group: D0 handles it whole

    # ---- links ----------------------------------------------------------------------------------

    def _send(self, src: int, dst: int, kind: str, nbytes: int, deliver: Callable[[], object]) -> None:
        """Queue a message on the sender's link; `deliver` runs when it reaches `dst`.

        A FIFO link with one message on the wire at a time is fully described by when it next
        falls free, so a send is arithmetic plus one timeout — no process, no resource queue.
        """
        now = self.env.now
        t_send = max(now, self._link_free[src])
        self._link_free[src] = t_send + self.platform.send_ms(src, nbytes) / 1000.0
        t_recv = self._link_free[src] + self.platform.latency_ms(src, dst) / 1000.0
        self.transfers.append(LinkTransfer(run_id=self.run_id, source="sim", src=src, dst=dst, kind=kind,
                                           nbytes=nbytes, t_send_s=t_send, t_recv_s=t_recv))  # fmt: skip
        self.env.timeout(t_recv - now).callbacks.append(lambda _event: deliver())
