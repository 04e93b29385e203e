"""Trace and replay: what a run must record so that another backend can repeat its decisions.

Theory of operation
-------------------
The core's decisions depend on two model-dependent inputs only: the drafter's proposals and the
target's decisions (DESIGN §2). A traced run (`PipelineCore(trace=True)`) records both, in the
order the core asked for them, and every command the core issued:

- `RecordingDrafter` wraps the drafter: one `ProposalRecord` per frontier row per rank;
- the core records each returned row's target argmax (`DecisionRecord`) and each command
  (`CommandRecord`, its content as canonical text from `command_detail`).

Replaying is the reverse: `ReplayDrafter` answers the core's calls in order with the recorded
proposals, `ReplayTarget` answers for returned rows with the recorded argmax. Which rows a
verification sees does not depend on timing — D0 applies any prune the stages had not applied yet
(`PipelineCore._on_returned`) — so with the same requests the replaying core must ask the same
questions and issue the same commands: anything else is a `ReplayMismatch`, which names the first
call or command that differs. Greedy decoding (T = 0) only: sampled runs draw from the core's rng.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flowspec.messages import BroadcastPrune, Command, Draft, EmitTokens, FinishRequest, SendSegment
from flowspec.records import CommandRecord, ProposalRecord
from flowspec.tree import Drafter, DraftTree, IntArray


class ReplayMismatch(RuntimeError):
    """A replay asked for something the recorded run did not: the two cores diverged."""


def _ids(values: IntArray) -> str:
    return " ".join(map(str, np.asarray(values).tolist()))


def command_detail(cmd: Command) -> tuple[str, int, str]:
    """(kind, request id, canonical content) of a command: equal texts mean equal commands."""
    if isinstance(cmd, SendSegment):
        s = cmd.segment
        return "send", s.request_id, (
            f"segment {s.segment_id} {s.kind} round {s.round} v{s.version} reset {int(s.reset)} final {int(s.final)}"
            f" | ids {_ids(s.node_ids)} | tokens {_ids(s.tokens)} | parents {_ids(s.parent_ids)}"
            f" | positions {_ids(s.positions)}"
        )
    if isinstance(cmd, BroadcastPrune):
        p = cmd.prune
        return "prune", p.request_id, (f"v{p.version} round {p.round} accepted {p.n_accepted} exit {int(p.round_exit)}"
                                       f" | keep {_ids(p.keep_ids)}")  # fmt: skip
    if isinstance(cmd, Draft):
        return "draft", cmd.request_id, f"draft {cmd.draft_id} calls {cmd.n_calls} rows {cmd.n_rows} nodes {cmd.n_nodes}"
    if isinstance(cmd, EmitTokens):
        return "emit", cmd.request_id, _ids(np.array(cmd.tokens, dtype=np.int64))
    if isinstance(cmd, FinishRequest):
        return "finish", cmd.request_id, cmd.reason
    raise TypeError(f"not a command: {cmd!r}")


def command_records(run_id: str, source: str, first_seq: int, cmds: Sequence[Command]) -> list[CommandRecord]:
    out = []
    for i, cmd in enumerate(cmds):
        kind, request_id, detail = command_detail(cmd)
        out.append(CommandRecord(run_id=run_id, source=source, seq=first_seq + i, command=kind,
                                 request_id=request_id, detail=detail))  # fmt: skip
    return out


class RecordingDrafter:
    """A drafter that records every proposal it makes (into `records`, a list it appends to)."""

    def __init__(self, inner: Drafter, records: list[ProposalRecord], run_id: str, source: str) -> None:
        self.inner = inner
        self.records = records
        self.run_id = run_id
        self.source = source
        self.request_id = -1  # set by the core before each drafting
        self._calls = 0

    def __getattr__(self, name: str):  # `observe` and other extras of the wrapped drafter
        return getattr(self.inner, name)

    def propose(self, context: IntArray, pool: DraftTree, frontier: IntArray, k: int) -> tuple[IntArray, np.ndarray]:
        tokens, logp = self.inner.propose(context, pool, frontier, k)
        call = self._calls
        self._calls += 1
        tok, lp = np.asarray(tokens), np.asarray(logp, dtype=np.float64)
        for row, node in enumerate(pool.ids[frontier].tolist()):
            for rank in range(tok.shape[1]):
                self.records.append(ProposalRecord(run_id=self.run_id, source=self.source, call=call,
                                                   request_id=self.request_id, node_id=int(node), rank=rank,
                                                   token=int(tok[row, rank]), logp=float(lp[row, rank])))  # fmt: skip
        return tokens, logp


class ReplayDrafter:
    """Answers drafter calls, in order, with a run's recorded proposals.

    `call`, `node_id`, `rank`, `token`, `logp` are the columns of the run's proposals frame
    (one row per frontier node per rank, calls in order)."""

    def __init__(self, call: IntArray, node_id: IntArray, rank: IntArray, token: IntArray, logp: np.ndarray) -> None:
        order = np.argsort(call, kind="stable")  # by call; rows (node by node, rank by rank) keep their order
        call, node_id, rank = np.asarray(call)[order], np.asarray(node_id)[order], np.asarray(rank)[order]
        token, logp = np.asarray(token)[order], np.asarray(logp, dtype=np.float64)[order]
        bounds = np.flatnonzero(np.r_[True, call[1:] != call[:-1], True]) if len(call) else np.zeros(1, dtype=np.int64)
        self._calls: list[tuple[IntArray, IntArray, np.ndarray]] = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            k = int(rank[a:b].max()) + 1
            nodes = node_id[a:b:k]
            self._calls.append((nodes, token[a:b].reshape(-1, k), logp[a:b].reshape(-1, k)))
        self.n_calls = 0

    @property
    def exhausted(self) -> bool:
        return self.n_calls == len(self._calls)

    def propose(self, context: IntArray, pool: DraftTree, frontier: IntArray, k: int) -> tuple[IntArray, np.ndarray]:
        i = self.n_calls
        if i >= len(self._calls):
            raise ReplayMismatch(f"drafter call {i}: the recorded run made only {len(self._calls)} calls")
        nodes, tokens, logp = self._calls[i]
        asked = pool.ids[frontier]
        if not np.array_equal(asked, nodes):
            raise ReplayMismatch(f"drafter call {i}: asked for frontier nodes {asked.tolist()}, "
                                 f"the recorded run asked for {nodes.tolist()}")  # fmt: skip
        if tokens.shape[1] < k:
            raise ReplayMismatch(f"drafter call {i}: asked for top-{k}, the recorded run has {tokens.shape[1]} ranks")
        self.n_calls += 1
        return tokens[:, :k].copy(), logp[:, :k].copy()


class ReplayTarget:
    """The target's recorded decisions: the argmax per returned tree node, and the first token after
    each prompt. Same interface as the simulator's synthetic `ContextOracle`."""

    def __init__(self, node_argmax: dict[int, int], first_tokens: dict[tuple[int, ...], int]) -> None:
        self.node_argmax = node_argmax
        self.first_tokens = first_tokens

    def register(self, *args: object) -> None:
        """Nothing to learn from a sent segment: decisions are looked up by node id."""

    def forget(self) -> None:
        """Node ids are unique within a run: nothing to drop between requests."""

    def argmax(self, node_ids: IntArray) -> IntArray:
        """Recorded argmax per row; -1 for a row the run's stages pruned in flight. Such a row reaches
        the replay's D0 only when a prune overtook it there later than in the run, and D0 then drops
        it unread (a verified row without a decision would be a `ProtocolError` of the core)."""
        return np.array([self.node_argmax.get(node, -1) for node in np.asarray(node_ids).tolist()], dtype=np.int64)

    def after(self, tokens: Sequence[int]) -> int:
        key = tuple(int(t) for t in tokens)
        if key not in self.first_tokens:
            raise ReplayMismatch(f"no recorded first token after a prompt of {len(key)} tokens")
        return self.first_tokens[key]
