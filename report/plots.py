"""Every figure the project draws, from record frames and tables (matplotlib `Figure` on an Agg
canvas: no pyplot state, no GUI backend; matplotlib is imported only when a figure is drawn)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from flowspec import idle, metrics
from report.timeline import Frames, _device, _frame, _lanes, _number_text, _timeline


# Spans and transfers by kind; tab10 colours, so the chart survives greyscale printing tolerably.
KIND_COLORS = {"prefill": "#7f7f7f", "tree": "#1f77b4", "verify": "#d62728", "draft": "#2ca02c",
               "step": "#8c564b", "segment": "#9467bd", "prune": "#ff7f0e"}
KIND_LABELS = {"segment": "segment transfer", "step": "D0 bookkeeping"}
# Idle bands in the Gantt chart, by cause (flowspec.idle): the colour of what the device
# waits for, translucent so a band never reads as work, and a hatch each for greyscale.
IDLE_STYLES = {"link": ("#9467bd", "////"), "draft_node": ("#2ca02c", "...."),
               "upstream": ("#1f77b4", "\\\\\\\\"), "unrecorded": ("#7f7f7f", "")}
IDLE_LABELS = {"link": "idle: link", "draft_node": "idle: draft node", "upstream": "idle: upstream",
               "unrecorded": "idle: unrecorded"}


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
    relaxed = table["relaxed_share"] if "relaxed_share" in table else pd.Series(0.0, index=table.index)
    labels = [f"{_number_text(t, False)} tok/s"
              + (f"\n{_number_text(s, True)}" if np.isfinite(s) else "")
              + (f"\n{r:.0%} relaxed" if r > 0 or str(p).endswith("(lossy)") else "")  # how lossy, beside its speed-up
              for p, t, s, r in zip(table["policy"], table["tokens_per_s"], speedups, relaxed, strict=True)]
    ax.bar_label(bars, labels=labels, fontsize=8, padding=2)
    ax.margins(y=0.2)  # room for two-line labels above the tallest bar
    ax.set_ylabel("tokens/s")
    ax.set_title(f"Throughput (× = speedup vs {baseline})", loc="left", fontweight="bold")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_validation(headline: pd.DataFrame, path: str | Path, tolerance: float | None = None) -> Path:
    """Predicted against measured tokens/s, one point per policy and mode (``sim.validation.headline``),
    with the y = x line, given `tolerance` the band within which a prediction passes, and for
    calibrated predictions a bar over the 5th-95th percentile of their draws."""
    fig, (ax,) = _figure(1, 6.0, 5.0)
    if headline.empty:
        _empty(ax, "nothing validated")
        return _save(fig, path)
    shown = [c for c in ("tokens_per_s_measured", "tokens_per_s_predicted", "tokens_per_s_p95") if c in headline]
    hi = 1.15 * float(np.nanmax(headline[shown].to_numpy()))
    xs = np.array([0.0, hi])
    ax.plot(xs, xs, color="black", lw=1, label="predicted = measured")
    if tolerance:
        ax.fill_between(xs, xs * (1 - tolerance), xs * (1 + tolerance), color="#9e9e9e", alpha=0.25,
                        label=f"±{tolerance:.0%}")  # fmt: skip
    for mode, marker in (("replay", "o"), ("calibrated", "s")):
        part = headline[headline["mode"] == mode]
        if part.empty:
            continue
        points = ax.scatter(part["tokens_per_s_measured"], part["tokens_per_s_predicted"], marker=marker, label=mode,
                            zorder=3)  # fmt: skip
        if "tokens_per_s_p05" in part and part["tokens_per_s_p05"].notna().any():
            low = (part["tokens_per_s_predicted"] - part["tokens_per_s_p05"]).clip(lower=0)
            high = (part["tokens_per_s_p95"] - part["tokens_per_s_predicted"]).clip(lower=0)
            ax.errorbar(part["tokens_per_s_measured"], part["tokens_per_s_predicted"], yerr=[low, high], fmt="none",
                        ecolor=points.get_facecolor()[0], elinewidth=1, capsize=2, zorder=2)  # fmt: skip
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


def sweep_ticks(xs: np.ndarray, min_gap: float = 0.04) -> list:
    """The swept values to label on an axis: all of them, less any closer than `min_gap` of the
    range to the previous label (their text would overlap); the last value is always labelled.

    >>> sweep_ticks(np.array([0, 100, 200, 499, 500]))
    [0, 100, 200, 500]
    """
    values = sorted(xs.tolist())
    span = values[-1] - values[0]
    ticks = values[:1]
    for v in values[1:]:
        if v - ticks[-1] >= min_gap * span:
            ticks.append(v)
        elif v == values[-1] and len(ticks) > 1:
            ticks[-1] = v
    return ticks


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
            ax.set_xticks(sweep_ticks(xs))  # swept values, not 2.25 between 2 and 2.5 stages
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


def plot_reach(summary: pd.DataFrame, path: str | Path, max_depth: int) -> Path:
    """Share of verifications reaching each depth, one line per drafter (all prompt sets)."""
    fig, (ax,) = _figure(1, 6.0, 3.0)
    depths = list(range(1, max_depth + 1))
    for _, row in summary[summary["prompt_set"] == "all"].iterrows():
        ax.plot(depths, [row[f"reach_{d}"] for d in depths], marker="o",
                label=f"{row['drafter']}: {row['mean_accepted']:.2f} tok/verification")  # fmt: skip
    ax.set_xlabel("draft tokens accepted, at least")
    ax.set_ylabel("share of verifications")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_hetedge(table: pd.DataFrame, path: str | Path) -> Path:
    """Mean latency per scheme of `flowspec hetedge` (``sim.hetedge.compare`` rows), each bar
    annotated with the joint plan's reduction against it; the joint plan's bar is blue."""
    fig, (ax,) = _figure(1, 7.0, 4.0)
    colors = ["#1f77b4" if s == "joint" else "#9e9e9e" for s in table["scheme"]]
    bars = ax.bar(table["scheme"].astype(str), table["mean_latency_s"], color=colors)
    # under a baseline's bar: how much lower the joint plan's latency is than that baseline's
    labels = [f"{_number_text(m, False)} s" + ("" if s == "joint" else f"\njoint: {-r:+.0%}")
              for s, m, r in zip(table["scheme"], table["mean_latency_s"], table["joint_reduction"], strict=True)]
    ax.bar_label(bars, labels=labels, fontsize=8, padding=2)
    ax.margins(y=0.2)
    ax.set_ylabel("mean latency per user (s)")
    ax.set_title("hetedge-sd: the joint plan against the baselines", loc="left", fontweight="bold")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
