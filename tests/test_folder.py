"""Concurrent runs never share an output folder: the second takes a sibling, or fails by name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from flowspec.config import ScenarioError
from report.folder import claimed

TINY_YAML = str(Path(__file__).resolve().parents[1] / "scenarios" / "tiny.yaml")


def test_a_claimed_default_folder_sends_the_next_run_to_a_sibling(tmp_path: Path) -> None:
    said: list[str] = []
    with claimed(tmp_path / "runs" / "x", chosen=False) as first:
        with claimed(tmp_path / "runs" / "x", chosen=False, echo=said.append) as second:
            assert (first.name, second.name) == ("x", "x-2")
        assert said == [f"{tmp_path / 'runs' / 'x'} is being written by another run; writing into {second} instead"]
    with claimed(tmp_path / "runs" / "x", chosen=False) as again:  # released: no stale lock
        assert again.name == "x"


def test_a_folder_named_with_out_is_never_swapped(tmp_path: Path) -> None:
    with claimed(tmp_path / "mine", chosen=True):
        with pytest.raises(ScenarioError, match=rf"mine: another run \(pid {os.getpid()}\) is writing there"):
            with claimed(tmp_path / "mine", chosen=True):
                pass


def test_a_killed_run_leaves_no_lock_behind(tmp_path: Path) -> None:
    code = ("import sys, time; from pathlib import Path; from report.folder import claimed\n"
            "with claimed(Path(sys.argv[1]), chosen=True):\n    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "f")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ScenarioError, match=rf"pid {holder.pid}"):
            with claimed(tmp_path / "f", chosen=True):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        with claimed(tmp_path / "f", chosen=True) as folder:
            assert folder == tmp_path / "f"
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_simulate_writes_beside_a_run_in_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with claimed(Path("runs") / "tiny", chosen=False):
        result = CliRunner().invoke(main, ["simulate", TINY_YAML, "--no-plots", "--policy", "ar-pp"])
    assert result.exit_code == 0, result.output
    assert "writing into runs/tiny-2 instead" in result.stderr
    assert (tmp_path / "runs" / "tiny-2" / "resolved.yaml").is_file() and not (tmp_path / "runs" / "tiny" / "resolved.yaml").exists()
