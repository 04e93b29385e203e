"""Metrics on hand-built records: every expected number is worked out by hand in the test."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowspec.idle import idle_attribution, idle_intervals
from flowspec.metrics import (
    acceptance_by_depth,
    accepted_per_round,
    accepted_per_step,
    compare,
    link_bytes,
    request_metrics,
    stage_utilization,
    summary,
)
from flowspec.records import (
    LinkTransfer,
    NodeRecord,
    RequestRecord,
    RoundRecord,
    RunRecords,
    StageSpan,
    StepRecord,
    to_frame,
)


def step(request_id: int, round: int, step: int, n_verified: int, n_accepted: int, outcome: str,
         run_id: str = "r") -> StepRecord:
    return StepRecord(run_id=run_id, source="sim", request_id=request_id, round=round, step=step,
                      segment_id=step, n_verified=n_verified, n_accepted=n_accepted,
                      n_emitted=n_accepted, bonus_token=7 if n_verified else -1, outcome=outcome,
                      reroot_offset=-1, n_pruned=0, n_expanded=0, n_trimmed=0, t_s=0.0)


def node(request_id: int, step: int, node_id: int, depth: int, parent_accepted: bool,
         accepted: bool) -> NodeRecord:
    return NodeRecord(run_id="r", source="sim", request_id=request_id, round=0, step=step,
                      node_id=node_id, depth=depth, score=-0.1 * depth, parent_id=-1, rank=0,
                      n_siblings=1, parent_accepted=parent_accepted, accepted=accepted)


def request(request_id: int, n_output_tokens: int, t_arrival_s: float, t_start_s: float,
            t_first_token_s: float, t_finish_s: float) -> RequestRecord:
    return RequestRecord(run_id="r", source="sim", request_id=request_id, n_prompt_tokens=8,
                         n_output_tokens=n_output_tokens, finish_reason="max_new_tokens",
                         t_arrival_s=t_arrival_s, t_start_s=t_start_s,
                         t_first_token_s=t_first_token_s, t_finish_s=t_finish_s)


def span(stage: int, t_start_s: float, t_end_s: float) -> StageSpan:
    return StageSpan(run_id="r", source="sim", request_id=0, stage=stage, segment_id=0,
                     kind="verify", n_tokens=4, kv_len=16, t_start_s=t_start_s, t_end_s=t_end_s)


def transfer(src: int, dst: int, kind: str, nbytes: int) -> LinkTransfer:
    return LinkTransfer(run_id="r", source="sim", src=src, dst=dst, kind=kind, nbytes=nbytes,
                        t_send_s=0.0, t_recv_s=0.001)


def round_record(request_id: int, round: int) -> RoundRecord:
    return RoundRecord(run_id="r", source="sim", request_id=request_id, round=round, n_steps=1,
                       n_sent=4, n_emitted=2, t_start_s=0.0, t_end_s=1.0)


# Request 0: arrives at 0, prefill sent at 0.5, first token at 1.0, 5 tokens by 3.0.
# Request 1: arrives at 1.0, starts at once, its only token at 1.25 is also its finish.
REQUESTS = [request(0, 5, 0.0, 0.5, 1.0, 3.0), request(1, 1, 1.0, 1.0, 1.25, 1.25)]

# Verifying (request, round, step) n_accepted: (0,0,1) 3, (0,0,2) 1, (0,1,4) 2, (1,0,1) 5.
# Not verifying: the two prefills and the emptied segment.
STEPS = [
    step(0, 0, 0, 1, 1, "prefill"),
    step(0, 0, 1, 4, 3, "continue"),
    step(0, 0, 2, 3, 1, "exit"),
    step(0, 1, 3, 0, 0, "empty"),
    step(0, 1, 4, 2, 2, "finish"),
    step(1, 0, 0, 1, 1, "prefill"),
    step(1, 0, 1, 6, 5, "finish"),
]


def test_request_metrics_latencies_and_rates() -> None:
    """TTFT/queue/e2e run from arrival, TPOT from the first token, e2e tokens/s from prefill start.

    Request 0: ttft 1.0 - 0 = 1.0; queue 0.5; e2e 3.0; tpot (3.0 - 1.0) / (5 - 1) = 0.5;
    decode 4 / 2.0 = 2.0 tokens/s; e2e 5 / (3.0 - 0.5) = 2.0 tokens/s.
    Request 1 (one token): ttft 0.25; queue 0; e2e 0.25; tpot and decode rate undefined (NaN);
    e2e 1 / 0.25 = 4.0 tokens/s.
    """
    m = request_metrics(to_frame(REQUESTS, RequestRecord)).set_index("request_id")
    assert m.loc[0, "ttft_s"] == pytest.approx(1.0)
    assert m.loc[0, "queue_s"] == pytest.approx(0.5)
    assert m.loc[0, "e2e_s"] == pytest.approx(3.0)
    assert m.loc[0, "tpot_s"] == pytest.approx(0.5)
    assert m.loc[0, "decode_tokens_per_s"] == pytest.approx(2.0)
    assert m.loc[0, "e2e_tokens_per_s"] == pytest.approx(2.0)
    assert m.loc[1, "ttft_s"] == pytest.approx(0.25)
    assert m.loc[1, "queue_s"] == pytest.approx(0.0)
    assert m.loc[1, "e2e_s"] == pytest.approx(0.25)
    assert math.isnan(m.loc[1, "tpot_s"])
    assert math.isnan(m.loc[1, "decode_tokens_per_s"])
    assert m.loc[1, "e2e_tokens_per_s"] == pytest.approx(4.0)


def test_accepted_per_step_excludes_empty_and_prefill() -> None:
    """Mean accepted length (bonus included) averages verifying steps only.

    Verifying n_accepted: 3, 1, 2, 5 -> 11 / 4 = 2.75. Counting the two prefill rows (1 each) and
    the empty row (0) would give 14 / 7 = 2.0 instead.
    """
    assert accepted_per_step(to_frame(STEPS, StepRecord)) == pytest.approx(2.75)
    only_non_verifying = [s for s in STEPS if s.outcome in ("prefill", "empty")]
    assert math.isnan(accepted_per_step(to_frame(only_non_verifying, StepRecord)))
    assert math.isnan(accepted_per_step(to_frame([], StepRecord)))


def test_accepted_per_round_sums_steps_per_request_round() -> None:
    """Rounds are (request_id, round) groups of verifying steps, summed, then averaged.

    Request 0 round 0: 3 + 1 = 4 (its prefill's 1 excluded); request 0 round 1: 2 (the empty step
    adds nothing); request 1 round 0: 5 -> (4 + 2 + 5) / 3 = 11 / 3. Request 1's round 0 is not
    merged with request 0's round 0.
    """
    assert accepted_per_round(to_frame(STEPS, StepRecord)) == pytest.approx(11 / 3)
    assert math.isnan(accepted_per_round(to_frame([], StepRecord)))


def test_accepted_per_round_keeps_runs_apart() -> None:
    """Concatenated frames of two runs do not merge rounds with equal ids: (4 + 2) / 2 = 3."""
    two_runs = [step(0, 0, 1, 5, 4, "exit", run_id="a"), step(0, 0, 1, 3, 2, "exit", run_id="b")]
    frame = to_frame(two_runs, StepRecord)
    assert accepted_per_round(frame) == pytest.approx(3.0)


def test_acceptance_by_depth_counts_sibling_sets_once() -> None:
    """A depth's candidate set is its parent-accepted siblings in one step; accepted if any is.

    Request 0 step 1: depth 1 has siblings 1 (rejected) and 2 (accepted) -> one accepted set;
    depth 2 has node 3 under the accepted 2 (rejected) -> one rejected set; node 4 under the
    rejected 1 is not a candidate. Request 0 step 2: depth 1 node 5 rejected -> one rejected set;
    node 6 at depth 2 is not a candidate. Request 1 step 1 (same round and step ids): depth 1
    node 1 accepted, depth 2 node 2 accepted -> one accepted set each.
    Depth 1: 3 sets, 2 accepted -> 2/3. Depth 2: 2 sets, 1 accepted -> 1/2. No depth-3 row.
    """
    nodes = [
        node(0, 1, 1, 1, True, False), node(0, 1, 2, 1, True, True),
        node(0, 1, 3, 2, True, False), node(0, 1, 4, 2, False, False),
        node(0, 2, 5, 1, True, False), node(0, 2, 6, 2, False, False),
        node(1, 1, 1, 1, True, True), node(1, 1, 2, 2, True, True),
        node(1, 1, 3, 3, False, False),
    ]
    out = acceptance_by_depth(to_frame(nodes, NodeRecord))
    assert out["depth"].tolist() == [1, 2]
    assert out["n_candidates"].tolist() == [3, 2]
    assert out["n_accepted"].tolist() == [2, 1]
    assert out["acceptance_rate"].tolist() == pytest.approx([2 / 3, 1 / 2])


def test_acceptance_by_depth_single_sibling_set() -> None:
    """Two siblings at depth 1 under an accepted root, one accepted: 1 set, 1 accepted, rate 1.0."""
    siblings = [node(0, 1, 1, 1, True, False), node(0, 1, 2, 1, True, True)]
    out = acceptance_by_depth(to_frame(siblings, NodeRecord))
    assert out.to_dict("list") == {"depth": [1], "n_candidates": [1], "n_accepted": [1],
                                   "acceptance_rate": [1.0]}


SPANS = [
    span(0, 0.0, 2.0), span(0, 1.0, 3.0), span(0, 0.5, 1.0), span(0, 5.0, 6.0),
    span(1, 2.0, 4.0), span(1, 9.0, 12.0),
    span(2, 11.0, 12.0),
]


def test_stage_utilization_union_and_clipping() -> None:
    """Overlapping spans count once; spans are clipped to the window; an outside span adds nothing.

    Window [0, 10] (10 s). Stage 0: [0,2) ∪ [1,3) ∪ [0.5,1) = [0,3), plus [5,6) -> busy 4,
    idle 6, 0.4. Stage 1: [2,4) plus [9,12) clipped to [9,10) -> busy 3, idle 7, 0.3.
    Stage 2: [11,12) lies outside -> busy 0, idle 10, 0.0.
    """
    out = stage_utilization(to_frame(SPANS, StageSpan), t_start_s=0.0, t_end_s=10.0)
    assert out["stage"].tolist() == [0, 1, 2]
    assert out["busy_s"].tolist() == pytest.approx([4.0, 3.0, 0.0])
    assert out["idle_s"].tolist() == pytest.approx([6.0, 7.0, 10.0])
    assert out["busy_fraction"].tolist() == pytest.approx([0.4, 0.3, 0.0])


def test_stage_utilization_default_window() -> None:
    """The default window is [min start, max end] = [0, 12]: busy 4, 5 (2 + 3) and 1 of 12 s."""
    out = stage_utilization(to_frame(SPANS, StageSpan))
    assert out["busy_s"].tolist() == pytest.approx([4.0, 5.0, 1.0])
    assert out["idle_s"].tolist() == pytest.approx([8.0, 7.0, 11.0])
    assert out["busy_fraction"].tolist() == pytest.approx([4 / 12, 5 / 12, 1 / 12])


def test_link_bytes_sums_per_link_and_kind() -> None:
    """Messages and bytes are summed per (src, dst, kind): 0->1 segment 100 + 50 = 150 in 2."""
    transfers = [transfer(1, 2, "segment", 70), transfer(0, 1, "segment", 100),
                 transfer(0, 1, "prune", 8), transfer(0, 1, "segment", 50),
                 transfer(2, 0, "segment", 30)]
    out = link_bytes(to_frame(transfers, LinkTransfer))
    assert out.to_dict("list") == {
        "src": [0, 0, 1, 2],
        "dst": [1, 1, 2, 0],
        "kind": ["prune", "segment", "segment", "segment"],
        "n_messages": [1, 2, 1, 1],
        "nbytes": [8, 150, 70, 30],
    }


def test_summary_of_a_small_run() -> None:
    """Headline numbers of REQUESTS + STEPS + three rounds.

    tokens/s: (5 + 1) / ((3.0 - 0.5) + (1.25 - 1.0)) = 6 / 2.75, the summed service times;
    decode: (4 + 0) / ((3.0 - 1.0) + (1.25 - 1.25)) = 2.0. TTFT (1.0 + 0.25) / 2 = 0.625.
    TPOT: only request 0 has one (0.5). Accepted per step 2.75, per round 11/3 (tests above).
    Rounds: (0,0), (0,1), (1,0) -> 3. Verifying steps: 4.
    """
    records = RunRecords(steps=STEPS, requests=REQUESTS,
                         rounds=[round_record(0, 0), round_record(0, 1), round_record(1, 0)])
    row = summary(records.frames()).iloc[0]
    assert row["n_requests"] == 2
    assert row["n_output_tokens"] == 6
    assert row["tokens_per_s"] == pytest.approx(6 / 2.75)
    assert row["decode_tokens_per_s"] == pytest.approx(2.0)
    assert row["ttft_s"] == pytest.approx(0.625)
    assert row["tpot_s"] == pytest.approx(0.5)
    assert row["accepted_per_step"] == pytest.approx(2.75)
    assert row["accepted_per_round"] == pytest.approx(11 / 3)
    assert row["n_rounds"] == 3
    assert row["n_steps"] == 4


@pytest.mark.parametrize("frames", [RunRecords().frames(), {}], ids=["empty", "missing"])
def test_summary_of_nothing_is_nan_not_an_error(frames: dict[str, pd.DataFrame]) -> None:
    """Empty or missing frames give zero counts and NaN rates, without raising."""
    out = summary(frames)
    assert len(out) == 1
    row = out.iloc[0]
    for count in ("n_requests", "n_output_tokens", "n_rounds", "n_steps"):
        assert row[count] == 0
    for rate in ("tokens_per_s", "ttft_s", "tpot_s", "accepted_per_step", "accepted_per_round"):
        assert math.isnan(row[rate])


def test_frame_functions_accept_empty_frames() -> None:
    """Each per-row function returns an empty frame with its columns for empty input."""
    assert len(request_metrics(to_frame([], RequestRecord))) == 0
    assert "tpot_s" in request_metrics(to_frame([], RequestRecord)).columns
    assert acceptance_by_depth(to_frame([], NodeRecord)).columns.tolist() == [
        "depth", "n_candidates", "n_accepted", "acceptance_rate"]
    assert stage_utilization(to_frame([], StageSpan)).columns.tolist() == [
        "stage", "busy_s", "idle_s", "busy_fraction"]
    assert link_bytes(to_frame([], LinkTransfer)).columns.tolist() == [
        "src", "dst", "kind", "n_messages", "nbytes"]


def test_compare_adds_speedup_vs_baseline() -> None:
    """Speed-up is tokens/s over the baseline's: 30 / 20 = 1.5, 25 / 20 = 1.25, 20 / 20 = 1.0."""
    summaries = {name: pd.DataFrame({"tokens_per_s": [tps], "n_requests": [1]})
                 for name, tps in [("flowspec", 30.0), ("pipedec", 25.0), ("naive_pp", 20.0)]}
    out = compare(summaries, baseline="naive_pp")
    assert out.columns[0] == "policy"
    assert out["policy"].tolist() == ["flowspec", "pipedec", "naive_pp"]
    assert out["speedup_vs_naive_pp"].tolist() == pytest.approx([1.5, 1.25, 1.0])
    with pytest.raises(KeyError, match="baseline 'autoregressive'"):
        compare(summaries, baseline="autoregressive")


def test_compare_of_empty_summaries_is_nan() -> None:
    """Summaries of empty runs compare without raising; the speed-up is NaN."""
    out = compare({"a": summary({}), "b": summary({})}, baseline="b")
    assert out["speedup_vs_b"].isna().all()


def work(stage: int, kind: str, segment_id: int, n_tokens: int, t_start_s: float, t_end_s: float) -> StageSpan:
    return StageSpan(run_id="r", source="sim", request_id=0, stage=stage, segment_id=segment_id, kind=kind,
                     n_tokens=n_tokens, kv_len=0, t_start_s=t_start_s, t_end_s=t_end_s)  # fmt: skip


def message(src: int, dst: int, kind: str, t_send_s: float, t_recv_s: float) -> LinkTransfer:
    return LinkTransfer(run_id="r", source="sim", src=src, dst=dst, kind=kind, nbytes=64, t_send_s=t_send_s,
                        t_recv_s=t_recv_s)  # fmt: skip


IDLE_RUN = RunRecords(
    stage_spans=[
        work(0, "draft", -1, 4, 0.0, 2.0), work(1, "tree", 1, 4, 2.5, 4.5), work(1, "tree", 2, 3, 4.5, 5.5),
        work(2, "tree", 1, 2, 5.0, 6.0), work(0, "verify", 1, 2, 6.5, 7.0),
    ],
    link_transfers=[
        message(0, 1, "segment", 2.0, 2.5), message(1, 2, "segment", 4.5, 5.0),
        message(2, 0, "segment", 6.0, 6.5), message(0, 1, "prune", 7.0, 7.5),
    ],
    steps=[step(0, 0, 1, 2, 1, "continue"), step(0, 0, 2, 0, 0, "empty")],  # segments 1 and 2
    requests=[request(0, 4, 0.0, 0.0, 1.0, 8.0)],
)
IDLE_COLUMNS = ["busy_s", "pruned_work_s", "idle_link_s", "idle_draft_node_s", "idle_upstream_s",
                "idle_unrecorded_s", "idle_no_request_s"]


def test_idle_attribution_hand_computed() -> None:
    """Busy, pruned work and idle by cause on D0 + two stages, window [0, 10] s, request [0, 8).

    Timeline (s):     0    2  2.5      4.5  5  5.5  6  6.5  7  7.5  8       10
      D0              draft                             verify 1
      V1                      [tree 1, 4 rows][tree 2, 3 rows]
      V2                                     [tree 1]
      0→1 segment          [  ]
      1→2 segment                         [  ]
      2→0 segment                                  [   ]
      0→1 prune                                              [   ]
    Segment 1: 2 rows verified (D0's verify span, step n_verified 2); V2 forwarded 2 of V1's 4.
    Segment 2: emptied by pruning after V1 (no later span, step "empty").

    Each idle instant goes to the nearest busy thing walking the ring back from the device
    (V1: hop 0→1, D0, hop 2→0, V2, hop 1→2; V2: hop 1→2, V1, hop 0→1, D0, hop 2→0;
    D0: hop 2→0, V2, hop 1→2, V1, hop 0→1), then to any message on the wire, then unrecorded;
    [8, 10) is outside the request.
      V1: busy [2.5, 5.5) = 3; draft node [0, 2) + [6.5, 7) = 2.5; link [2, 2.5) + [6, 6.5) +
          prune [7, 7.5) = 1.5; upstream (V2 busy) [5.5, 6) = 0.5; unrecorded [7.5, 8) = 0.5;
          no request 2. Pruned work: tree 1, 2 of 4 rows unverified over 2 s = 1; tree 2, all
          3 rows over 1 s = 1; total 2.
      V2: busy [5, 6) = 1; draft node 2.5; link [2, 2.5) + [4.5, 5) (its own hop, nearer than
          V1's tree 2) + [6, 6.5) + [7, 7.5) = 2; upstream (V1 busy) [2.5, 4.5) = 2;
          unrecorded 0.5; no request 2. Pruned work 0: both rows were verified.
      D0: busy 2 + 0.5 = 2.5; link [2, 2.5) + [4.5, 5) + [6, 6.5) + [7, 7.5) = 2; upstream
          [2.5, 4.5) + [5, 6) = 3; unrecorded 0.5; no request 2; draft node and pruned work NaN.
    """
    out = idle_attribution(IDLE_RUN.frames(), t_start_s=0.0, t_end_s=10.0)
    assert out["stage"].tolist() == [0, 1, 2]
    assert out["window_s"].tolist() == [10.0] * 3
    nan = float("nan")
    expected = {0: [2.5, nan, 2.0, nan, 3.0, 0.5, 2.0],
                1: [3.0, 2.0, 1.5, 2.5, 0.5, 0.5, 2.0],
                2: [1.0, 0.0, 2.0, 2.5, 2.0, 0.5, 2.0]}
    for stage, values in expected.items():
        row = out.set_index("stage").loc[stage, IDLE_COLUMNS].tolist()
        assert row == pytest.approx(values, nan_ok=True), stage
    assert out["busy_fraction"].tolist() == pytest.approx([0.25, 0.3, 0.1])
    parts = out[IDLE_COLUMNS].drop(columns="pruned_work_s").fillna(0.0).sum(axis=1)
    assert parts.tolist() == pytest.approx([10.0] * 3)


def test_idle_attribution_infers_hops_when_no_transfers_are_recorded() -> None:
    """The runtime records no link transfers: hops into V2 and D0 are still inferred from spans.

    Same run as above without the four transfers. Hop 1→2 is [4.5, 5) (V1's end of segment 1 to
    V2's start of it) and hop 2→0 is [6, 6.5) (V2's end to D0's verify), so V2 and D0 keep 1 s
    of link idle each, and V1 keeps [6, 6.5). The hop into V1 cannot be inferred (D0's draft span
    names no segment) and the prune is gone: [2, 2.5) and [7, 7.5) become unrecorded, 1.5 s each.
    """
    frames = IDLE_RUN.frames() | {"link_transfers": to_frame([], LinkTransfer)}
    out = idle_attribution(frames, t_start_s=0.0, t_end_s=10.0).set_index("stage")
    assert out["idle_link_s"].tolist() == pytest.approx([1.0, 0.5, 1.0])
    assert out["idle_unrecorded_s"].tolist() == pytest.approx([1.5, 1.5, 1.5])
    assert out["idle_upstream_s"].tolist() == pytest.approx([3.0, 0.5, 2.0])


def test_idle_intervals_list_the_hand_computed_causes() -> None:
    """V2's idle intervals of the hand-computed run, in order, merged where the cause repeats."""
    out = idle_intervals(IDLE_RUN.frames(), t_start_s=0.0, t_end_s=10.0)
    v2 = out[out["stage"] == 2]
    assert list(zip(v2["cause"], v2["t_start_s"], v2["t_end_s"], strict=True)) == [
        ("draft_node", 0.0, 2.0), ("link", 2.0, 2.5), ("upstream", 2.5, 4.5), ("link", 4.5, 5.0),
        ("link", 6.0, 6.5), ("draft_node", 6.5, 7.0), ("link", 7.0, 7.5), ("unrecorded", 7.5, 8.0),
        ("no_request", 8.0, 10.0),
    ]


def test_idle_attribution_of_nothing_and_of_mixed_runs() -> None:
    """Empty frames give an empty frame with the columns; frames of two runs are refused."""
    assert idle_attribution({}).columns.tolist() == ["stage", "window_s", "busy_s", "busy_fraction",
                                                     *IDLE_COLUMNS[1:]]
    assert len(idle_attribution(RunRecords().frames())) == 0
    assert len(idle_intervals({})) == 0
    spans = to_frame([work(1, "tree", 0, 1, 0.0, 1.0)], StageSpan)
    mixed = pd.concat([spans, spans.assign(run_id="other")], ignore_index=True)
    with pytest.raises(ValueError, match="one run"):
        idle_attribution({"stage_spans": mixed})


QUARTER = st.integers(0, 40).map(lambda q: q / 4)  # quarter seconds: endpoints often coincide


@st.composite
def random_runs(draw) -> dict[str, pd.DataFrame]:
    spans = [work(draw(st.integers(0, 3)), draw(st.sampled_from(["tree", "prefill", "verify", "draft"])),
                  draw(st.integers(-1, 5)), draw(st.integers(0, 6)), *sorted([draw(QUARTER), draw(QUARTER)]))
             for _ in range(draw(st.integers(1, 12)))]  # fmt: skip
    transfers = [message(draw(st.integers(0, 3)), draw(st.integers(0, 3)),
                         draw(st.sampled_from(["segment", "prune"])), *sorted([draw(QUARTER), draw(QUARTER)]))
                 for _ in range(draw(st.integers(0, 6)))]  # fmt: skip
    served = [sorted([draw(QUARTER), draw(QUARTER)]) for _ in range(draw(st.integers(0, 2)))]
    requests = [request(i, 1, 0.0, start, start, finish) for i, (start, finish) in enumerate(served)]
    steps = [step(0, 0, seg, draw(st.integers(0, 6)), 0, draw(st.sampled_from(["continue", "empty"])))
             for seg in range(draw(st.integers(0, 5)))]
    return RunRecords(stage_spans=spans, link_transfers=transfers, requests=requests, steps=steps).frames()


@settings(max_examples=30, deadline=None)
@given(frames=random_runs())
def test_idle_parts_sum_to_the_window(frames: dict[str, pd.DataFrame]) -> None:
    """For any run: busy plus every idle cause is the window; busy is stage_utilization's; pruned
    work lies within busy; the intervals add up to the totals."""
    out = idle_attribution(frames)
    idle = out[[c for c in out.columns if c.startswith("idle_")]]
    parts = out["busy_s"] + idle.fillna(0.0).sum(axis=1)
    assert parts.to_numpy() == pytest.approx(out["window_s"].to_numpy())
    assert (idle.fillna(0.0) >= 0).all().all()
    util = stage_utilization(frames["stage_spans"]).set_index("stage")["busy_s"]
    assert out.set_index("stage")["busy_s"].reindex(util.index).to_numpy() == pytest.approx(util.to_numpy())
    pruned, busy = out.loc[out["stage"] > 0, "pruned_work_s"], out.loc[out["stage"] > 0, "busy_s"]
    assert ((pruned >= 0) & (pruned <= busy + 1e-12)).all()
    assert np.isnan(out.loc[out["stage"] == 0, ["pruned_work_s", "idle_draft_node_s"]].to_numpy()).all()
    intervals = idle_intervals(frames)
    lengths = intervals["t_end_s"] - intervals["t_start_s"]
    totals = lengths.groupby([intervals["stage"], intervals["cause"]]).sum()
    for (stage, cause), seconds in totals.items():
        assert seconds == pytest.approx(float(out.set_index("stage").loc[stage, f"idle_{cause}_s"]))
