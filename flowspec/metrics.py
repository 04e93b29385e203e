"""Every reported number, computed from record frames.

Theory of operation
-------------------
Backends and the core only *record* (``flowspec.records``); this module only *computes*. Each public
function takes the tidy frames of ``RunRecords.frames()`` (or one of them) and returns a number or a
small frame, so the simulator and the runtime are measured by the same code.

Rules:

1. Nothing here keeps state or counters; the same frames always give the same numbers.
2. Empty frames (``to_frame([], T)``, whose columns have ``object`` dtype) and missing frames are
   normal input: rates become NaN, counts become 0, and nothing raises.
3. Definitions (the vocabulary of DESIGN.md §7):

   - a *verifying step* is a step row with ``n_verified > 0`` whose outcome is not ``prefill``;
     its ``n_accepted`` counts the root, which is the previous step's bonus token, so the mean of
     ``n_accepted`` is the "mean accepted length per step, bonus included";
   - a *candidate set* is the group of verified nodes at one depth of one step whose parent was
     accepted; at most one of them can be the target's choice, so acceptance by depth counts sets,
     not nodes (two siblings, one accepted, is a 100 % acceptance of that set);
   - stage busy time is the length of the union of its spans clipped to the window, so overlapping
     spans (e.g. a draft job and a verify job on stage 0) are not counted twice;
   - TTFT and queueing are measured from arrival; TPOT and decode tokens/s from the first token;
     end-to-end tokens/s from the prefill start (prefill included, queueing excluded);
   - a device's idle time is split by cause in ``flowspec.idle`` (``idle_attribution``).

Groupings also key on ``run_id`` when the column is present, so frames of several runs may be
concatenated without mixing their rounds. Only pandas and numpy may be imported here (R1, R5).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from flowspec.records import RECORD_TYPES, StepOutcome, to_frame

__all__ = [
    "acceptance_by_depth",
    "accepted_per_round",
    "accepted_per_step",
    "compare",
    "frame_of",
    "link_bytes",
    "numeric",
    "request_metrics",
    "stage_utilization",
    "summary",
]


def numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    """`column` as float64; empty record frames carry ``object`` columns."""
    return pd.to_numeric(frame[column], errors="coerce").astype(np.float64)


def _keys(frame: pd.DataFrame, keys: list[str]) -> list[str]:
    """`keys`, preceded by ``run_id`` when the frame has one."""
    return (["run_id"] if "run_id" in frame.columns else []) + keys


def _verifying_steps(steps: pd.DataFrame) -> pd.DataFrame:
    mask = (numeric(steps, "n_verified") > 0) & (steps["outcome"].astype(str) != StepOutcome.PREFILL)
    return steps[mask]


def request_metrics(requests: pd.DataFrame) -> pd.DataFrame:
    """Per-request latency and throughput: `requests` with six derived columns appended.

    ``ttft_s``, ``queue_s`` and ``e2e_s`` run from arrival; ``tpot_s`` and
    ``decode_tokens_per_s`` cover the ``n_output_tokens - 1`` tokens after the first (NaN when
    there are none); ``e2e_tokens_per_s`` divides all output tokens by finish minus prefill start.

    >>> r = pd.DataFrame({"request_id": [0], "n_output_tokens": [5], "t_arrival_s": [0.0],
    ...                   "t_start_s": [0.5], "t_first_token_s": [1.0], "t_finish_s": [3.0]})
    >>> cols = ["ttft_s", "queue_s", "tpot_s", "decode_tokens_per_s", "e2e_tokens_per_s"]
    >>> request_metrics(r)[cols].iloc[0].tolist()  # tpot: (3 - 1) / 4 tokens after the first
    [1.0, 0.5, 0.5, 2.0, 2.0]
    """
    out = requests.copy()
    n_out = numeric(requests, "n_output_tokens")
    arrival, start = numeric(requests, "t_arrival_s"), numeric(requests, "t_start_s")
    first, finish = numeric(requests, "t_first_token_s"), numeric(requests, "t_finish_s")
    n_decode = (n_out - 1).where(n_out > 1)  # NaN: no token after the first
    decode_s = (finish - first).where(finish > first)
    e2e_run_s = (finish - start).where(finish > start)
    out["ttft_s"] = first - arrival
    out["queue_s"] = start - arrival
    out["e2e_s"] = finish - arrival
    out["tpot_s"] = (finish - first) / n_decode
    out["decode_tokens_per_s"] = n_decode / decode_s
    out["e2e_tokens_per_s"] = n_out / e2e_run_s
    return out


def accepted_per_step(steps: pd.DataFrame) -> float:
    """Mean accepted length per verifying step, bonus included (NaN when there is none).

    Emptied segments (``n_verified == 0``) and prefill rows are not verifications.

    >>> s = pd.DataFrame({"n_verified": [3, 4, 0, 1], "n_accepted": [2, 4, 0, 1],
    ...                   "outcome": ["continue", "exit", "empty", "prefill"]})
    >>> accepted_per_step(s)  # (2 + 4) / 2
    3.0
    """
    return float(numeric(_verifying_steps(steps), "n_accepted").mean())


def d0_span_ms(spans: pd.DataFrame) -> dict[str, float]:
    """Median milliseconds of one draft-node span of each kind: `step` (one event's bookkeeping:
    the core's decisions, pruning, tree growth outside the drafter, encoding and sending), `draft`
    (one drafting call) and `verify` (the target's LM head over one returned segment, and reading
    its rows); NaN for a kind that never ran.

    >>> sp = pd.DataFrame({"stage": [0, 0, 0, 1], "kind": ["step", "draft", "step", "tree"],
    ...                    "t_start_s": [0.0, 0.001, 0.004, 0.0], "t_end_s": [0.001, 0.004, 0.006, 0.01]})
    >>> d0_span_ms(sp)
    {'d0_step_ms': 1.5, 'd0_draft_ms': 3.0, 'd0_verify_ms': nan}
    """
    d0 = spans[numeric(spans, "stage") == 0] if not spans.empty else spans
    out = {}
    for kind in ("step", "draft", "verify"):
        rows = d0[d0["kind"] == kind] if not d0.empty else d0
        ms = (numeric(rows, "t_end_s") - numeric(rows, "t_start_s")) * 1e3
        out[f"d0_{kind}_ms"] = round(float(ms.median()), 6) if len(rows) else float("nan")
    return out


def accepted_per_round(steps: pd.DataFrame) -> float:
    """Mean over rounds of the tokens accepted in the round's verifying steps (NaN when none).

    >>> s = pd.DataFrame({"request_id": [0, 0, 0], "round": [1, 1, 2], "n_verified": [3, 2, 2],
    ...                   "n_accepted": [2, 3, 1], "outcome": ["continue", "exit", "exit"]})
    >>> accepted_per_round(s)  # rounds sum to 5 and 1
    3.0
    """
    verifying = _verifying_steps(steps).assign(n_accepted=lambda f: numeric(f, "n_accepted"))
    if verifying.empty:
        return float("nan")
    per_round = verifying.groupby(_keys(verifying, ["request_id", "round"]))["n_accepted"].sum()
    return float(per_round.mean())


def acceptance_by_depth(nodes: pd.DataFrame) -> pd.DataFrame:
    """Acceptance rate per depth, counting each candidate set (siblings of one step) once.

    Only nodes whose parent was accepted were real candidates; the others were verified in the same
    segment but could never have been chosen.

    >>> n = pd.DataFrame({"request_id": 0, "round": 0, "step": 0, "depth": [1, 1, 2, 3],
    ...                   "parent_accepted": [True, True, True, False],
    ...                   "accepted": [False, True, False, False]})
    >>> acceptance_by_depth(n).to_dict("list")  # doctest: +NORMALIZE_WHITESPACE
    {'depth': [1, 2], 'n_candidates': [1, 1], 'n_accepted': [1, 0], 'acceptance_rate': [1.0, 0.0]}
    """
    columns = ["depth", "n_candidates", "n_accepted", "acceptance_rate"]
    candidates = nodes[nodes["parent_accepted"].astype(bool)]
    if candidates.empty:
        return pd.DataFrame({c: pd.Series(dtype=np.float64 if c == "acceptance_rate" else np.int64)
                             for c in columns})
    candidates = candidates.assign(accepted=candidates["accepted"].astype(bool),
                                   depth=candidates["depth"].astype(np.int64))
    set_keys = _keys(candidates, ["request_id", "round", "step", "depth"])
    per_set = candidates.groupby(set_keys)["accepted"].any().reset_index()  # one row per set
    out = (per_set.groupby("depth")["accepted"]
           .agg(n_candidates="size", n_accepted="sum").reset_index())
    out["n_candidates"] = out["n_candidates"].astype(np.int64)
    out["n_accepted"] = out["n_accepted"].astype(np.int64)
    out["acceptance_rate"] = out["n_accepted"] / out["n_candidates"]
    return out.sort_values("depth", ignore_index=True)[columns]


def _union_length(starts: np.ndarray, ends: np.ndarray) -> float:
    """Total length covered by the intervals ``[starts[i], ends[i])`` (all ``ends >= starts``)."""
    if starts.size == 0:
        return 0.0
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]  # [n_spans]
    reach = np.maximum.accumulate(e)  # [n_spans] furthest end seen so far
    new_block = np.empty(s.size, dtype=bool)  # span i starts a new disjoint block
    new_block[0] = True
    new_block[1:] = s[1:] > reach[:-1]
    block_start = s[new_block]  # [n_blocks]
    block_end = np.maximum.reduceat(e, np.flatnonzero(new_block))  # [n_blocks]
    return float((block_end - block_start).sum())


def stage_utilization(stage_spans: pd.DataFrame, t_start_s: float | None = None,
                      t_end_s: float | None = None) -> pd.DataFrame:
    """Busy and idle seconds per stage within the window ``[t_start_s, t_end_s]``.

    The window defaults to the earliest span start and the latest span end. Spans are clipped to
    it, and overlapping spans on one stage count once. ``busy_fraction`` is NaN for an empty window.

    >>> sp = pd.DataFrame({"stage": [0, 0, 1], "t_start_s": [0.0, 1.0, 3.0],
    ...                    "t_end_s": [2.0, 3.0, 5.0]})
    >>> stage_utilization(sp, 0.0, 4.0).to_dict("list")  # stage 0: [0,3); stage 1: [3,4)
    {'stage': [0, 1], 'busy_s': [3.0, 1.0], 'idle_s': [1.0, 3.0], 'busy_fraction': [0.75, 0.25]}
    """
    columns = ["stage", "busy_s", "idle_s", "busy_fraction"]
    if stage_spans.empty:
        return pd.DataFrame({c: pd.Series(dtype=np.int64 if c == "stage" else np.float64)
                             for c in columns})
    starts, ends = numeric(stage_spans, "t_start_s"), numeric(stage_spans, "t_end_s")
    lo = float(starts.min()) if t_start_s is None else float(t_start_s)
    hi = float(ends.max()) if t_end_s is None else float(t_end_s)
    window_s = max(hi - lo, 0.0)
    clipped_start = starts.clip(lower=lo, upper=hi).to_numpy()  # [n_spans]
    clipped_end = ends.clip(lower=lo, upper=hi).to_numpy()  # [n_spans]
    stage = stage_spans["stage"].astype(np.int64).to_numpy()  # [n_spans]
    rows = []
    for s in np.unique(stage):
        keep = (stage == s) & (clipped_end > clipped_start)
        busy_s = _union_length(clipped_start[keep], clipped_end[keep])
        rows.append((int(s), busy_s, window_s - busy_s,
                     busy_s / window_s if window_s > 0 else float("nan")))
    return pd.DataFrame(rows, columns=columns)


def link_bytes(link_transfers: pd.DataFrame) -> pd.DataFrame:
    """Messages and bytes per ``(src, dst, kind)``, sorted by those keys.

    >>> lt = pd.DataFrame({"src": [0, 0, 1], "dst": [1, 1, 2], "kind": "segment",
    ...                    "nbytes": [100, 50, 70]})
    >>> link_bytes(lt).to_dict("list")  # doctest: +NORMALIZE_WHITESPACE
    {'src': [0, 1], 'dst': [1, 2], 'kind': ['segment', 'segment'],
     'n_messages': [2, 1], 'nbytes': [150, 70]}
    """
    keys = ["src", "dst", "kind"]
    if link_transfers.empty:
        dtypes = {"src": np.int64, "dst": np.int64, "kind": object, "n_messages": np.int64,
                  "nbytes": np.int64}
        return pd.DataFrame({c: pd.Series(dtype=d) for c, d in dtypes.items()})
    grouped = link_transfers.assign(nbytes=link_transfers["nbytes"].astype(np.int64)).groupby(keys)
    out = grouped["nbytes"].agg(n_messages="size", nbytes="sum").reset_index()
    return out.sort_values(keys, ignore_index=True)


def overruns(computes: pd.DataFrame, slack_ms: float) -> pd.DataFrame:
    """Per device of an emulated run: padded computes, how many overran (real time past the
    padding by more than `slack_ms`), the worst excess (real ms) and the mean real / padded ratio
    (how much of its padding a device's real compute used: 1 / the dilation it would need)."""
    cols = {"device": np.int64, "n_computes": np.int64, "n_overruns": np.int64, "worst_excess_ms": float,
            "mean_real_over_padded": float}  # fmt: skip
    if computes.empty:
        return pd.DataFrame({c: pd.Series(dtype=d) for c, d in cols.items()})
    real, padded = numeric(computes, "real_ms"), numeric(computes, "padded_ms")
    excess = real - padded
    frame = pd.DataFrame({"device": computes["device"].astype(np.int64), "excess": excess,
                          "over": excess > slack_ms, "ratio": real / padded.where(padded > 0)})  # fmt: skip
    out = frame.groupby("device").agg(n_computes=("excess", "size"), n_overruns=("over", "sum"),
                                      worst_excess_ms=("excess", "max"), mean_real_over_padded=("ratio", "mean"))
    out["n_overruns"] = out["n_overruns"].astype(np.int64)
    return out.reset_index()


def frame_of(frames: Mapping[str, pd.DataFrame], name: str) -> pd.DataFrame:
    """`frames[name]`, or that record kind's empty frame when it is missing."""
    frame = frames.get(name)
    return to_frame([], RECORD_TYPES[name]) if frame is None else frame


def summary(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row of headline numbers for one run; missing or empty frames give NaN (counts give 0).

    ``tokens_per_s`` is the FlowSpec paper's throughput ξ: all output tokens over the summed time
    each request spent being served (prefill start to finish). Queueing and the idle gaps between
    sparse arrivals are excluded, so it measures the pipeline, not the arrival rate.
    ``decode_tokens_per_s`` leaves prefill out too (first token to finish). ``n_steps`` counts
    verifying steps. ``throughput_tokens_per_s`` is what a multi-request workload sees: all output
    tokens over the first arrival to the last finish, queueing and idle gaps included;
    ``max_concurrent`` is the most requests in service at once (a batching policy's batch).

    >>> req = pd.DataFrame({"request_id": [0, 1], "n_output_tokens": [5, 3],
    ...                     "t_arrival_s": 0.0, "t_start_s": [0.0, 1.0],
    ...                     "t_first_token_s": [1.0, 2.0], "t_finish_s": [3.0, 4.0]})
    >>> summary({"requests": req})[["tokens_per_s", "decode_tokens_per_s", "ttft_s", "n_steps"]].to_dict("records")
    [{'tokens_per_s': 1.3333333333333333, 'decode_tokens_per_s': 1.5, 'ttft_s': 1.5, 'n_steps': 0}]

    (8 tokens over 3 + 3 s of service; 4 + 2 decode tokens over 2 + 2 s; TTFT (1 + 2) / 2; no steps
    frame, so no verifying steps.)
    """
    requests = request_metrics(frame_of(frames, "requests"))
    steps, rounds = frame_of(frames, "steps"), frame_of(frames, "rounds")
    n_output = numeric(requests, "n_output_tokens")
    served_s = (numeric(requests, "t_finish_s") - numeric(requests, "t_start_s")).sum()
    tokens_per_s = float(n_output.sum() / served_s) if served_s > 0 else float("nan")
    decode_s = (numeric(requests, "t_finish_s") - numeric(requests, "t_first_token_s")).sum()
    decode_tokens_per_s = float((n_output - 1).clip(lower=0).sum() / decode_s) if decode_s > 0 else float("nan")
    round_keys = _keys(rounds, ["request_id", "round"])
    n_rounds = 0 if rounds.empty else len(rounds[round_keys].drop_duplicates())
    row = {
        "n_requests": len(requests),
        "n_output_tokens": int(n_output.sum()),
        "tokens_per_s": tokens_per_s,
        "decode_tokens_per_s": decode_tokens_per_s,
        "ttft_s": float(requests["ttft_s"].mean()),
        "tpot_s": float(requests["tpot_s"].mean()),
        "accepted_per_step": accepted_per_step(steps),
        "accepted_per_round": accepted_per_round(steps),
        "n_rounds": n_rounds,
        "n_steps": len(_verifying_steps(steps)),
        "relaxed_share": relaxed_share(steps, int(n_output.sum())),
        "throughput_tokens_per_s": throughput_tokens_per_s(requests),
        "max_concurrent": max_concurrent(requests),
        "lossy": bool(steps["relaxing"].astype(bool).any()) if "relaxing" in steps else False,
    }
    return pd.DataFrame([row])


def throughput_tokens_per_s(requests: pd.DataFrame) -> float:
    """All output tokens over the first arrival to the last finish.

    >>> r = pd.DataFrame({"n_output_tokens": [4, 4], "t_arrival_s": [0.0, 1.0], "t_finish_s": [2.0, 4.0]})
    >>> throughput_tokens_per_s(r)
    2.0
    """
    if requests.empty:
        return float("nan")
    window_s = numeric(requests, "t_finish_s").max() - numeric(requests, "t_arrival_s").min()
    return float(numeric(requests, "n_output_tokens").sum() / window_s) if window_s > 0 else float("nan")


def max_concurrent(requests: pd.DataFrame) -> int:
    """The most requests in service (prefill start to finish) at once; one ending as another starts
    does not overlap it.

    >>> max_concurrent(pd.DataFrame({"t_start_s": [0.0, 1.0, 2.0], "t_finish_s": [2.0, 3.0, 4.0]}))
    2
    """
    if requests.empty:
        return 0
    starts, ends = numeric(requests, "t_start_s").to_numpy(), numeric(requests, "t_finish_s").to_numpy()
    times = np.concatenate([starts, ends])
    delta = np.concatenate([np.ones(len(starts)), -np.ones(len(ends))])
    order = np.lexsort((delta, times))  # at equal times, ends (-1) before starts
    return int(np.cumsum(delta[order]).max())


def relaxed_share(steps: pd.DataFrame, n_output_tokens: int) -> float:
    """Share of the output tokens that strict verification would have refused (relaxed acceptance,
    the dsd policy with tau > 0): 0 for a lossless run; NaN without output.

    >>> relaxed_share(pd.DataFrame({"n_relaxed": [0, 2, 1]}), 12)
    0.25
    """
    if n_output_tokens <= 0:
        return float("nan")
    return float(numeric(steps, "n_relaxed").sum() / n_output_tokens) if "n_relaxed" in steps else 0.0


def compare(summaries: Mapping[str, pd.DataFrame], baseline: str) -> pd.DataFrame:
    """Stack one-row summaries under a ``policy`` column and add ``speedup_vs_<baseline>``.

    >>> a = pd.DataFrame({"tokens_per_s": [30.0]})
    >>> b = pd.DataFrame({"tokens_per_s": [20.0]})
    >>> compare({"flowspec": a, "naive_pp": b}, "naive_pp").to_dict("list")
    ... # doctest: +NORMALIZE_WHITESPACE
    {'policy': ['flowspec', 'naive_pp'], 'tokens_per_s': [30.0, 20.0],
     'speedup_vs_naive_pp': [1.5, 1.0]}
    """
    if baseline not in summaries:
        raise KeyError(f"baseline {baseline!r} is not among the summaries {sorted(summaries)}")
    for policy, frame in summaries.items():
        assert len(frame) == 1, f"summary of {policy!r} must have one row, got {len(frame)}"
    out = pd.concat([frame.assign(policy=policy) for policy, frame in summaries.items()],
                    ignore_index=True)
    out = out[["policy"] + [c for c in out.columns if c != "policy"]]
    base_tokens_per_s = float(summaries[baseline]["tokens_per_s"].iloc[0])
    out[f"speedup_vs_{baseline}"] = numeric(out, "tokens_per_s") / base_tokens_per_s
    return out
