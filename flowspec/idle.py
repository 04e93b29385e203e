"""Where each device's time goes: busy, busy on work later pruned, and idle by cause — from frames.

Theory of operation
-------------------
A device's idle time is split by cause (``idle_attribution``): at each idle instant, the nearest
work in progress among those that feed it, walking the ring back from it (the link into it, the
device before, the link into that, ... D0, ... round to the link it sends on). Busy time on rows
that never reached verification is *pruned work*. Like ``flowspec.metrics``, this reads record
frames only, so the simulator and the runtime are attributed by the same code; only pandas and
numpy are imported here.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from flowspec.metrics import frame_of, numeric

__all__ = ["IDLE_CAUSES", "idle_attribution", "idle_intervals"]


# Idle causes, in column order; a cause's code is its position + 1 (0 is busy).
IDLE_CAUSES = ("link", "draft_node", "upstream", "unrecorded", "no_request")
_BUSY, _LINK, _DRAFT_NODE, _UPSTREAM, _UNRECORDED, _NO_REQUEST = range(6)
_IDLE_COLUMNS = ["stage", "window_s", "busy_s", "busy_fraction", "pruned_work_s",
                 *[f"idle_{cause}_s" for cause in IDLE_CAUSES]]


def _covered(bounds: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Which elementary intervals ``[bounds[i], bounds[i + 1])`` some ``[starts[j], ends[j])`` covers.

    `bounds` is sorted and holds every endpoint exactly, so the sweep is two bincounts and a cumsum.
    """
    m = bounds.size
    depth = (np.bincount(np.searchsorted(bounds, starts), minlength=m)
             - np.bincount(np.searchsorted(bounds, ends), minlength=m))  # [m] +1 opens, -1 closes
    return np.cumsum(depth)[:-1] > 0  # [m - 1]


def _one_run_spans(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The stage spans with numeric columns; raises when the frames mix runs."""
    raw = frame_of(frames, "stage_spans")
    if "run_id" in raw.columns and raw["run_id"].nunique() > 1:
        raise ValueError(f"idle attribution takes one run's frames, got runs {sorted(raw['run_id'].unique())}")
    return pd.DataFrame({"stage": raw["stage"].astype(np.int64), "segment_id": raw["segment_id"].astype(np.int64),
                         "kind": raw["kind"].astype(str), "n_tokens": numeric(raw, "n_tokens"),
                         "t_start_s": numeric(raw, "t_start_s"), "t_end_s": numeric(raw, "t_end_s")})  # fmt: skip


def _handoff(sender: pd.DataFrame, receiver: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per segment both devices worked on: from the sender's end to the receiver's start."""
    sent = sender[sender["segment_id"] >= 0].groupby("segment_id")["t_end_s"].max()
    started = receiver[receiver["segment_id"] >= 0].groupby("segment_id")["t_start_s"].min()
    both = pd.concat([sent, started], axis=1, join="inner")
    return both["t_end_s"].to_numpy(), both["t_start_s"].to_numpy()


def _ring(stages: np.ndarray, position: int) -> list[tuple[str, int]]:
    """What feeds ``stages[position]``, nearest first: the hop into it, the device before it, the
    hop into that one, ... round the ring to the hop it sends on itself."""
    n, keys = len(stages), []
    for back in range(n):
        keys.append(("hop", int(stages[(position - back) % n])))
        if back < n - 1:
            keys.append(("stage", int(stages[(position - back - 1) % n])))
    return keys


def _attribute(frames: Mapping[str, pd.DataFrame], t_start_s: float | None, t_end_s: float | None):
    """Spans, stages, elementary interval bounds and each stage's cause code per elementary interval."""
    spans = _one_run_spans(frames)
    transfers, requests = frame_of(frames, "link_transfers"), frame_of(frames, "requests")
    lo = float(spans["t_start_s"].min()) if t_start_s is None else float(t_start_s)
    hi = float(spans["t_end_s"].max()) if t_end_s is None else float(t_end_s)
    hi = max(hi, lo)
    stages = np.union1d(spans["stage"].unique(), [0])  # D0 is in the ring even without spans
    dst = transfers["dst"].astype(np.int64).to_numpy()  # [n_transfers]
    send, recv = numeric(transfers, "t_send_s").to_numpy(), numeric(transfers, "t_recv_s").to_numpy()
    is_segment = (transfers["kind"].astype(str) == "segment").to_numpy()
    tracks: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {
        ("wire", -1): (send, recv),  # any message, prunes included
        ("request", -1): (numeric(requests, "t_start_s").to_numpy(), numeric(requests, "t_finish_s").to_numpy()),
    }
    for position, s in enumerate(stages.tolist()):
        on = spans[spans["stage"] == s]
        tracks[("stage", s)] = (on["t_start_s"].to_numpy(), on["t_end_s"].to_numpy())
        into = is_segment & (dst == s)
        starts, ends = [send[into]], [recv[into]]
        if len(stages) > 1 and position != 1:  # D0's spans do not name the segments D0 sends
            before = spans[spans["stage"] == stages[position - 1]]  # D0's sender is the last stage
            a, b = _handoff(before, on)
            starts.append(a)
            ends.append(b)
        tracks[("hop", s)] = (np.concatenate(starts), np.concatenate(ends))
    clipped = {}
    for key, (a, b) in tracks.items():
        ok = np.isfinite(a) & np.isfinite(b)
        a = np.clip(a[ok], lo, hi)
        clipped[key] = (a, np.maximum(np.clip(b[ok], lo, hi), a))
    bounds = np.unique(np.concatenate([[lo, hi], *(x for pair in clipped.values() for x in pair)]))  # [m]
    covers = {key: _covered(bounds, a, b) for key, (a, b) in clipped.items()}  # [m - 1] each
    in_request = covers[("request", -1)] if len(requests) else np.ones(bounds.size - 1, dtype=bool)
    codes = {}
    for position, s in enumerate(stages.tolist()):
        code = np.where(covers[("wire", -1)], _LINK, _UNRECORDED)  # [m - 1]
        for kind, other in reversed(_ring(stages, position)):  # the nearest, assigned last, wins
            code[covers[(kind, other)]] = _LINK if kind == "hop" else _DRAFT_NODE if other == 0 else _UPSTREAM
        code[~in_request] = _NO_REQUEST
        code[covers[("stage", s)]] = _BUSY
        codes[s] = code
    return spans, stages, bounds, codes


def _rows_verified(spans: pd.DataFrame, steps: pd.DataFrame, last_stage: int) -> pd.Series:
    """Rows of each segment that reached verification, by segment id (segments absent: none)."""
    with_id = spans[spans["segment_id"] >= 0]
    verify = with_id[(with_id["stage"] == 0) & (with_id["kind"] == "verify")]
    at_d0 = verify.groupby("segment_id")["n_tokens"].sum()
    at_last = with_id[with_id["stage"] == last_stage].groupby("segment_id")["n_tokens"].max()
    arrived = at_d0.combine_first(at_last)  # D0's count; the last stage's where D0 charged no verify span
    if steps.empty:
        return arrived
    n_verified = pd.Series(numeric(steps, "n_verified").to_numpy(),
                           index=steps["segment_id"].astype(np.int64).to_numpy()).groupby(level=0).last()
    capped = np.fmin(arrived.to_numpy(), n_verified.reindex(arrived.index).to_numpy())  # fmin: NaN = no step
    return pd.Series(capped, index=arrived.index)


def idle_intervals(frames: Mapping[str, pd.DataFrame], t_start_s: float | None = None,
                   t_end_s: float | None = None) -> pd.DataFrame:
    """Every idle interval of every device within the window, with its cause (``idle_attribution``).

    One row per maximal interval of one cause: ``stage``, ``cause`` (one of ``IDLE_CAUSES``),
    ``t_start_s``, ``t_end_s``, sorted by stage and time. The Gantt chart shades these.

    >>> sp = pd.DataFrame({"stage": [0, 1], "segment_id": [-1, 0], "kind": ["draft", "tree"],
    ...                    "n_tokens": 4, "t_start_s": [0.0, 3.0], "t_end_s": [2.0, 5.0]})
    >>> lt = pd.DataFrame({"src": [0], "dst": [1], "kind": ["segment"], "nbytes": 64,
    ...                    "t_send_s": [2.0], "t_recv_s": [3.0]})
    >>> idle_intervals({"stage_spans": sp, "link_transfers": lt}).to_dict("list")
    ... # doctest: +NORMALIZE_WHITESPACE
    {'stage': [0, 0, 1, 1], 'cause': ['link', 'upstream', 'draft_node', 'link'],
     't_start_s': [2.0, 3.0, 0.0, 2.0], 't_end_s': [3.0, 5.0, 2.0, 3.0]}
    """
    columns = ["stage", "cause", "t_start_s", "t_end_s"]
    if frame_of(frames, "stage_spans").empty:
        return pd.DataFrame({c: pd.Series(dtype={"stage": np.int64, "cause": object}.get(c, np.float64))
                             for c in columns})
    _, stages, bounds, codes = _attribute(frames, t_start_s, t_end_s)
    parts = []
    for s in stages.tolist():
        code = codes[s]  # [m - 1]
        if code.size == 0:  # an empty window
            continue
        first = np.flatnonzero(np.concatenate([[True], code[1:] != code[:-1]]))  # [n_runs] run starts
        last = np.append(first[1:], code.size)  # [n_runs] run ends, exclusive
        idle = code[first] != _BUSY
        cause = np.asarray(IDLE_CAUSES, dtype=object)[code[first][idle] - 1]
        parts.append(pd.DataFrame({"stage": s, "cause": cause, "t_start_s": bounds[first[idle]],
                                   "t_end_s": bounds[last[idle]]}))
    return pd.concat(parts, ignore_index=True)[columns] if parts else idle_intervals({})


def idle_attribution(frames: Mapping[str, pd.DataFrame], t_start_s: float | None = None,
                     t_end_s: float | None = None) -> pd.DataFrame:
    """Each device's busy time, the share of it spent on pruned work, and its idle time by cause.

    Computed from one run's frames only (``stage_spans``, ``link_transfers``, ``steps``,
    ``requests``), so both backends are measured alike. The window is ``[t_start_s, t_end_s]``,
    by default the first span start to the last span end, as in ``stage_utilization``. One row
    per device (``stage``; 0 is D0) with ``window_s``, ``busy_s``, ``busy_fraction``,
    ``pruned_work_s`` and one ``idle_<cause>_s`` per ``IDLE_CAUSES``;
    ``busy_s + idle_*_s == window_s`` (NaN counted as 0).

    *Busy* is the union of the device's spans, as in ``stage_utilization``. *Pruned work* is the
    part of busy time a verification stage spent on rows that never reached verification: each
    ``tree`` span contributes its duration times the share of its rows beyond the segment's
    verified rows (clamped at 0). A segment's verified rows are those that arrived at D0 (its
    ``verify`` span, else the last stage's span when D0 charged none), capped by the step's
    ``n_verified`` (0 for a segment emptied or made stale by pruning); a segment with no step row
    counts what arrived (the chunked baselines verify a whole tree at its last segment).
    Proportional to rows, since costs are not recorded per row. NaN for D0, whose verify spans
    cover surviving rows only; its drafts of rejected nodes are speculation, not pruning.

    *Idle* instants are attributed, in this order:

    - ``no_request``: no request is being served (between ``t_start_s`` and ``t_finish_s`` of
      some request); sparse arrivals are not a pipeline cause. Without a requests frame, never.
    - else the nearest work in progress that feeds the device, walking the ring back from it:
      the hop into it, the device before, the hop into that one, ..., D0, ..., round to the hop
      it sends on. A busy hop is ``link``; busy D0 is ``draft_node`` (drafting, verifying, its
      bookkeeping); a busy verification stage is ``upstream`` (the pipeline filling, or, past
      D0, the wait for earlier segments to be verified). A hop into a device is busy while a
      segment message to it is on the wire, or (both backends) from the sender's span of a
      segment to the receiver's span of it, which covers egress queues, decoding and waiting
      for the prunes a segment reflects; the hop into V1 has only recorded transfers, since
      D0's spans do not name the segments it sends. NaN ``idle_draft_node_s`` for D0 itself.
    - else ``link`` when any message (a prune, say) is on the wire;
    - else ``unrecorded``: nothing in the records is in progress (D0's work outside its spans;
      in runtime runs, which record no link transfers, also transport into V1). About 0 in
      the simulator.

    >>> sp = pd.DataFrame({"stage": [0, 1], "segment_id": [-1, 0], "kind": ["draft", "tree"],
    ...                    "n_tokens": 4, "t_start_s": [0.0, 3.0], "t_end_s": [2.0, 5.0]})
    >>> lt = pd.DataFrame({"src": [0], "dst": [1], "kind": ["segment"], "nbytes": 64,
    ...                    "t_send_s": [2.0], "t_recv_s": [3.0]})
    >>> st = pd.DataFrame({"segment_id": [0], "n_verified": [1]})
    >>> out = idle_attribution({"stage_spans": sp, "link_transfers": lt, "steps": st})
    >>> out[["stage", "busy_s", "pruned_work_s", "idle_link_s", "idle_draft_node_s",
    ...      "idle_upstream_s"]].to_dict("list")  # doctest: +NORMALIZE_WHITESPACE
    {'stage': [0, 1], 'busy_s': [2.0, 2.0], 'pruned_work_s': [nan, 1.5],
     'idle_link_s': [1.0, 1.0], 'idle_draft_node_s': [nan, 2.0], 'idle_upstream_s': [2.0, 0.0]}

    (Window [0, 5]. V1: D0 drafts [0, 2), the segment is on the wire [2, 3), V1 forwards 4 rows
    [3, 5) of which 1 is verified: 3/4 of 2 s pruned. D0: its segment on the wire [2, 3) is the
    hop it sends on; V1 busy [3, 5) is upstream of D0.)
    """
    if frame_of(frames, "stage_spans").empty:
        return pd.DataFrame({c: pd.Series(dtype=np.int64 if c == "stage" else np.float64) for c in _IDLE_COLUMNS})
    spans, stages, bounds, codes = _attribute(frames, t_start_s, t_end_s)
    lo, hi = float(bounds[0]), float(bounds[-1])
    window_s = hi - lo
    verified = _rows_verified(spans, frame_of(frames, "steps"), int(stages[-1]))
    tree = spans[(spans["stage"] > 0) & (spans["kind"] == "tree")]
    rows = tree["n_tokens"].to_numpy()  # [n_tree]
    useful = verified.reindex(tree["segment_id"].to_numpy()).fillna(0.0).to_numpy()  # [n_tree]
    share = np.where(rows > 0, np.clip(rows - useful, 0.0, None) / np.where(rows > 0, rows, 1.0), 0.0)
    duration = tree["t_end_s"].clip(lo, hi).to_numpy() - tree["t_start_s"].clip(lo, hi).to_numpy()
    pruned = pd.Series(np.clip(duration, 0.0, None) * share).groupby(tree["stage"].to_numpy()).sum()
    elementary_s = np.diff(bounds)  # [m - 1]
    out = []
    for s in stages.tolist():
        seconds = np.bincount(codes[s], weights=elementary_s, minlength=6)  # [busy, *IDLE_CAUSES]
        busy_s = float(seconds[_BUSY])
        pruned_s = float("nan") if s == 0 else min(float(pruned.get(s, 0.0)), busy_s)  # spans may overlap
        draft_node_s = float("nan") if s == 0 else float(seconds[_DRAFT_NODE])
        out.append((s, window_s, busy_s, busy_s / window_s if window_s > 0 else float("nan"), pruned_s,
                    float(seconds[_LINK]), draft_node_s, *map(float, seconds[_UPSTREAM:])))
    return pd.DataFrame(out, columns=_IDLE_COLUMNS)
