"""Reports from record frames: comparison tables, Chrome/Perfetto traces and plots.

`timeline` lays spans and transfers out as tracks and writes the trace, `tables` builds the
comparison tables and results folders, `plots` draws every figure; this module re-exports them.

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

from report.plots import (
    IDLE_LABELS,
    IDLE_STYLES,
    KIND_COLORS,
    KIND_LABELS,
    plot_gantt,
    plot_reach,
    plot_hetedge,
    plot_speedup,
    plot_sweep,
    plot_utilization,
    plot_validation,
)
from report.tables import format_table, idle_shares, idle_table, summary_table, utilization_table, write_comparison
from report.timeline import Frames, write_chrome_trace

__all__ = ["IDLE_LABELS", "IDLE_STYLES", "KIND_COLORS", "KIND_LABELS", "Frames", "format_table", "idle_shares",
           "idle_table", "plot_gantt", "plot_hetedge", "plot_reach", "plot_speedup", "plot_sweep", "plot_utilization",
           "plot_validation", "summary_table", "utilization_table", "write_chrome_trace", "write_comparison"]
