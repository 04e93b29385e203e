"""Reports from record frames: comparison tables, Chrome/Perfetto traces and plots.

Theory of operation
-------------------
Everything here reads the tidy frames of ``RunRecords.frames()`` and nothing else, so a simulated
run and a runtime run are reported by the same code (DESIGN.md §2). Numbers come from
``flowspec.metrics``; this module only arranges and draws them.

Rules:

1. matplotlib is imported inside the plotting functions, so importing ``report`` (and the CLI) stays
   cheap. Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas rather than pyplot:
   no global backend switch, no figure registry to leak, and nothing ever opens a window.
2. Empty frames and policies without spans are normal input: they give an empty panel with a note.
3. Devices are named D0 (the draft node, stage 0) and V1..VN (verification stages); links are
   ``link src→dst`` with device ranks. Rows list devices first, then links sorted by (src, dst).
4. Spans that overlap on one device or link (D0 drafting while it verifies, messages in flight
   together) go to separate *lanes*: Perfetto expects the slices of one thread to nest, and in the
   Gantt chart stacked thin bars show the concurrency that overdrawn bars would hide.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from flowspec import idle, metrics
from flowspec.records import RECORD_TYPES, to_frame

Frames = Mapping[str, pd.DataFrame]

# Spans and transfers by kind; tab10 colours, so the chart survives greyscale printing tolerably.
KIND_COLORS = {"prefill": "#7f7f7f", "tree": "#1f77b4", "verify": "#d62728", "draft": "#2ca02c",
               "step": "#8c564b", "segment": "#9467bd", "prune": "#ff7f0e"}
KIND_LABELS = {"segment": "segment transfer", "step": "D0 bookkeeping"}
_LINK_ORDER = 1000  # track order of links: after every device
# Idle bands in the Gantt chart, by cause (flowspec.idle): the colour of what the device
# waits for, translucent so a band never reads as work, and a hatch each for greyscale.
IDLE_STYLES = {"link": ("#9467bd", "////"), "draft_node": ("#2ca02c", "...."),
               "upstream": ("#1f77b4", "\\\\\\\\"), "unrecorded": ("#7f7f7f", "")}
IDLE_LABELS = {"link": "idle: link", "draft_node": "idle: draft node", "upstream": "idle: upstream",
               "unrecorded": "idle: unrecorded"}


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


def summary_table(summaries: Mapping[str, pd.DataFrame],
                  baselines: Sequence[str] = ("ar-pp", "chunk-pp")) -> pd.DataFrame:
    """One row per policy from one-row ``metrics.summary`` frames, with a speedup per baseline.

    Speedup columns (``speedup_vs_<baseline>``) appear only for baselines among `summaries`.

    >>> s = {"flowspec": pd.DataFrame({"tokens_per_s": [30.0], "accepted_per_step": [2.0],
    ...                                "ttft_s": [0.5], "tpot_s": [0.03]}),
    ...      "chunk-pp": pd.DataFrame({"tokens_per_s": [20.0], "accepted_per_step": [2.5],
    ...                                "ttft_s": [0.6], "tpot_s": [0.05]})}
    >>> summary_table(s)["speedup_vs_chunk-pp"].tolist()
    [1.5, 1.0]
    """
    present = [b for b in baselines if b in summaries]
    speedups = [f"speedup_vs_{b}" for b in present]
    columns = ["policy", "tokens_per_s", *speedups, "accepted_per_step", "ttft_s", "tpot_s"]
    if not summaries:
        return pd.DataFrame({c: pd.Series(dtype=object if c == "policy" else float)
                             for c in columns})
    table = pd.concat([s.assign(policy=p) for p, s in summaries.items()], ignore_index=True)
    for baseline, column in zip(present, speedups, strict=True):  # the ratio is metrics' to define
        table[column] = metrics.compare(summaries, baseline)[column].to_numpy()
    return table[columns]


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


def format_table(df: pd.DataFrame) -> str:
    """A plain-text table: 3 significant digits, speedups as ``1.33×``, text left, numbers right.

    >>> print(format_table(pd.DataFrame({"policy": ["a"], "speedup_vs_b": [4 / 3]})))
    policy  speedup_vs_b
    ------  ------------
    a              1.33×
    """
    cells = [[_number_text(v, str(c).startswith("speedup")) for c, v in row.items()]
             for _, row in df.iterrows()]
    headers = [str(c) for c in df.columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    left = [not pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if lft else v.rjust(w)
                         for v, w, lft in zip(values, widths, left, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


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


def _figure(n_panels: int, width: float, height_per_panel: float | Sequence[float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    heights = ([height_per_panel] * n_panels if isinstance(height_per_panel, int | float)
               else list(height_per_panel)) or [2.0]  # no panels: one for the note
    fig = Figure(figsize=(width, sum(heights) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)  # Agg explicitly: savefig never needs a GUI backend
    axes = fig.subplots(max(n_panels, 1), 1, squeeze=False, height_ratios=heights)[:, 0]
    return fig, list(axes)


def _empty(ax, note: str) -> None:
    ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def _window(frames: Frames, timeline: pd.DataFrame, max_time_s: float | None,
            max_rounds: int) -> tuple[float, float, str]:
    """The Gantt window: ``[0, max_time_s]``, else the first rounds of the first request."""
    if max_time_s is not None:
        return 0.0, float(max_time_s), f"first {max_time_s * 1e3:.0f} ms"
    rounds = _frame(frames, "rounds")
    if not rounds.empty:
        first = rounds[rounds["request_id"] == rounds["request_id"].min()].sort_values("round")
        shown = first.head(max_rounds)
        return (float(shown["t_start_s"].min()), float(shown["t_end_s"].max()),
                f"rounds {shown['round'].iloc[0]}–{shown['round'].iloc[-1]} of request "
                f"{first['request_id'].iloc[0]}")
    return float(timeline["t_start_s"].min()), float(timeline["t_end_s"].max()), "whole run"


def _clipped(frames: Frames, max_time_s: float | None, max_rounds: int) -> Frames:
    """Only the spans and transfers that can show in the Gantt window (long runs draw fast)."""
    lo, hi, _ = _window(frames, pd.DataFrame({"t_start_s": [0.0], "t_end_s": [np.inf]}), max_time_s, max_rounds)
    out = dict(frames)
    for name, start, end in (("stage_spans", "t_start_s", "t_end_s"), ("link_transfers", "t_send_s", "t_recv_s")):
        frame = _frame(frames, name)
        if not frame.empty:
            out[name] = frame[(frame[end] >= lo) & (frame[start] <= hi)]
    return out


def _idle_style(cause: str) -> dict:
    from matplotlib.colors import to_rgba

    color, hatch = IDLE_STYLES[cause]
    return {"facecolor": to_rgba(color, 0.15), "edgecolor": to_rgba(color, 0.45), "hatch": hatch,
            "linewidth": 0}


def _shade_idle(ax, frames: Frames, tracks: list[str], lo: float, hi: float) -> set[str]:
    """Shade each device's idle intervals within ``[lo, hi]`` by cause, behind its bars; returns
    the causes drawn. No-request time stays blank: it is not the pipeline's."""
    intervals = idle.idle_intervals(frames, lo, hi)
    drawn = set()
    for (stage, cause), group in intervals.groupby(["stage", "cause"]):
        device = _device(int(stage))
        if cause in IDLE_STYLES and device in tracks:
            xranges = list(zip(group["t_start_s"] * 1e3, (group["t_end_s"] - group["t_start_s"]) * 1e3))
            ax.broken_barh(xranges, (tracks.index(device) - 0.4, 0.8), zorder=0, **_idle_style(cause))
            drawn.add(cause)
    return drawn


def plot_gantt(frames_by_policy: Mapping[str, Frames], path: str | Path,
               max_time_s: float | None = None, max_rounds: int = 3) -> Path:
    """Gantt chart per policy: devices then links as rows, spans as bars coloured by kind, and each
    device's idle time shaded by cause (``flowspec.idle.idle_intervals``).

    The window is ``[0, max_time_s]`` seconds when given, else the first `max_rounds` rounds of each
    policy's first request; times are shown in milliseconds. Tree and prefill bars wide enough
    to hold it are labelled with their segment id.
    """
    from matplotlib.patches import Patch

    timelines = {p: _timeline(_clipped(f, max_time_s, max_rounds)) for p, f in frames_by_policy.items()}
    heights = [0.9 + 0.28 * max(t["track"].nunique(), 2) for t in timelines.values()]
    fig, axes = _figure(len(timelines), 12.0, heights)
    kinds_seen: set[str] = set()
    causes_seen: set[str] = set()
    if not timelines:
        _empty(axes[0], "no policies to draw")
    for ax, (policy, timeline) in zip(axes, timelines.items(), strict=False):  # {}: one spare ax
        if timeline.empty:
            ax.set_title(policy, loc="left", fontweight="bold")
            _empty(ax, "no spans or transfers recorded")
            continue
        lo, hi, what = _window(frames_by_policy[policy], timeline, max_time_s, max_rounds)
        tracks = list(dict.fromkeys(timeline["track"]))  # already in device-then-link order
        shown = timeline[(timeline["t_end_s"] >= lo) & (timeline["t_start_s"] <= hi)]
        clipped = _clipped(frames_by_policy[policy], max_time_s, max_rounds)
        causes_seen |= _shade_idle(ax, clipped, tracks, lo, hi)
        for row, track in enumerate(tracks):
            group = shown[shown["track"] == track]
            if group.empty:
                continue
            starts, ends = group["t_start_s"].to_numpy(), group["t_end_s"].to_numpy()  # [n]
            lanes = _lanes(starts, ends)
            n_lanes = int(lanes.max()) + 1
            lane_h = 0.8 / n_lanes
            ys = row - 0.4 + (lanes + 0.5) * lane_h  # [n] lane centres
            for kind, color in KIND_COLORS.items():
                mask = (group["kind"] == kind).to_numpy()
                if mask.any():
                    kinds_seen.add(kind)
                    ax.barh(ys[mask], (ends - starts)[mask] * 1e3, left=starts[mask] * 1e3,
                            height=lane_h * 0.9, color=color, edgecolor="white", linewidth=0.4)
            for (_, span), y in zip(group.iterrows(), ys, strict=True):
                seg = span["args"].get("segment_id", -1)
                if seg >= 0 and (span["t_end_s"] - span["t_start_s"]) > 0.03 * (hi - lo):
                    ax.text((span["t_start_s"] + span["t_end_s"]) / 2 * 1e3, y, str(seg),
                            ha="center", va="center", fontsize=7, color="white", clip_on=True)
        ax.set_xlim(lo * 1e3, hi * 1e3)
        ax.set_ylim(len(tracks) - 0.5, -0.5)  # first device on top
        ax.set_yticks(range(len(tracks)), tracks, fontsize=8)
        ax.set_xlabel("time (ms)")
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"{policy}: {what}", loc="left", fontweight="bold")
    handles = [Patch(color=c, label=KIND_LABELS.get(k, k)) for k, c in KIND_COLORS.items()
               if k in kinds_seen]
    handles += [Patch(label=IDLE_LABELS[c], **_idle_style(c)) for c in IDLE_STYLES if c in causes_seen]
    if handles:
        fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 7), fontsize=9)
    return _save(fig, path)


def plot_utilization(frames_by_policy: Mapping[str, Frames], path: str | Path) -> Path:
    """Grouped bars: busy fraction per device (x) for each policy (one colour per policy)."""
    util = {p: metrics.stage_utilization(_frame(f, "stage_spans"))
            for p, f in frames_by_policy.items()}
    stages = sorted({int(s) for u in util.values() for s in u["stage"]})
    fig, (ax,) = _figure(1, max(6.0, 1.2 * len(stages) + 3), 4.0)
    if not stages:
        _empty(ax, "no stage spans recorded")
        return _save(fig, path)
    width = 0.8 / max(len(util), 1)
    for i, (policy, u) in enumerate(util.items()):
        busy = u.set_index("stage")["busy_fraction"].reindex(stages)  # NaN: no spans there
        x = np.arange(len(stages)) - 0.4 + (i + 0.5) * width
        bars = ax.bar(x, busy.to_numpy(), width * 0.95, label=policy)
        ax.bar_label(bars, labels=[f"{v:.0%}" if np.isfinite(v) else "" for v in busy],
                     fontsize=7, padding=1)
    ax.set_xticks(range(len(stages)), [_device(s) for s in stages])
    ax.set_ylim(0, 1.1)
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.set_ylabel("busy fraction of the run")
    ax.set_title("Device utilization", loc="left", fontweight="bold")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_speedup(table: pd.DataFrame, path: str | Path, baseline: str = "chunk-pp") -> Path:
    """Bars of tokens/s per policy, each annotated with its speedup over `baseline`.

    Uses the ``speedup_vs_<baseline>`` column of `table` (``summary_table``'s output); without it,
    the bars carry tokens/s only. The baseline's bar is grey.
    """
    fig, (ax,) = _figure(1, max(6.0, 1.1 * len(table) + 2), 4.0)
    if table.empty:
        _empty(ax, "no policies to compare")
        return _save(fig, path)
    column = f"speedup_vs_{baseline}"
    colors = ["#9e9e9e" if p == baseline else "#1f77b4" for p in table["policy"]]
    bars = ax.bar(table["policy"].astype(str), table["tokens_per_s"], color=colors)
    speedups = table[column] if column in table else pd.Series(np.nan, index=table.index)
    labels = [f"{_number_text(t, False)} tok/s"
              + (f"\n{_number_text(s, True)}" if np.isfinite(s) else "")
              for t, s in zip(table["tokens_per_s"], speedups, strict=True)]
    ax.bar_label(bars, labels=labels, fontsize=8, padding=2)
    ax.margins(y=0.2)  # room for two-line labels above the tallest bar
    ax.set_ylabel("tokens/s")
    ax.set_title(f"Throughput (× = speedup vs {baseline})", loc="left", fontweight="bold")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_validation(headline: pd.DataFrame, path: str | Path, tolerance: float | None = None) -> Path:
    """Predicted against measured tokens/s, one point per policy and mode (``sim.validation.headline``),
    with the y = x line and, given `tolerance`, the band within which a prediction passes."""
    fig, (ax,) = _figure(1, 6.0, 5.0)
    if headline.empty:
        _empty(ax, "nothing validated")
        return _save(fig, path)
    hi = 1.15 * float(np.nanmax(headline[["tokens_per_s_measured", "tokens_per_s_predicted"]].to_numpy()))
    xs = np.array([0.0, hi])
    ax.plot(xs, xs, color="black", lw=1, label="predicted = measured")
    if tolerance:
        ax.fill_between(xs, xs * (1 - tolerance), xs * (1 + tolerance), color="#9e9e9e", alpha=0.25,
                        label=f"±{tolerance:.0%}")  # fmt: skip
    for mode, marker in (("replay", "o"), ("calibrated", "s")):
        part = headline[headline["mode"] == mode]
        if part.empty:
            continue
        ax.scatter(part["tokens_per_s_measured"], part["tokens_per_s_predicted"], marker=marker, label=mode, zorder=3)
        for r in part.itertuples():
            ax.annotate(str(r.policy), (r.tokens_per_s_measured, r.tokens_per_s_predicted), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("measured tokens/s (runtime)")
    ax.set_ylabel("predicted tokens/s (simulator)")
    ax.set_title("Simulator vs runtime", loc="left", fontweight="bold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_sweep(frame: pd.DataFrame, x: str, y: str = "tokens_per_s", hue: str | None = "policy",
               *, path: str | Path, y_key: str | None = None) -> Path:
    """A line plot of metric `y` against swept key `x`, one line per `hue` value.

    With `y_key` (a second swept column) it draws heatmaps instead: `x` across, `y_key` down,
    metric `y` as the colour and written in each cell; one panel per `hue` value, on one shared
    colour scale so panels compare. Repeated points (e.g. several seeds) are averaged.
    """
    groups = (list(frame.groupby(hue, sort=False)) if hue is not None and not frame.empty
              else [("", frame)])
    fig, axes = _figure(len(groups) if y_key else 1, 7.0, 3.6)
    if frame.empty:
        _empty(axes[0], f"no {y} values to plot")
        return _save(fig, path)
    if y_key is None:
        ax = axes[0]
        for label, group in groups:
            mean = group.groupby(x)[y].mean().sort_index()
            ax.plot(mean.index, mean.to_numpy(), marker="o", label=str(label) or None)
        xs = np.unique(frame[x].to_numpy())
        if pd.api.types.is_numeric_dtype(frame[x]) and xs.size <= 12:
            ax.set_xticks(xs)  # swept values, not 2.25 between 2 and 2.5 stages
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.set_title(f"{y} vs {x}", loc="left", fontweight="bold")
        if hue is not None:
            ax.legend(title=hue, fontsize=8)
        return _save(fig, path)
    vmin, vmax = float(frame[y].min()), float(frame[y].max())
    for ax, (label, group) in zip(axes, groups, strict=True):
        grid = group.pivot_table(index=y_key, columns=x, values=y, aggfunc="mean")
        image = ax.imshow(grid.to_numpy(), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for (r, c), v in np.ndenumerate(grid.to_numpy()):
            if np.isfinite(v):  # dark text on the light end of viridis, white elsewhere
                light = (v - vmin) > 0.6 * (vmax - vmin)
                ax.text(c, r, _number_text(v, False), ha="center", va="center", fontsize=10,
                        color="black" if light else "white")
        ax.set_xticks(range(grid.shape[1]), [str(v) for v in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [str(v) for v in grid.index])
        ax.set_xlabel(x)
        ax.set_ylabel(y_key)
        ax.set_title(f"{label}: {y}" if label != "" else y, loc="left", fontweight="bold")
        fig.colorbar(image, ax=ax, label=y)
    return _save(fig, path)


def utilization_table(frames_by_policy: Mapping[str, Frames]) -> pd.DataFrame:
    """Busy fraction per device (columns D0, V1, ...) per policy (rows)."""
    rows = {}
    for policy, frames in frames_by_policy.items():
        util = metrics.stage_utilization(_frame(frames, "stage_spans"))
        rows[policy] = {_device(int(s)): float(f) for s, f in zip(util["stage"], util["busy_fraction"])}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table = table.reindex(columns=sorted(table.columns, key=lambda c: (c != "D0", len(c), c)))
    return table.rename_axis("policy").reset_index()


def idle_table(frames_by_policy: Mapping[str, Frames]) -> pd.DataFrame:
    """``flowspec.idle.idle_attribution`` per policy, stacked: ``policy``, ``device``, then its columns."""
    parts = [idle.idle_attribution(frames).assign(policy=policy) for policy, frames in frames_by_policy.items()]
    table = pd.concat(parts, ignore_index=True) if parts else idle.idle_attribution({}).assign(policy="")
    table["device"] = [_device(int(s)) for s in table["stage"]]
    return table[["policy", "device", *[c for c in table.columns if c not in ("policy", "device")]]]


def idle_shares(table: pd.DataFrame) -> pd.DataFrame:
    """`idle_table` as fractions of each run's window, short headers, for printing.

    >>> t = pd.DataFrame({"policy": ["a"], "device": ["V1"], "stage": [1], "window_s": [2.0],
    ...                   "busy_s": [1.5], "busy_fraction": [0.75], "pruned_work_s": [0.5],
    ...                   "idle_link_s": [0.5]})
    >>> idle_shares(t).to_dict("records")
    [{'policy': 'a', 'device': 'V1', 'busy': 0.75, 'pruned': 0.25, 'link': 0.25}]
    """
    seconds = [c for c in table.columns if c.endswith("_s") and c != "window_s"]
    shares = table[seconds].div(table["window_s"], axis=0)
    shares.columns = [c.removesuffix("_s").removeprefix("idle_").replace("_work", "") for c in seconds]
    return pd.concat([table[["policy", "device"]], shares], axis=1)


def write_comparison(frames_by_policy: Mapping[str, Frames], folder: str | Path, *, plots: bool = True,
                     echo=print) -> pd.DataFrame:  # fmt: skip
    """Print and save the comparison of finished policies; with `plots`, the trace and PNGs too."""
    folder = Path(folder)
    summaries = {p: metrics.summary(f) for p, f in frames_by_policy.items()}
    table = summary_table(summaries)
    table.to_csv(folder / "summary.csv", index=False)
    util = utilization_table(frames_by_policy)
    util.to_csv(folder / "utilization.csv", index=False)
    echo(format_table(table))
    echo("\nbusy fraction per device")
    echo(format_table(util))
    by_cause = idle_table(frames_by_policy)
    by_cause.to_csv(folder / "idle.csv", index=False)
    echo("\nshare of the run per device: busy (pruned: the part on rows later pruned), idle by cause")
    echo(format_table(idle_shares(by_cause)))
    if plots:
        written = [
            write_chrome_trace(frames_by_policy, folder / "trace.json"),
            plot_gantt(frames_by_policy, folder / "gantt.png"),
            plot_utilization(frames_by_policy, folder / "utilization.png"),
            plot_speedup(table, folder / "speedup.png",
                         baseline="chunk-pp" if "chunk-pp" in frames_by_policy else next(iter(frames_by_policy))),
        ]  # fmt: skip
        echo(f"\nwrote {folder}/: frames per policy, summary.csv, " + ", ".join(p.name for p in written))
    return table
