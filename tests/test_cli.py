"""The `flowspec` command line: version, help, `check` output and exit codes."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

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
    assert "check     Validate a scenario and print it resolved." in result.stdout
    for command in ("simulate", "sweep", "bench"):
        assert f"  {command}  " in result.stdout


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
