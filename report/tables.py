"""Comparison tables: per-policy summaries, utilization and idle shares, and the folder of results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from flowspec import idle, metrics
from flowspec.policy import reference_baselines
from report.plots import plot_gantt, plot_speedup, plot_utilization
from report.timeline import Frames, _device, _frame, _number_text, write_chrome_trace


def summary_table(summaries: Mapping[str, pd.DataFrame], baselines: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per policy from one-row ``metrics.summary`` frames, with a speedup per baseline
    (default: the policies marked `reference_baseline` in `flowspec.policy.POLICIES`).

    Speedup columns (``speedup_vs_<baseline>``) appear only for baselines among `summaries`.

    >>> s = {"flowspec": pd.DataFrame({"tokens_per_s": [30.0], "accepted_per_step": [2.0],
    ...                                "ttft_s": [0.5], "tpot_s": [0.03]}),
    ...      "chunk-pp": pd.DataFrame({"tokens_per_s": [20.0], "accepted_per_step": [2.5],
    ...                                "ttft_s": [0.6], "tpot_s": [0.05]})}
    >>> summary_table(s)["speedup_vs_chunk-pp"].tolist()
    [1.5, 1.0]
    """
    baselines = reference_baselines() if baselines is None else baselines
    present = [b for b in baselines if b in summaries]
    speedups = [f"speedup_vs_{b}" for b in present]
    columns = ["policy", "tokens_per_s", *speedups, "accepted_per_step", "ttft_s", "tpot_s"]
    if not summaries:
        return pd.DataFrame({c: pd.Series(dtype=object if c == "policy" else float)
                             for c in columns})
    table = pd.concat([s.assign(policy=p) for p, s in summaries.items()], ignore_index=True)
    for baseline, column in zip(present, speedups, strict=True):  # the ratio is metrics' to define
        table[column] = metrics.compare(summaries, baseline)[column].to_numpy()
    lossy = pd.Series(False, index=table.index)
    if "relaxed_share" in table:
        lossy |= table["relaxed_share"] > 0
    if "lossy" in table:
        lossy |= table["lossy"].fillna(False).astype(bool)  # asked to relax, whether or not it did
    if "max_concurrent" in table and (table["max_concurrent"] > 1).any():
        # Several requests served at once (a batching policy): per-request speed alone would hide
        # what batching is for, so the workload's throughput and the batch stand beside it.
        columns[2 + len(speedups):2 + len(speedups)] = ["throughput_tokens_per_s", "max_concurrent"]
    if lossy.any():
        # A lossy run is never shown as a policy's own: its label says so, and beside its speed-up
        # stands the share of its tokens that strict verification would have refused.
        table.loc[lossy, "policy"] = table.loc[lossy, "policy"].astype(str) + " (lossy)"
        columns.insert(2 + len(speedups), "relaxed_share")
    return table[columns]


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
                         baseline=next((b for b in reference_baselines() if b in frames_by_policy), next(iter(frames_by_policy)))),
        ]  # fmt: skip
        echo(f"\nwrote {folder}/: frames per policy, summary.csv, " + ", ".join(p.name for p in written))
    return table
