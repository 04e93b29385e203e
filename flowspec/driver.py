"""An in-memory, discrete-event driver: the core, N emulated stages and a `HashLM` target.

Theory of operation
-------------------
This is the smallest honest backend. Each verification stage is an emulated device with a FIFO
inbox, a `StageLedger` and a real (hash) KV cache; it follows the ledger protocol exactly as a
runtime stage worker does: sync the KV, admit the segment, forward under the tree mask, append,
then sync and admit again before sending the surviving rows on. D0 is a serial device that charges
verification and drafting time and feeds `PipelineCore`. Links are FIFO per (src, dst) pair, as
ZeroMQ delivers; pruning messages travel on their own links, so they can overtake or trail the
segments they prune — stages wait for the prunes a segment already reflects.

All delays come from `Delays` and an injected generator, so tests can shake the interleavings.
Rule: no decision is made here; every choice of what to verify, keep or send is the core's.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from flowspec.config import Scenario
from flowspec.kv import StageLedger
from flowspec.messages import (
    BroadcastPrune,
    Command,
    Draft,
    DraftDone,
    EmitTokens,
    Event,
    FinishRequest,
    Prune,
    RequestArrived,
    Segment,
    SegmentReturned,
    SendSegment,
    payload_nbytes,
)
from flowspec.order import near_equal
from flowspec.batch import make_core
from flowspec.policy import device_scenario, spec
from flowspec.records import LinkTransfer, RunResult, StageSpan
from flowspec.synthetic import HashLM
from flowspec.tree import Drafter


@dataclass(frozen=True, slots=True, kw_only=True)
class Delays:
    """Time model, in seconds. Each draw is multiplied by U(1 - jitter, 1 + jitter)."""

    stage_s: float = 0.010  # per forward, per stage
    stage_s_per_token: float = 0.0005
    link_s: float = 0.002  # per message, any link
    broadcast_s: float = 0.001  # D0 -> each stage, pruning messages
    verify_s: float = 0.002  # D0: LM head over a returned segment
    draft_s_per_call: float = 0.003  # D0: one drafter forward
    jitter: float = 0.0  # 0: exact, reproducible timelines


@dataclass(slots=True)
class _Stage:
    rank: int
    first_layer: int  # 1-based global index of its first layer
    n_layers: int
    # One ledger and KV per request, from its first prompt chunk on (a batching policy serves several
    # at once; the others one after another).
    ledgers: dict[int, StageLedger] = field(default_factory=dict)
    kvs: dict[int, np.ndarray] = field(default_factory=dict)
    inbox: deque[tuple[Segment, np.ndarray]] = field(default_factory=deque)
    busy: bool = False


class InMemoryDriver:
    def __init__(
        self,
        scenario: Scenario,
        drafter: Drafter,
        model: HashLM,
        *,
        delays: Delays = Delays(),
        delay_rng: np.random.Generator | None = None,
        run_id: str = "run",
        distributions: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """`distributions`: the target's next-token distributions [L, V] given its argmax [L], for
        policies that read them at T = 0 (dsd with tau > 0); the hash model has only an argmax."""
        scenario = device_scenario(scenario)
        self.scenario = scenario
        self.model = model
        self.distributions = distributions
        self.delays = delays
        self.run_id = run_id
        self._rng = delay_rng or np.random.default_rng(scenario.seed)
        self.batched = spec(scenario.policy).batched
        self.core = make_core(scenario, drafter, np.random.default_rng(scenario.seed), run_id=run_id, source="inmemory")
        n_stages = scenario.pipeline.n_stages
        assert model.n_layers >= n_stages, "every stage needs at least one layer"
        self.stages: list[_Stage] = []
        first = 1
        for rank, n_layers in enumerate(near_equal(model.n_layers, n_stages), start=1):
            self.stages.append(_Stage(rank, first, n_layers))
            first += n_layers
        self._heap: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._seq = itertools.count()
        self._link_free: dict[tuple[int, int, str], float] = {}
        self._d0_inbox: deque[tuple[Event, float, int]] = deque()  # event, cost, n_tokens
        self._d0_busy = False
        self._spans: list[StageSpan] = []
        self._transfers: list[LinkTransfer] = []

    # ---- public ---------------------------------------------------------------------------------

    def run(self, requests: list[tuple[float, list[int]]]) -> RunResult:
        """Serve `(arrival_s, prompt)` requests to completion; outputs by request id (list order)."""
        for rid, (t_arrival, prompt) in enumerate(requests):
            self._at(t_arrival, self._to_d0, RequestArrived(rid, tuple(prompt)), 0.0, len(prompt))
        t_end = 0.0
        while self._heap:
            t_end, _, fn, args = heapq.heappop(self._heap)
            fn(t_end, *args)
        if not self.core.idle or any(s.inbox or s.busy for s in self.stages):
            raise RuntimeError(f"run {self.run_id!r} stalled: the core is not idle after the last event")
        records = self.core.records
        records.stage_spans = list(self._spans)
        records.link_transfers = list(self._transfers)
        return RunResult(self.core.outputs, records, t_end)

    # ---- plumbing -------------------------------------------------------------------------------

    def _at(self, t: float, fn: Callable[..., None], *args: object) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn, args))

    def _draw(self, base_s: float) -> float:
        j = self.delays.jitter
        return base_s * (self._rng.uniform(1 - j, 1 + j) if j > 0 else 1.0)

    def _send(self, t: float, src: int, dst: int, kind: str, nbytes: int, fn: Callable[..., None], *args: object) -> None:
        """FIFO per (src, dst, kind): a message never overtakes an earlier one on the same link."""
        base = self.delays.broadcast_s if kind == "prune" else self.delays.link_s
        link = (src, dst, kind)
        t_recv = max(t + self._draw(base), self._link_free.get(link, 0.0))
        self._link_free[link] = t_recv
        self._transfers.append(LinkTransfer(run_id=self.run_id, source="inmemory", src=src, dst=dst, kind=kind,
                                            nbytes=nbytes, t_send_s=t, t_recv_s=t_recv))  # fmt: skip
        self._at(t_recv, fn, *args)

    def _nbytes(self, n_rows: int, first_hop: bool) -> int:
        m = self.scenario.model
        return payload_nbytes(n_rows, hidden_size=m.hidden_size, dtype_bytes=m.dtype_bytes, first_hop=first_hop)

    # ---- draft node -----------------------------------------------------------------------------

    def _to_d0(self, t: float, event: Event, cost_s: float, n_tokens: int, front: bool = False) -> None:
        (self._d0_inbox.appendleft if front else self._d0_inbox.append)((event, cost_s, n_tokens))
        self._d0_next(t)

    def _d0_next(self, t: float) -> None:
        if self._d0_busy or not self._d0_inbox:
            return
        event, cost_s, n_tokens = self._d0_inbox.popleft()
        self._d0_busy = True
        kind = "draft" if isinstance(event, DraftDone) else "verify"
        if cost_s > 0:
            request_id = self.core.active_request_id
            segment_id = event.segment_id if isinstance(event, SegmentReturned) else -1
            self._spans.append(StageSpan(run_id=self.run_id, source="inmemory", request_id=request_id, stage=0,
                                         segment_id=segment_id, kind=kind, n_tokens=n_tokens, kv_len=0,
                                         t_start_s=t, t_end_s=t + cost_s))  # fmt: skip
        self._at(t + cost_s, self._d0_handle, event)

    def _d0_handle(self, t: float, event: Event) -> None:
        self._d0_busy = False
        for cmd in self.core.handle(event, now=t):
            self._execute(t, cmd)
        self._d0_next(t)

    def _execute(self, t: float, cmd: Command) -> None:
        if isinstance(cmd, SendSegment):
            seg = cmd.segment
            h = self.model.embed_rows(seg.tokens)
            self._send(t, 0, 1, "segment", self._nbytes(len(seg), True), self._to_stage, 0, seg, h)
        elif isinstance(cmd, BroadcastPrune):
            for k in range(len(self.stages)):
                self._send(t, 0, k + 1, "prune", cmd.prune.nbytes, self._prune_at_stage, k, cmd.prune)
        elif isinstance(cmd, Draft):
            cost = self._draw(self.delays.draft_s_per_call) * cmd.n_calls
            self._to_d0(t, DraftDone(cmd.draft_id), cost, cmd.n_rows, front=True)
        else:
            assert isinstance(cmd, (EmitTokens, FinishRequest)), cmd  # the core records both

    # ---- stages ---------------------------------------------------------------------------------

    def _prune_at_stage(self, t: float, k: int, prune: Prune) -> None:
        stage = self.stages[k]
        stage.ledgers[prune.request_id].receive(prune)
        if not stage.busy:
            self._compact(stage, prune.request_id, stage.ledgers[prune.request_id].sync())
        self._stage_next(t, k)

    def _to_stage(self, t: float, k: int, seg: Segment, h: np.ndarray) -> None:
        self.stages[k].inbox.append((seg, h))
        self._stage_next(t, k)

    def _compact(self, stage: _Stage, request_id: int, slots: np.ndarray | None) -> None:
        if slots is not None:
            stage.kvs[request_id] = stage.kvs[request_id][slots]

    def _next_ready(self, stage: _Stage) -> int | None:
        """The inbox item to run next: the head, once its prunes are here; a batching policy's stage
        also runs a later request's segment while an earlier one waits (in order per request)."""
        blocked = set()
        for i, (seg, _) in enumerate(stage.inbox):
            ledger = stage.ledgers.get(seg.request_id)
            if seg.request_id not in blocked and (seg.reset or (ledger is not None and ledger.ready(seg))):
                return i
            if not self.batched:
                return None
            blocked.add(seg.request_id)
        return None

    def _stage_next(self, t: float, k: int) -> None:
        stage = self.stages[k]
        i = None if stage.busy else self._next_ready(stage)
        if i is None:
            return
        seg, h = stage.inbox[i]
        del stage.inbox[i]
        if seg.reset:  # the request's first chunk: a fresh ledger at the version it carries, an empty KV
            stage.ledgers[seg.request_id] = StageLedger(seg.version)
            stage.kvs[seg.request_id] = np.zeros((0, stage.n_layers), dtype=np.uint64)
        ledger = stage.ledgers[seg.request_id]
        slots, seg, rows = ledger.catch_up(seg)
        self._compact(stage, seg.request_id, slots)
        h = h[rows]
        if len(seg) == 0:  # emptied by pruning: pass the marker on, nothing to run
            self._stage_done(t, k, seg, h)
            return
        visible = ledger.visibility(seg)  # [n, kv_len + n]
        kv_len = ledger.kv_len
        kv = stage.kvs[seg.request_id]
        h_out, new_kv = self.model.forward_rows(h, seg.positions, kv, visible, stage.first_layer)
        stage.kvs[seg.request_id] = np.vstack([kv, new_kv])
        ledger.append(seg)
        stage.busy = True
        cost = self._draw(self.delays.stage_s + self.delays.stage_s_per_token * len(seg))
        self._spans.append(
            StageSpan(run_id=self.run_id, source="inmemory", request_id=seg.request_id, stage=stage.rank,
                      segment_id=seg.segment_id, kind=str(seg.kind), n_tokens=len(seg), kv_len=kv_len,
                      t_start_s=t, t_end_s=t + cost)
        )  # fmt: skip
        self._at(t + cost, self._stage_done, k, seg, h_out)

    def _stage_done(self, t: float, k: int, seg: Segment, h: np.ndarray) -> None:
        stage = self.stages[k]
        stage.busy = False
        slots, seg, rows = stage.ledgers[seg.request_id].catch_up(seg)  # prunes that arrived during the forward
        self._compact(stage, seg.request_id, slots)
        h = h[rows]
        nbytes = self._nbytes(len(seg), False)
        if k + 1 < len(self.stages):
            self._send(t, stage.rank, stage.rank + 1, "segment", nbytes, self._to_stage, k + 1, seg, h)
        else:
            self._send(t, stage.rank, 0, "segment", nbytes, self._returned, seg, h)
        self._stage_next(t, k)

    def _returned(self, t: float, seg: Segment, h: np.ndarray) -> None:
        argmax = self.model.next_tokens(h)
        probs = None if self.distributions is None else self.distributions(np.asarray(argmax))
        event = SegmentReturned(seg.segment_id, seg.node_ids, seg.version, argmax=argmax, probs=probs)
        self._to_d0(t, event, self._draw(self.delays.verify_s) if len(seg) else 0.0, len(seg))
