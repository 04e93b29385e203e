"""PipelineCore as a state machine: literal event → command timelines, protocol errors, determinism."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from flowspec.config import DecodingConfig, ExpansionConfig, PipelineConfig, Policy, Scenario, TreeConfig
from flowspec.driver import Delays, InMemoryDriver
from flowspec.messages import (
    BroadcastPrune,
    Draft,
    DraftDone,
    EmitTokens,
    FinishRequest,
    RequestArrived,
    SegmentReturned,
    SendSegment,
)
from flowspec.pipeline import PipelineCore, ProtocolError
from flowspec.synthetic import TableDrafter, GroundTruth, HashLM, OracleDrafter


# Proposals by the frontier node's token path, root first.
PATH_TABLE = {
    (10,): ([11, 12], [-0.1, -1.0]),
    (10, 11): ([13, 14], [-0.2, -2.0]),
    (10, 12): ([15, 16], [-0.5, -0.6]),
    (12,): ([15, 17], [-0.5, -0.7]),
}


def PathDrafter() -> TableDrafter:
    return TableDrafter(PATH_TABLE, default=([20, 21], [-0.1, -0.2]))


def literal_core() -> PipelineCore:
    scenario = Scenario(
        policy=Policy.FLOWSPEC,
        decoding=DecodingConfig(max_new_tokens=4),
        pipeline=PipelineConfig(n_stages=2),
        tree=TreeConfig(total=4, topk=2, depth=1, segment_size=2),
        expansion=ExpansionConfig(total=2, topk=2, depth=0),
    )
    return PipelineCore(scenario, PathDrafter(), np.random.default_rng(0))


def describe(cmds) -> list[tuple]:
    out = []
    for c in cmds:
        if isinstance(c, SendSegment):
            s = c.segment
            out.append(("send", s.segment_id, str(s.kind), s.node_ids.tolist(), s.tokens.tolist(),
                        s.parent_ids.tolist(), s.positions.tolist(), s.version))  # fmt: skip
        elif isinstance(c, BroadcastPrune):
            p = c.prune
            out.append(("prune", p.version, p.keep_ids.tolist(), p.n_accepted, p.round_exit))
        elif isinstance(c, Draft):
            out.append(("draft", c.draft_id, c.n_calls, c.n_rows, c.n_nodes))
        elif isinstance(c, EmitTokens):
            out.append(("emit", c.tokens))
        else:
            assert isinstance(c, FinishRequest)
            out.append(("finish", c.reason))
    return out


def test_flowspec_timeline_by_hand() -> None:
    """One request through prefill, a re-root two segments ahead, an expansion, an emptied segment.

    Prompt [1, 2, 3]; the target's first token is 10. Drafting from 10 (k=2, one beam iteration):
    pool 11 (-0.1), 12 (-1.0), 11→13 (-0.3), 11→14 (-2.1), 12→15 (-1.5), 12→16 (-1.6); the best 4 in
    score order are [10, 11, 13, 12, 15] with parents [-1, 0, 1, 0, 3] at positions [3, 4, 5, 4, 5].
    Three slots (2 stages + D0), segments ≤ 2: sizes near_equal(5, 3) = [1, 2, 2].
    Step 1: the root returns, the target says 12: node 3 (id 3) is in the segment two ahead →
    re-root, keep ids [0, 3, 4], a = 1. Expansion from 12 proposes 15 (exists, id 4) and 17 (new,
    id 5, parent 3, position 5). Step 2: segment [11, 13] comes back emptied. Step 3: [12, 15]
    returns, the target says 15 then 18: 15 is accepted, 18 is outside the tree; the output
    [10, 12, 15, 18] has reached max_new_tokens = 4, so the request finishes. Segment [17] drains.
    """
    core = literal_core()
    timeline = [
        (RequestArrived(0, (1, 2, 3)), [("send", 0, "prefill", [-1, -1, -1], [1, 2, 3], [-1, -1, -1], [0, 1, 2], 0)]),
        (SegmentReturned(0, np.array([-1, -1, -1]), 0, argmax=np.array([7, 7, 10])),
         [("emit", (10,)), ("draft", 0, 2, 3, 5)]),
        (DraftDone(0), [
            ("send", 1, "tree", [0], [10], [-1], [3], 0),
            ("send", 2, "tree", [1, 2], [11, 13], [0, 1], [4, 5], 0),
            ("send", 3, "tree", [3, 4], [12, 15], [0, 3], [4, 5], 0),
        ]),
        (SegmentReturned(1, np.array([0]), 0, argmax=np.array([12])),
         [("prune", 1, [0, 3, 4], 1, False), ("emit", (12,)), ("draft", 1, 1, 1, 1)]),
        (DraftDone(1), [("send", 4, "tree", [5], [17], [3], [5], 1)]),
        (SegmentReturned(2, np.array([], dtype=np.int64), 1, argmax=np.array([], dtype=np.int64)), []),
        (SegmentReturned(3, np.array([3, 4]), 1, argmax=np.array([15, 18])),
         [("prune", 2, [3, 4], 2, True), ("emit", (15, 18)), ("finish", "max_new_tokens")]),
        (SegmentReturned(4, np.array([], dtype=np.int64), 2, argmax=np.array([], dtype=np.int64)), []),
    ]  # fmt: skip
    for t, (event, expected) in enumerate(timeline):
        assert describe(core.handle(event, now=float(t))) == expected, f"event {t}: {event!r}"
    assert core.idle
    assert core.outputs == {0: [10, 12, 15, 18]}
    steps = core.records.frames()["steps"]
    assert steps[["outcome", "n_verified", "n_accepted", "n_emitted", "reroot_offset", "n_expanded"]].values.tolist() == [
        ["prefill", 3, 0, 1, -1, 0],
        ["continue", 1, 1, 1, 2, 1],
        ["empty", 0, 0, 0, -1, 0],
        ["finish", 2, 2, 2, -1, 0],
        ["empty", 0, 0, 0, -1, 0],
    ]  # fmt: skip


def test_rows_a_stage_has_not_pruned_yet_are_pruned_by_d0() -> None:
    """A segment may come back reflecting an older prune; D0 applies the newer ones itself, once.

    Same as the timeline above, but segment 2 returns with its rows [1, 2] at version 0 (the stages
    had not received prune v1): D0 prunes them away and the step is empty all the same.
    """
    core = literal_core()
    core.handle(RequestArrived(0, (1, 2, 3)), 0.0)
    core.handle(SegmentReturned(0, np.array([-1, -1, -1]), 0, argmax=np.array([7, 7, 10])), 1.0)
    core.handle(DraftDone(0), 2.0)
    core.handle(SegmentReturned(1, np.array([0]), 0, argmax=np.array([12])), 3.0)
    core.handle(DraftDone(1), 4.0)
    assert core.handle(SegmentReturned(2, np.array([1, 2]), 0, argmax=np.array([5, 5])), 5.0) == []
    assert core.records.steps[-1].outcome == "empty"


@pytest.mark.parametrize(
    "event, message",
    [
        (SegmentReturned(2, np.array([1, 2]), 0, argmax=np.array([5, 5])), "returned before segment 1"),
        (SegmentReturned(1, np.array([0, 1]), 0, argmax=np.array([5, 5])), "expected [0]"),
        (SegmentReturned(1, np.array([0]), 3, argmax=np.array([5])), "latest v0"),
        (SegmentReturned(1, np.array([0]), 0), "needs the target's argmax"),
    ],
)
def test_protocol_errors_name_segment_and_cause(event: SegmentReturned, message: str) -> None:
    """Out-of-order returns, rows that disagree with D0's pruning, unknown versions are rejected."""
    core = literal_core()
    core.handle(RequestArrived(0, (1, 2, 3)), 0.0)
    core.handle(SegmentReturned(0, np.array([-1, -1, -1]), 0, argmax=np.array([7, 7, 10])), 1.0)
    core.handle(DraftDone(0), 2.0)
    with pytest.raises(ProtocolError, match=message.replace("[", r"\[").replace("]", r"\]")):
        core.handle(event, 3.0)


def _jittery_run(seed: int) -> dict[str, pd.DataFrame]:
    scenario = Scenario(
        seed=seed,
        decoding=DecodingConfig(max_new_tokens=40, eos_token_id=0),
        pipeline=PipelineConfig(n_stages=3),
        tree=TreeConfig(total=20, topk=3, depth=3, segment_size=4),
        expansion=ExpansionConfig(total=12, topk=3, depth=2),
    )
    model = HashLM(32, 6, seed=seed)
    drafter = OracleDrafter(GroundTruth(model), hit_rate=0.7, rank_weights=(3, 1, 1), seed=seed)
    driver = InMemoryDriver(scenario, drafter, model, delays=Delays(jitter=0.8))
    return driver.run([(0.0, [1, 2, 3, 4]), (0.05, [9] * 70)]).records.frames()


def test_same_scenario_and_seed_give_identical_frames() -> None:
    """Time and randomness are injected: two runs of one scenario and seed agree row for row."""
    first, second = _jittery_run(7), _jittery_run(7)
    for name in first:
        pd.testing.assert_frame_equal(first[name], second[name], obj=name)
    assert len(first["steps"]) > 10 and len(first["stage_spans"]) > 10
    other = _jittery_run(8)
    assert not first["stage_spans"].equals(other["stage_spans"]), "the seed must matter"


def test_core_imports_no_backend_library() -> None:
    """The core stays sans-I/O: importing all of it loads none of simpy, zmq, torch, transformers."""
    code = (
        "import sys, pkgutil, importlib, flowspec\n"
        "for m in pkgutil.iter_modules(flowspec.__path__): importlib.import_module('flowspec.' + m.name)\n"
        "print(sorted({'simpy', 'zmq', 'torch', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
