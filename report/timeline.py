"""Spans and transfers as one timeline: tracks (devices, then links), lanes, and the Chrome trace."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from flowspec.records import RECORD_TYPES, to_frame

Frames = Mapping[str, pd.DataFrame]
_LINK_ORDER = 1000  # track order of links: after every device


def _frame(frames: Frames, name: str) -> pd.DataFrame:
    frame = frames.get(name)
    return to_frame([], RECORD_TYPES[name]) if frame is None else frame


def _device(stage: int) -> str:
    return "D0" if stage == 0 else f"V{stage}"


def _nbytes_text(nbytes: int) -> str:
    """``48 B``, ``4.6 KB``, ``1.2 MB`` (decimal units, as link bandwidths are quoted)."""
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _timeline(frames: Frames) -> pd.DataFrame:
    """One row per span or transfer: track, order, kind, name, times and trace args."""
    spans, links = _frame(frames, "stage_spans"), _frame(frames, "link_transfers")
    rows = []
    for s in spans.itertuples(index=False):
        seg = f" seg {s.segment_id}" if int(s.segment_id) >= 0 else ""
        rows.append((_device(int(s.stage)), int(s.stage), s.kind,
                     f"{s.kind}{seg} ({s.n_tokens} tok)", float(s.t_start_s), float(s.t_end_s),
                     {"request_id": int(s.request_id), "segment_id": int(s.segment_id),
                      "n_tokens": int(s.n_tokens), "kv_len": int(s.kv_len)}))
    for t in links.itertuples(index=False):
        src, dst = int(t.src), int(t.dst)
        rows.append((f"link {src}→{dst}", _LINK_ORDER + src * _LINK_ORDER + dst, t.kind,
                     f"{t.kind} {_nbytes_text(int(t.nbytes))}", float(t.t_send_s),
                     float(t.t_recv_s), {"nbytes": int(t.nbytes), "src": src, "dst": dst}))
    columns = ["track", "order", "kind", "name", "t_start_s", "t_end_s", "args"]
    return pd.DataFrame(rows, columns=columns).sort_values(["order", "t_start_s"], kind="stable")


def _lanes(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Lane per interval such that intervals in one lane never overlap (greedy, earliest start)."""
    lanes = np.zeros(starts.size, dtype=np.int64)  # [n]
    lane_end: list[float] = []
    for i in np.argsort(starts, kind="stable"):
        free = next((k for k, end in enumerate(lane_end) if starts[i] >= end), len(lane_end))
        lane_end[free:free + 1] = [ends[i]]  # replaces the lane's end, or opens a new lane
        lanes[i] = free
    return lanes


def _number_text(value: object, ratio: bool) -> str:
    if isinstance(value, str | bool | np.bool_):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(value)
    v = float(value)  # type: ignore[arg-type]
    if np.isnan(v):
        return "-"
    if v != 0 and (abs(v) >= 1000 or abs(v) < 1e-3):  # .3g would switch to 1.23e+03 at 1000
        text = f"{v:.0f}" if abs(v) >= 1000 else f"{v:.2e}"
    else:
        text = f"{v:#.3g}".rstrip(".")  # '#' keeps 24.0 and 1.00 at three digits, as in a table
    return text + ("×" if ratio else "")


def write_chrome_trace(frames_by_policy: Mapping[str, Frames], path: str | Path) -> Path:
    """Write a Chrome/Perfetto JSON trace: one process per policy, one thread per device or link.

    Every span and transfer becomes one complete (``ph: "X"``) event with ``ts``/``dur`` in whole
    microseconds: integers make back-to-back slices touch exactly, where float rounding could make
    them overlap by a nanosecond and break the nesting Perfetto expects. Overlapping events on one
    track go to extra threads named ``"D0 (2)"``, ``"link 0→1 (2)"``, ... (Rule 4). Open the file
    at https://ui.perfetto.dev or chrome://tracing.
    """
    events: list[dict] = []
    for pid, (policy, frames) in enumerate(frames_by_policy.items(), start=1):
        events += [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": policy}},
                   {"ph": "M", "pid": pid, "name": "process_sort_index",
                    "args": {"sort_index": pid}}]
        timeline, tid = _timeline(frames), 0
        for _, group in timeline.groupby("order", sort=True):  # devices, then links
            ts = np.round(group["t_start_s"].to_numpy() * 1e6).astype(np.int64)  # [n] µs
            end = np.maximum(np.round(group["t_end_s"].to_numpy() * 1e6).astype(np.int64), ts)
            lanes = _lanes(ts, end)
            for lane in range(int(lanes.max()) + 1):
                tid += 1
                name = group["track"].iloc[0] + (f" ({lane + 1})" if lane else "")
                events += [{"ph": "M", "pid": pid, "tid": tid, "name": "thread_name",
                            "args": {"name": name}},
                           {"ph": "M", "pid": pid, "tid": tid, "name": "thread_sort_index",
                            "args": {"sort_index": tid}}]
                names, kinds, args = (group[c].tolist() for c in ("name", "kind", "args"))
                for i in np.flatnonzero(lanes == lane).tolist():  # plain lists: iloc is slow
                    events.append({"ph": "X", "pid": pid, "tid": tid, "name": names[i],
                                   "cat": kinds[i], "ts": int(ts[i]),
                                   "dur": int(end[i] - ts[i]), "args": args[i]})
    path = Path(path)
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}), encoding="utf-8")
    return path
