"""BatchCore (`flowspec.batch`): lanes, admission and routing, with literal commands."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flowspec.batch import BatchCore, make_core
from flowspec.config import DecodingConfig, PipelineConfig, Policy, Scenario
from flowspec.messages import RequestArrived, SegmentReturned, SendSegment
from flowspec.pipeline import PipelineCore
from flowspec.synthetic import TableDrafter


def core(max_batch: int, policy: Policy = Policy.AR_PP_DB) -> BatchCore:
    scenario = Scenario(policy=policy, decoding=DecodingConfig(max_new_tokens=2, eos_token_id=None),
                        pipeline=PipelineConfig(n_stages=2, max_batch=max_batch))  # fmt: skip
    made = make_core(scenario, TableDrafter({}, default=([5], [-0.1])), np.random.default_rng(0))
    assert isinstance(made, BatchCore)
    return made


def sent(cmds) -> list[tuple[int, int, list[int], int]]:
    """(request, segment id, tokens, prune version) of every segment sent."""
    return [(c.segment.request_id, c.segment.segment_id, c.segment.tokens.tolist(), c.segment.version)
            for c in cmds if isinstance(c, SendSegment)]  # fmt: skip


def test_a_one_request_policy_gets_one_lane() -> None:
    scenario = Scenario(policy=Policy.AR_PP)
    assert isinstance(make_core(scenario, TableDrafter({}, default=([5], [-0.1])), np.random.default_rng(0)), PipelineCore)


def test_requests_take_free_lanes_and_wait_fifo_for_one() -> None:
    c = core(max_batch=2)
    assert sent(c.handle(RequestArrived(0, (3, 4)), now=0.0)) == [(0, 0, [3, 4], 0)]
    assert sent(c.handle(RequestArrived(1, (6,)), now=0.1)) == [(1, 1, [6], 0)]  # the second lane, at once
    assert sent(c.handle(RequestArrived(2, (8,)), now=0.2)) == []  # both lanes busy: it waits
    assert c.n_active == 2 and c.active_request_id == -1 and not c.idle
    # Request 1's prompt returns: its own lane answers (first token 9, then its next segment).
    out = c.handle(SegmentReturned(1, np.array([-1]), 0, argmax=np.array([9])), now=0.3)
    assert sent(out) == [(1, 2, [9], 0)]
    out = c.handle(SegmentReturned(2, np.array([c.lanes[1]._ids.node - 1]), 0, argmax=np.array([7])), now=0.4)
    # Request 1 is done (two tokens); its lane takes request 2, which waited since 0.2.
    assert sent(out) == [(2, 3, [8], 1)]
    assert c.outputs[1] == [9, 7] and c.n_active == 2
    req = {r.request_id: r for r in c.records.requests}
    assert req[1].t_finish_s == 0.4
    with pytest.raises(KeyError, match="belongs to no lane"):
        c.handle(SegmentReturned(99, np.array([-1]), 0, argmax=np.array([1])), now=0.5)


def grouped(cmds) -> list[tuple[int, int, int, int]]:
    """(request, segment id, group, group size) of every segment that goes out."""
    return [(c.segment.request_id, c.segment.segment_id, c.segment.group, c.segment.group_size)
            for c in cmds if isinstance(c, SendSegment)]  # fmt: skip


def test_segments_go_out_in_groups_one_step_of_each_lane_and_a_slot_per_device() -> None:
    """Two prompts handled in one D0 step leave as one group; the next step of one request is a
    group of its own. At most n_stages + 1 groups circle: more segments wait (in flight for the
    core) until a group comes back."""
    c = core(max_batch=2)  # two stages: three groups in flight at most
    out = c.grouped(c.handle(RequestArrived(0, (3, 4)), now=0.0) + c.handle(RequestArrived(1, (6,)), now=0.0))
    assert grouped(out) == [(0, 0, 0, 2), (1, 1, 0, 2)]
    out = c.grouped(c.handle(SegmentReturned(0, np.array([-1, -1]), 0, argmax=np.array([-1, 9])), now=0.1))
    assert grouped(out) == [(0, 2, 1, 1)]  # request 0's next step; request 1's prompt is still out
    seg = next(cmd.segment for cmd in out if isinstance(cmd, SendSegment))
    more = [SendSegment(dataclasses.replace(seg, segment_id=100 + i)) for i in range(3)]
    assert grouped(c.grouped(more)) == [(0, 100, 2, 1)]  # the third slot; 101 and 102 wait
    assert grouped(c.grouped([])) == []
