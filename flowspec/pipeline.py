"""PipelineCore: the draft node's (D0's) state machine, sans I/O.

Theory of operation
-------------------
`handle(event, now)` takes what happened and returns what to do next; it never waits, sends, sleeps
or reads a clock. One request is served at a time; later arrivals queue FIFO (a batching policy
serves several at once with one core per lane, `flowspec.batch`).

A request goes: prefill (prompt chunks stream through the stages; the last chunk's last row gives
the first token) → rounds. A round drafts a tree rooted at the last sampled token and streams it in
segments (`flowspec.policy` decides which). Each returned segment is verified against the target's
output (`flowspec.verify`); D0 then broadcasts exactly one `Prune`:

- the bonus token is an unverified child in the tree: keep the accepted path and that child's
  subtree, re-root there, expand (policy permitting) and send the new nodes as the next segment;
- otherwise (or on EOS / max_new_tokens): keep only the accepted path; the round (or request) ends.

Rules: (1) every decision about which nodes to verify, keep or send is made here or in `policy`;
(2) D0 mirrors the in-flight segments' rows and prunes them exactly as stages do, so a returned
segment whose rows differ from D0's expectation is a `ProtocolError`; (3) ids (segments, nodes,
drafts, prune versions) come from counters owned by this instance; (4) the only randomness is the
injected generator, used for sampling at T > 0.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from flowspec import policy as pol
from flowspec.config import Scenario
from flowspec.messages import (
    BroadcastPrune,
    Command,
    Draft,
    DraftDone,
    EmitTokens,
    Event,
    FinishRequest,
    ProtocolError,
    Prune,
    RequestArrived,
    Segment,
    SegmentKind,
    SegmentReturned,
    SendSegment,
)
from flowspec.order import prefill_chunks
from flowspec.records import RunRecords, StepOutcome
from flowspec.replay import RecordingDrafter, command_records
from flowspec.request import Recorder, RequestState
from flowspec.tree import Drafter, IntArray, descendant_mask, reroot
from flowspec.verify import IMPORTANCE, verify_greedy, verify_relaxed, verify_sampled


@dataclass(frozen=True, slots=True, eq=False)
class _InFlight:
    request_id: int
    round: int
    kind: SegmentKind
    sent_ids: IntArray  # rows as sent
    sent_version: int  # the prune version they reflected when sent
    final: bool


@dataclass(slots=True)
class IdCounters:
    """The next free segment, node and draft ids of a run. The lanes of a batched core share one,
    so ids stay unique across the requests served at once (the stages and the synthetic target key
    on them)."""

    segment: int = 0
    node: int = 0
    draft: int = 0


@dataclass(frozen=True, slots=True)
class _PendingDraft:
    request_id: int
    round: int
    new_ids: IntArray  # ids of the drafted nodes, in tree order
    sizes: tuple[int, ...]  # how they split into segments


class PipelineCore:
    def __init__(
        self,
        scenario: Scenario,
        drafter: Drafter,
        rng: np.random.Generator,
        *,
        run_id: str = "run",
        source: str = "core",
        trace: bool = False,
        ids: IdCounters | None = None,
        recorder: Recorder | None = None,
        outputs: dict[int, list[int]] | None = None,
        lane: int = 0,
    ) -> None:
        """`ids`, `recorder` and `outputs` are shared by the lanes of a batched core
        (`flowspec.batch`); a core of its own makes its own. `lane`: this core's place in the
        batch, stamped on its segments and prunes."""
        self.lane = lane
        self.scenario = scenario
        self.rng = rng
        self.run_id = run_id
        self.source = source
        self._rec = Recorder(run_id, source) if recorder is None else recorder
        self.trace = trace
        self._rec.records.traced = trace
        self.drafter: Drafter = RecordingDrafter(drafter, self._rec.records.proposals, run_id, source) if trace else drafter
        self.outputs: dict[int, list[int]] = {} if outputs is None else outputs
        self._queue: deque[RequestState] = deque()
        self._active: RequestState | None = None
        self._in_flight: OrderedDict[int, _InFlight] = OrderedDict()
        self._pending: dict[int, _PendingDraft] = {}
        self._version = 0
        self._prunes: dict[int, IntArray] = {}  # version -> keep_ids, while a segment may need it
        self._ids = IdCounters() if ids is None else ids

    @property
    def records(self) -> RunRecords:
        return self._rec.records

    @property
    def active_request_id(self) -> int:
        """The request being served, -1 when none: what D0's own spans are charged to."""
        return -1 if self._active is None else self._active.request_id

    def lane_for(self, event: Event) -> PipelineCore | None:
        """The core that handles `event` (a batched core's lanes answer for theirs): this one."""
        return self

    @property
    def idle(self) -> bool:
        """No request active or queued and nothing in flight: the core waits for an arrival."""
        return self._active is None and not self._queue and not self._in_flight

    @property
    def tree_size(self) -> int:
        """Nodes in the active request's draft tree, root included (0 when there is none): what
        D0's own bookkeeping per step (verify, prune, re-root, merge, segment) scales with."""
        req = self._active
        return 0 if req is None or req.tree is None else len(req.tree)

    # ---- events ---------------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Command]:
        cmds = self._handle(event, now)
        if self.trace:
            commands = self._rec.records.commands
            commands += command_records(self.run_id, self.source, len(commands), cmds)
        return cmds

    def _handle(self, event: Event, now: float) -> list[Command]:
        if isinstance(event, SegmentReturned):
            return self._on_returned(event, now)
        if isinstance(event, DraftDone):
            return self._on_draft_done(event)
        if isinstance(event, RequestArrived):
            max_new = event.max_new_tokens or self.scenario.decoding.max_new_tokens
            t_arrival = now if event.t_arrival_s is None else event.t_arrival_s
            self._queue.append(RequestState(event.request_id, tuple(event.prompt), max_new, t_arrival))
            return self._maybe_start(now)
        raise TypeError(f"not an event: {event!r}")

    def _maybe_start(self, now: float) -> list[Command]:
        if self._active is not None or self._in_flight or not self._queue:
            return []
        req = self._active = self._queue.popleft()
        req.t_start_s = now
        req.context = list(req.prompt)
        self.outputs[req.request_id] = req.output
        cmds: list[Command] = []
        start = 0
        sizes = prefill_chunks(len(req.prompt))
        for i, size in enumerate(sizes):
            rows = np.arange(start, start + size)
            seg = Segment(
                request_id=req.request_id,
                round=-1,
                segment_id=self._new_segment_id(),
                kind=SegmentKind.PREFILL,
                node_ids=np.full(size, -1, dtype=np.int64),
                tokens=np.array(req.prompt[start : start + size], dtype=np.int64),
                parent_ids=np.full(size, -1, dtype=np.int64),
                positions=rows.astype(np.int64),
                version=self._version,
                reset=i == 0,
                final=i == len(sizes) - 1,
                lane=self.lane,
            )
            cmds.append(self._send(seg))
            start += size
        return cmds

    def _on_returned(self, ev: SegmentReturned, now: float) -> list[Command]:
        if not self._in_flight:
            raise ProtocolError(f"segment {ev.segment_id} returned but none is in flight")
        oldest = next(iter(self._in_flight))
        if ev.segment_id != oldest:
            raise ProtocolError(f"segment {ev.segment_id} returned before segment {oldest}")
        fl = self._in_flight.pop(oldest)
        returned = np.asarray(ev.node_ids, dtype=np.int64)
        if not fl.sent_version <= ev.version <= self._version:
            raise ProtocolError(
                f"segment {ev.segment_id} returned at prune v{ev.version}; sent at "
                f"v{fl.sent_version}, latest v{self._version}"
            )
        expected = fl.sent_ids[self._surviving(fl.sent_ids, fl.sent_version, ev.version)]
        if not np.array_equal(returned, expected):
            raise ProtocolError(
                f"segment {ev.segment_id} returned rows {returned.tolist()} at v{ev.version}, "
                f"expected {expected.tolist()}: a prune was applied twice or not at all"
            )
        # Prunes the stages had not applied yet: D0 applies them here, once.
        rows = self._surviving(returned, ev.version, self._version)
        self._forget_prunes()
        req = self._active
        assert req is not None
        if self.trace and ev.argmax is not None and (fl.final or fl.kind is SegmentKind.TREE):
            self._rec.decisions(req, ev.segment_id, returned, ev.argmax, final_only=fl.kind is SegmentKind.PREFILL)
        if fl.kind is SegmentKind.PREFILL:
            return self._on_prefill(req, fl, ev, now)
        req.step += 1
        stale = req.finish_reason or fl.round != req.round
        if stale or len(rows) == 0:
            self._rec.step(req, fl.round, ev.segment_id, now, StepOutcome.EMPTY, n_verified=0)
            if req.finish_reason:
                return self._maybe_finish_drain(now)
            if not stale and pol.spec(self.scenario.policy).refills_emptied:
                return self._expand(req)  # the emptied segment's place in the pipeline gets new work
            return []
        for node, row in zip(returned[rows].tolist(), rows.tolist()):
            req.targets[node] = self._target_row(ev, row)
        if pol.verifies_whole_tree(self.scenario.policy) and any(
            f.round == req.round for f in self._in_flight.values()
        ):
            return []  # chunked baselines verify once the whole tree is back
        return self._verify(req, ev.segment_id, now)

    def _on_prefill(self, req: RequestState, fl: _InFlight, ev: SegmentReturned, now: float) -> list[Command]:
        if not fl.final:
            return []
        token = self._sample_last(ev)
        req.t_first_token_s = now
        emitted, _, stop = req.emit([token], self.scenario.decoding.eos_token_id)
        cmds: list[Command] = [EmitTokens(req.request_id, tuple(emitted))]
        self._rec.step(
            req, fl.round, ev.segment_id, now, StepOutcome.PREFILL,
            n_verified=len(fl.sent_ids), bonus=token, n_emitted=len(emitted),
        )  # fmt: skip
        if stop:
            return cmds + self._finish(req, stop, now)
        return cmds + self._begin_round(req, token, now)

    def _on_draft_done(self, ev: DraftDone) -> list[Command]:
        pending = self._pending.pop(ev.draft_id)
        req = self._active
        if req is None or req.finish_reason or pending.request_id != req.request_id:
            return []
        if pending.round != req.round or req.tree is None:
            return []
        cmds: list[Command] = []
        start = 0
        for size in pending.sizes:
            ids = pending.new_ids[start : start + size]
            start += size
            alive = ids[np.isin(ids, req.tree.ids)]  # a prune may have landed while drafting
            if len(alive):
                cmds.append(self._send(self._tree_segment(req, alive)))
        return cmds

    # ---- verification ---------------------------------------------------------------------------

    def _verify(self, req: RequestState, segment_id: int, now: float) -> list[Command]:
        tree = req.tree
        assert tree is not None
        verified = np.array([int(node) in req.targets for node in tree.ids])
        rows = [req.targets.get(int(node)) for node in tree.ids]
        if self.scenario.decoding.temperature > 0:
            verdict = verify_sampled(tree, verified, rows, self.rng)
        elif self.scenario.relaxed:  # rows are (argmax, distribution) pairs
            argmax = np.array([-1 if r is None else r[0] for r in rows])
            dsd = self.scenario.dsd
            verdict = verify_relaxed(tree, verified, argmax, [None if r is None else r[1] for r in rows], dsd.tau,
                                     IMPORTANCE[dsd.importance])  # fmt: skip
        else:
            verdict = verify_greedy(tree, verified, np.array([-1 if r is None else r for r in rows]))
        self._rec.nodes(req, tree, verified, verdict.accepted)
        accepted_tokens = tree.tokens[verdict.accepted].tolist()
        emitted, n_trimmed, stop = req.emit(
            accepted_tokens[1:] + [verdict.bonus_token], self.scenario.decoding.eos_token_id
        )
        req.context.extend(accepted_tokens)
        req.round_steps += 1
        cont = verdict.next_root >= 0 and not stop
        keep = verdict.accepted
        if cont:
            keep = np.concatenate([keep, np.flatnonzero(descendant_mask(tree.parents, verdict.next_root))])
        keep_sent = keep[keep < req.n_sent]
        self._version += 1
        prune = Prune(
            request_id=req.request_id,
            round=req.round,
            version=self._version,
            keep_ids=tree.ids[keep_sent],
            n_accepted=verdict.n_accepted,
            round_exit=not cont,
            lane=self.lane,
        )
        self._prunes[self._version] = prune.keep_ids
        reroot_offset = -1
        if cont:
            root_id = int(tree.ids[verdict.next_root])
            for k, fl in enumerate(self._in_flight.values()):
                if root_id in fl.sent_ids:
                    reroot_offset = k + 1
        cmds: list[Command] = [BroadcastPrune(prune)]
        if emitted:
            cmds.append(EmitTokens(req.request_id, tuple(emitted)))
        n_expanded = 0
        if cont:
            req.tree, kept = reroot(tree, verdict.next_root)
            req.n_sent = int((kept < req.n_sent).sum())
            req.targets = {int(n): req.targets[int(n)] for n in req.tree.ids if int(n) in req.targets}
            assert int(req.tree.positions[0]) == len(req.context), "the new root sits at the committed length"
            n_before = len(req.tree)
            cmds += self._expand(req)
            n_expanded = len(req.tree) - n_before
            outcome = StepOutcome.CONTINUE
        else:
            outcome = StepOutcome.FINISH if stop else StepOutcome.EXIT
        self._rec.step(
            req, req.round, segment_id, now, outcome, n_verified=int(verified.sum()),
            n_accepted=verdict.n_accepted, n_emitted=len(emitted), bonus=verdict.bonus_token,
            reroot_offset=reroot_offset, n_pruned=len(tree) - len(keep), n_expanded=n_expanded,
            n_trimmed=n_trimmed, n_relaxed=verdict.n_relaxed, relaxing=self.scenario.relaxed,
        )  # fmt: skip
        if cont:
            return cmds
        self._rec.round(req, now)
        if stop:
            return cmds + self._finish(req, stop, now)
        return cmds + self._begin_round(req, verdict.bonus_token, now)

    def _surviving(self, ids: IntArray, since: int, until: int) -> IntArray:
        """Rows of `ids` that survive prunes since+1..until, in order (stages do the same)."""
        rows = np.arange(len(ids))
        for v in range(since + 1, until + 1):
            rows = rows[np.isin(ids[rows], self._prunes[v])]
        return rows

    def _forget_prunes(self) -> None:
        oldest = min((f.sent_version for f in self._in_flight.values()), default=self._version)
        for v in [v for v in self._prunes if v <= oldest]:
            del self._prunes[v]

    def _target_row(self, ev: SegmentReturned, i: int) -> object:
        if self.scenario.decoding.temperature > 0:
            if ev.probs is None:
                raise ProtocolError(f"segment {ev.segment_id}: T > 0 needs target probabilities")
            return ev.probs[i]
        if self.scenario.relaxed and ev.probs is None:
            raise ProtocolError(f"segment {ev.segment_id}: relaxed acceptance (dsd.tau > 0) needs target probabilities")
        if ev.argmax is None:
            raise ProtocolError(f"segment {ev.segment_id}: T = 0 needs the target's argmax")
        token = int(ev.argmax[i])
        if token < 0:
            raise ProtocolError(f"segment {ev.segment_id}: row {i} has no target decision (argmax {token})")
        return (token, ev.probs[i]) if self.scenario.relaxed else token

    def _sample_last(self, ev: SegmentReturned) -> int:
        row = self._target_row(ev, -1)
        if isinstance(row, tuple):  # relaxed: the first token is the target's own
            return row[0]
        if isinstance(row, int):
            return row
        p = np.asarray(row, dtype=np.float64)
        return int(self.rng.choice(len(p), p=p / p.sum()))

    # ---- rounds, drafting, sending ---------------------------------------------------------------

    def _begin_round(self, req: RequestState, root_token: int, now: float) -> list[Command]:
        req.start_round(now)
        self._drafting_for(req)
        counter = pol.CountingDrafter(self.drafter)
        drafted = pol.initial_tree(self.scenario, counter, np.array(req.context), root_token, self._ids.node)
        self._ids.node = drafted.next_id
        req.tree = drafted.tree
        return self._after_draft(req, counter, drafted.sizes)

    def _expand(self, req: RequestState) -> list[Command]:
        assert req.tree is not None
        self._drafting_for(req)
        counter = pol.CountingDrafter(self.drafter)
        drafted = pol.expand(self.scenario, counter, np.array(req.context), req.tree, self._ids.node)
        if drafted is None:
            return []
        self._ids.node = drafted.next_id
        req.tree = drafted.tree
        return self._after_draft(req, counter, drafted.sizes)

    def _drafting_for(self, req: RequestState) -> None:
        if isinstance(self.drafter, RecordingDrafter):
            self.drafter.request_id = req.request_id

    def _after_draft(self, req: RequestState, counter: pol.CountingDrafter, sizes: list[int]) -> list[Command]:
        assert req.tree is not None
        n_new = sum(sizes)
        pending = _PendingDraft(
            req.request_id, req.round, req.tree.ids[len(req.tree) - n_new :], tuple(sizes)
        )
        draft_id = self._ids.draft
        self._ids.draft += 1
        self._pending[draft_id] = pending
        if counter.n_calls == 0:  # nothing was drafted (ar-pp): send at once
            return self._on_draft_done(DraftDone(draft_id))
        return [Draft(draft_id, req.request_id, counter.n_calls, counter.n_rows, n_new)]

    def _tree_segment(self, req: RequestState, ids: IntArray) -> Segment:
        tree = req.tree
        assert tree is not None
        idx = np.searchsorted(tree.ids, ids)
        assert idx[0] == req.n_sent and (np.diff(idx) == 1).all(), "segments are sent in tree order"
        req.n_sent += len(idx)
        req.round_sent += len(idx)
        parents = tree.parents[idx]
        return Segment(
            request_id=req.request_id,
            round=req.round,
            segment_id=self._new_segment_id(),
            kind=SegmentKind.TREE,
            node_ids=tree.ids[idx],
            tokens=tree.tokens[idx],
            parent_ids=np.where(parents >= 0, tree.ids[np.maximum(parents, 0)], -1),
            positions=tree.positions[idx],
            version=self._version,
            lane=self.lane,
        )

    def _send(self, seg: Segment) -> SendSegment:
        self._in_flight[seg.segment_id] = _InFlight(
            seg.request_id, seg.round, seg.kind, seg.node_ids.copy(), seg.version, seg.final
        )
        return SendSegment(seg)

    def _new_segment_id(self) -> int:
        self._ids.segment += 1
        return self._ids.segment - 1

    # ---- ends -----------------------------------------------------------------------------------

    def _finish(self, req: RequestState, reason: str, now: float) -> list[Command]:
        req.finish_reason = reason
        req.tree = None
        self._rec.request(req, now)
        return [FinishRequest(req.request_id, reason)] + self._maybe_finish_drain(now)

    def _maybe_finish_drain(self, now: float) -> list[Command]:
        if self._in_flight:
            return []  # stale segments still drain through the stages
        self._active = None
        return self._maybe_start(now)
