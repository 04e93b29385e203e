"""The `flowspec` command line: version, help, `check` output and exit codes."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import yaml
from click.testing import CliRunner

import cli
from flowspec.config import load_scenario, scenario_to_dict

TINY = Path(__file__).resolve().parents[1] / "scenarios" / "tiny.yaml"


def test_version_and_help():
    """`--version` reports the installed package version; `--help` lists the commands."""
    runner = CliRunner()
    result = runner.invoke(cli.main, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"flowspec, version {version('flowspec')}\n"
    result = runner.invoke(cli.main, ["--help"])
    assert result.exit_code == 0
    assert re.search(r"\n  check +Validate a scenario and print it resolved\.\n", result.stdout)
    for command in ("simulate", "sweep", "bench", "run", "stage", "train-draft"):
        assert re.search(rf"\n  {command} +[A-Z]", result.stdout), command


def test_check_prints_resolved_scenario():
    """`check` exits 0 and prints YAML that loads back to the same scenario, overrides applied."""
    result = CliRunner().invoke(cli.main, ["check", str(TINY), "--set", "tree.topk=8", "--set", "policy=chunk-pp"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    expected = load_scenario(TINY, ["tree.topk=8", "policy=chunk-pp"])
    assert yaml.safe_load(result.stdout) == scenario_to_dict(expected)
    assert expected.tree.topk == 8 and expected.policy == "chunk-pp"


def test_check_bad_scenario_exits_2_with_message(tmp_path, monkeypatch):
    """An invalid scenario exits 2 with one `error: ...` line on stderr and nothing on stdout."""
    monkeypatch.chdir(tmp_path)
    Path("tiny.yaml").write_text("tree:\n  topk: 0\n")
    result = CliRunner().invoke(cli.main, ["check", "tiny.yaml"])
    assert result.exit_code == 2
    assert result.stderr == "error: tiny.yaml: tree.topk must be >= 1, got 0\n"
    assert result.stdout == ""


def test_check_bad_override_exits_2(tmp_path, monkeypatch):
    """An override of a key the schema lacks exits 2 and names the key."""
    monkeypatch.chdir(tmp_path)
    Path("tiny.yaml").write_text("seed: 1\n")
    result = CliRunner().invoke(cli.main, ["check", "tiny.yaml", "--set", "tree.topkk=3"])
    assert result.exit_code == 2
    assert result.stderr == (
        "error: tiny.yaml: override tree.topkk=3: unknown key tree.topkk (known: depth, segment_size, topk, total)\n"
    )


def test_check_missing_file_exits_2(tmp_path, monkeypatch):
    """A missing scenario file is a bad scenario (exit 2), reported by the loader, not by click."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.main, ["check", "nope.yaml"])
    assert result.exit_code == 2
    assert result.stderr == "error: nope.yaml: no such file\n"


def test_other_failures_exit_1(monkeypatch):
    """Anything but a ScenarioError is a failure (exit 1) and keeps its exception for the traceback."""

    def broken(path, overrides):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cli, "load_scenario", broken)
    result = CliRunner().invoke(cli.main, ["check", str(TINY)])
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)


def test_simulate_writes_frames_table_trace_and_plots(tmp_path):
    """`simulate` prints the comparison and leaves frames per policy, the trace and plots."""
    out = tmp_path / "run"
    result = CliRunner().invoke(
        cli.main, ["simulate", str(TINY), "--policy", "flowspec", "--policy", "chunk-pp", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "flowspec" in result.stdout and "speedup_vs_chunk-pp" in result.stdout and "×" in result.stdout
    for name in ("resolved.yaml", "summary.csv", "utilization.csv", "trace.json", "gantt.png",
                 "utilization.png", "speedup.png", "flowspec/steps.parquet", "chunk-pp/stage_spans.parquet"):
        assert (out / name).is_file(), name
    assert load_scenario(out / "resolved.yaml") == load_scenario(TINY)


def test_simulate_bad_profile_exits_2_naming_the_file(tmp_path):
    """A scenario naming a missing device profile is bad input: exit 2, the path in the message."""
    result = CliRunner().invoke(cli.main, ["simulate", str(TINY), "--set", "devices.stage=no-such/board",
                                           "--out", str(tmp_path / "x"), "--no-plots"])  # fmt: skip
    assert result.exit_code == 2
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: ") and "no-such/board: profile folder missing" in last


def test_simulate_keeps_finished_policies_when_a_later_one_fails(tmp_path):
    """serial sends the whole 151-node tree at once, beyond the profile's 128-token grid: it fails
    after flowspec finished, whose frames and summary are still written; the exit code is 2."""
    out = tmp_path / "run"
    result = CliRunner().invoke(cli.main, [
        "simulate", str(TINY), "--policy", "flowspec", "--policy", "serial", "--out", str(out), "--no-plots",
        "--set", "tree.total=150", "--set", "tree.topk=10", "--set", "tree.depth=6", "--set", "tree.segment_size=16",
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "n_tokens" in result.stderr and "stage_forward.csv" in result.stderr
    assert (out / "flowspec" / "steps.parquet").is_file() and not (out / "serial").exists()
    assert "flowspec" in (out / "summary.csv").read_text()


def test_bench_sim_prints_and_writes_rates(tmp_path):
    """`bench sim` reports simulated tokens per wall-clock second per policy, in a table and a CSV."""
    out = tmp_path / "bench.csv"
    result = CliRunner().invoke(cli.main, ["bench", "sim", str(TINY), "--policy", "flowspec", "--policy", "ar-pp",
                                           "--repeat", "1", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert frame.policy.tolist() == ["flowspec", "ar-pp"]
    assert (frame.sim_tokens_per_wall_s > 0).all() and (frame.n_tokens == 48).all()


def test_sweep_writes_frame_and_plot(tmp_path):
    """`sweep` over one key writes sweep.csv with a row per value and policy, and a line plot."""
    out = tmp_path / "sweep"
    result = CliRunner().invoke(cli.main, ["sweep", str(TINY), "--grid", "network.bandwidth_mbps=100,1000",
                                           "--policy", "flowspec", "--workers", "1", "--out", str(out),
                                           "--set", "decoding.max_new_tokens=16"])  # fmt: skip
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "sweep.csv")
    assert frame["network.bandwidth_mbps"].tolist() == [100, 1000]
    assert (out / "sweep.png").is_file()
    bad = CliRunner().invoke(cli.main, ["sweep", str(TINY), "--grid", "tree.topk"])
    assert bad.exit_code == 2 and "expected KEY=V1,V2" in bad.stderr

