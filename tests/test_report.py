"""report (the package) on frames from the in-memory driver: tables, the Perfetto trace, and every plot."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import report
from flowspec import metrics
from flowspec.config import DecodingConfig, ExpansionConfig, PipelineConfig, Policy, Scenario, TreeConfig
from flowspec.driver import Delays, InMemoryDriver
from flowspec.records import RECORD_TYPES, to_frame
from flowspec.synthetic import GroundTruth, HashLM, OracleDrafter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_STAGES = 3


def _run(policy: Policy, seed: int = 3) -> dict[str, pd.DataFrame]:
    scenario = Scenario(
        policy=policy,
        seed=seed,
        decoding=DecodingConfig(max_new_tokens=24, eos_token_id=0),
        pipeline=PipelineConfig(n_stages=N_STAGES),
        tree=TreeConfig(total=16, topk=3, depth=3, segment_size=4),
        expansion=ExpansionConfig(total=8, topk=2, depth=2),
    )
    model = HashLM(32, 6, seed=seed)
    drafter = OracleDrafter(GroundTruth(model), hit_rate=0.7, rank_weights=(3, 1, 1), seed=seed)
    driver = InMemoryDriver(scenario, drafter, model, delays=Delays(jitter=0.5))
    return driver.run([(0.0, [1, 2, 3, 4]), (0.03, [9] * 20)]).records.frames()


@pytest.fixture(scope="module")
def frames_by_policy() -> dict[str, dict[str, pd.DataFrame]]:
    return {"flowspec": _run(Policy.FLOWSPEC), "chunk-pp": _run(Policy.CHUNK_PP)}


def _empty_frames() -> dict[str, pd.DataFrame]:
    return {name: to_frame([], rtype) for name, rtype in RECORD_TYPES.items()}


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert len(data) > 5_000, f"{path.name} is only {len(data)} bytes: probably blank"


def test_summary_table_speedup_is_the_tokens_per_s_ratio(frames_by_policy):
    """Speedup columns exist only for present baselines and equal tokens/s over the baseline's."""
    summaries = {p: metrics.summary(f) for p, f in frames_by_policy.items()}
    table = report.summary_table(summaries)
    assert list(table.columns) == ["policy", "tokens_per_s", "speedup_vs_chunk-pp",
                                   "accepted_per_step", "ttft_s", "tpot_s"]  # no ar-pp here
    assert table["policy"].tolist() == ["flowspec", "chunk-pp"]
    flow = summaries["flowspec"]["tokens_per_s"].iloc[0]
    chunk = summaries["chunk-pp"]["tokens_per_s"].iloc[0]
    assert table["tokens_per_s"].tolist() == [flow, chunk]
    assert table["speedup_vs_chunk-pp"].tolist() == pytest.approx([flow / chunk, 1.0], rel=1e-12)
    assert table["accepted_per_step"].iloc[0] == summaries["flowspec"]["accepted_per_step"].iloc[0]


def test_format_table_aligns_and_marks_ratios(frames_by_policy):
    """The text table names every policy, writes speedups with ×, and has aligned columns."""
    table = report.summary_table({p: metrics.summary(f) for p, f in frames_by_policy.items()})
    text = report.format_table(table)
    lines = text.splitlines()
    assert "flowspec" in text and "chunk-pp" in text and "×" in text
    assert lines[0].split() == list(table.columns)
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert "1.00×" in lines[3]  # chunk-pp against itself: exactly 1, at 3 significant digits
    literal = pd.DataFrame({"policy": ["a", "bb"], "tokens_per_s": [1234.4, 0.030612],
                            "speedup_vs_x": [4 / 3, float("nan")]})
    assert report.format_table(literal).splitlines()[2:] == [
        "a               1234         1.33×",  # 3 significant digits, but no 1.23e+03
        "bb            0.0306             -",
    ]


def test_chrome_trace_structure(frames_by_policy, tmp_path):
    """The trace is JSON with one X event per span and transfer, on named device and link threads."""
    path = report.write_chrome_trace(frames_by_policy, tmp_path / "trace.json")
    trace = json.loads(path.read_text(encoding="utf-8"))
    events = trace["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    n_expected = sum(len(f["stage_spans"]) + len(f["link_transfers"]) for f in frames_by_policy.values())
    assert len(complete) == n_expected
    for e in complete:
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
        assert isinstance(e["ts"], int) and isinstance(e["dur"], int) and e["dur"] >= 0
    processes = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert sorted(processes.values()) == ["chunk-pp", "flowspec"]
    for pid in processes:
        threads = {e["tid"]: e["args"]["name"] for e in events
                   if e["name"] == "thread_name" and e["pid"] == pid}
        names = set(threads.values())
        assert {"D0", "V1", f"V{N_STAGES}", "link 0→1", f"link {N_STAGES}→0"} <= names
        used = {e["tid"] for e in complete if e["pid"] == pid}
        assert used <= set(threads), "every X event sits on a named thread"
        # Perfetto drops slices that overlap without nesting: lanes must keep each thread serial.
        for tid in used:
            spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in complete
                           if e["pid"] == pid and e["tid"] == tid)
            assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    names = {e["name"] for e in complete}
    assert any(n.startswith("tree seg ") and n.endswith(" tok)") for n in names)
    assert any(n.startswith("segment ") and n.endswith("B") for n in names)
    assert any("kv_len" in e["args"] for e in complete)
    assert any("nbytes" in e["args"] for e in complete)


def test_every_plot_writes_a_nontrivial_png(frames_by_policy, tmp_path):
    """Gantt, utilization, speedup and both sweep forms each write a real, non-blank PNG."""
    table = report.summary_table({p: metrics.summary(f) for p, f in frames_by_policy.items()})
    sweep = pd.DataFrame([{"policy": p, "n_stages": n, "topk": k,
                           "tokens_per_s": 10.0 * n + k + (p == "flowspec")}
                          for p in ("flowspec", "chunk-pp") for n in (2, 3, 4) for k in (2, 4)])
    paths = [
        report.plot_gantt(frames_by_policy, tmp_path / "gantt.png"),
        report.plot_gantt(frames_by_policy, tmp_path / "gantt_window.png", max_time_s=0.1),
        report.plot_utilization(frames_by_policy, tmp_path / "util.png"),
        report.plot_speedup(table, tmp_path / "speedup.png"),
        report.plot_sweep(sweep, "n_stages", path=tmp_path / "sweep.png"),
        report.plot_sweep(sweep, "n_stages", y_key="topk", path=tmp_path / "heat.png"),
    ]
    for path in paths:
        assert path.parent == tmp_path
        _assert_png(path)


def test_empty_frames_do_not_crash(frames_by_policy, tmp_path):
    """Empty record frames, a policy without spans and empty tables draw notes instead of raising."""
    empty = _empty_frames()
    mixed = {"flowspec": frames_by_policy["flowspec"], "idle": empty}
    only_empty = {"idle": empty}
    no_sweep = pd.DataFrame(columns=["policy", "x", "k", "tokens_per_s"])
    assert report.summary_table({}).empty
    table = report.summary_table({"idle": metrics.summary(empty)})
    assert "idle" in report.format_table(table)
    trace = json.loads(report.write_chrome_trace(only_empty, tmp_path / "t.json").read_text("utf-8"))
    assert [e for e in trace["traceEvents"] if e["ph"] == "X"] == []
    report.plot_gantt(mixed, tmp_path / "g1.png")
    for name, call in {
        "g2": lambda p: report.plot_gantt(only_empty, p),
        "g3": lambda p: report.plot_gantt({}, p),
        "u1": lambda p: report.plot_utilization(mixed, p),
        "u2": lambda p: report.plot_utilization(only_empty, p),
        "s1": lambda p: report.plot_speedup(table, p),
        "s2": lambda p: report.plot_speedup(report.summary_table({}), p),
        "w1": lambda p: report.plot_sweep(no_sweep, "x", path=p),
        "w2": lambda p: report.plot_sweep(no_sweep, "x", y_key="k", path=p),
    }.items():
        assert call(tmp_path / f"{name}.png").read_bytes()[:8] == PNG_MAGIC, name


IDLE_PARTS = ["busy_s", "idle_link_s", "idle_draft_node_s", "idle_upstream_s", "idle_unrecorded_s",
              "idle_no_request_s"]


def test_comparison_prints_and_saves_idle_by_cause(frames_by_policy, tmp_path):
    """write_comparison prints each device's busy share and idle shares by cause, and writes
    idle.csv in seconds, whose parts add up to the window on every device."""
    lines: list[str] = []
    report.write_comparison(frames_by_policy, tmp_path, plots=False, echo=lines.append)
    text = "\n".join(lines)
    shares = text.split("idle by cause\n", 1)[1].splitlines()
    assert shares[0].split() == ["policy", "device", "busy", "pruned", "link", "draft_node", "upstream",
                                 "unrecorded", "no_request"]
    assert len(shares) == 2 + 2 * (N_STAGES + 1)  # header, rule, one row per policy and device
    idle = pd.read_csv(tmp_path / "idle.csv")
    assert list(idle.columns[:3]) == ["policy", "device", "stage"]
    assert idle["device"].tolist() == ["D0", "V1", "V2", "V3"] * 2
    parts = idle[IDLE_PARTS].fillna(0.0).sum(axis=1)
    assert parts.to_numpy() == pytest.approx(idle["window_s"].to_numpy())
    shown = report.idle_shares(idle)
    assert shown["busy"].to_numpy() == pytest.approx(idle["busy_fraction"].to_numpy())


def test_gantt_shades_idle_time_with_a_legend_entry_per_cause(frames_by_policy, tmp_path, monkeypatch):
    """The Gantt legend names each idle cause drawn, and the bands sit in device rows only."""
    figures = []
    monkeypatch.setattr(report.plots, "_save", lambda fig, path: figures.append(fig) or Path(path))
    report.plot_gantt(frames_by_policy, tmp_path / "gantt.png")
    (fig,) = figures
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    idle_labels = {label for label in labels if label.startswith("idle: ")}
    assert {"idle: link", "idle: draft node", "idle: upstream"} <= idle_labels <= set(report.IDLE_LABELS.values())
    assert "tree" in labels  # the span kinds are still there
    for ax in fig.axes:
        n_devices = sum(label.get_text()[:1] in ("D", "V") for label in ax.get_yticklabels())
        bands = [c for c in ax.collections if c.get_zorder() == 0]
        assert bands, "no idle band drawn"
        for band in bands:
            for path in band.get_paths():
                assert path.vertices[:, 1].max() <= n_devices - 0.5 + 1e-9  # rows below are links


@pytest.mark.parametrize("policy", ["flowspec", "ar-pp"])
def test_idle_split_of_a_simulated_run(policy):
    """tiny.yaml in the simulator: parts add up to the window on every device, busy equals the
    utilization table's, nothing is unrecorded (the simulator records all it charges), and only
    flowspec forwards rows that pruning later discards (ar-pp never prunes)."""
    from flowspec.config import load_scenario
    from sim.experiment import simulate, with_policy

    frames = simulate(with_policy(load_scenario(Path(__file__).parents[1] / "scenarios" / "tiny.yaml"),
                                  policy)).frames()  # fmt: skip
    idle = report.idle_table({policy: frames})
    assert idle["device"].tolist() == ["D0", "V1", "V2", "V3"]
    assert idle[IDLE_PARTS].fillna(0.0).sum(axis=1).to_numpy() == pytest.approx(idle["window_s"].to_numpy())
    util = report.utilization_table({policy: frames}).iloc[0]
    assert idle["busy_fraction"].tolist() == pytest.approx([util[d] for d in idle["device"]])
    assert idle["idle_unrecorded_s"].to_numpy() == pytest.approx(0.0, abs=1e-9)
    pruned = idle.set_index("device")["pruned_work_s"]
    if policy == "ar-pp":
        assert (pruned.drop("D0") == 0).all()
    else:
        assert pruned["V1"] > 0.1 * idle.set_index("device").loc["V1", "busy_s"]


def test_report_imports_matplotlib_lazily():
    """Importing report (as the CLI does) must not load matplotlib; only plotting does."""
    import subprocess
    import sys

    code = "import sys, report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_lossy_run_is_labelled_and_shows_how_lossy_beside_its_speedup(tmp_path):
    """A run with relaxed acceptances (dsd, tau > 0) is 'dsd (lossy)' in the table and the plot,
    with the share of its tokens that strict verification would have refused."""
    one = lambda tps, relaxed: pd.DataFrame({"tokens_per_s": [tps], "accepted_per_step": [2.0], "ttft_s": [0.1],  # noqa: E731
                                             "tpot_s": [0.05], "relaxed_share": [relaxed]})
    table = report.summary_table({"chunk-pp": one(10.0, 0.0), "dsd": one(15.0, 0.125)})
    assert table["policy"].tolist() == ["chunk-pp", "dsd (lossy)"]
    assert list(table.columns[:4]) == ["policy", "tokens_per_s", "speedup_vs_chunk-pp", "relaxed_share"]
    assert table["relaxed_share"].tolist() == [0.0, 0.125]
    lossless = report.summary_table({"chunk-pp": one(10.0, 0.0), "dsd": one(12.0, 0.0)})
    assert "relaxed_share" not in lossless and lossless["policy"].tolist() == ["chunk-pp", "dsd"]
    # asked to relax (tau > 0) but nothing was: still labelled by what it was asked to do
    asked = report.summary_table({"chunk-pp": one(10.0, 0.0).assign(lossy=False), "dsd": one(12.0, 0.0).assign(lossy=True)})
    assert asked["policy"].tolist() == ["chunk-pp", "dsd (lossy)"] and asked["relaxed_share"].tolist() == [0.0, 0.0]
    assert report.plot_speedup(table, tmp_path / "speedup.png").stat().st_size > 1000


def test_sweep_ticks_label_every_swept_value_unless_two_would_overlap() -> None:
    from report.plots import sweep_ticks

    assert sweep_ticks(np.array([2, 3, 4, 5])) == [2, 3, 4, 5]
    assert sweep_ticks(np.array([0, 100, 200, 300, 400, 499, 500])) == [0, 100, 200, 300, 400, 500]
    assert sweep_ticks(np.array([0.0, 0.01, 1.0])) == [0.0, 1.0]
    assert sweep_ticks(np.array([7])) == [7]
