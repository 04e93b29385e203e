"""`flowspec run` when a stage dies or hangs: a non-zero exit that names the stage, in time, and no
process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = pytest.mark.runtime

TIMEOUT_S = 2.0


def start_run(tiny, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """`flowspec run` on the tiny model with work for far longer than the test waits."""
    spec = tmp_path / "long.yaml"
    spec.write_text(yaml.safe_dump({
        "pipeline": {"n_stages": 3},
        "decoding": {"max_new_tokens": 200},
        "tree": {"total": 10, "topk": 3, "depth": 3, "segment_size": 4},
        "expansion": {"total": 6, "topk": 3, "depth": 2},
        "workload": {"n_requests": 50, "prompt_tokens": 12},
        "runtime": {"model": str(tiny.folder), "stop_at_eos": False, "timeout_s": TIMEOUT_S},
    }))  # fmt: skip
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        cmd = [sys.executable, "-m", "cli", "run", str(spec), "--policy", "ar-pp", "--no-plots", "--no-stream",
               "--out", str(tmp_path / "out")]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
    return proc, log


def stage_processes(proc: subprocess.Popen, log: Path) -> dict[int, psutil.Process]:
    """The run's stage processes by rank, once every stage is ready and tokens flow."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        if "stages ready" in log.read_text():
            break
        time.sleep(0.2)
    else:
        pytest.fail("stages never became ready:\n" + log.read_text())
    time.sleep(1.0)  # mid-run
    stages = {}
    for child in psutil.Process(proc.pid).children():
        cmd = child.cmdline()
        if "runtime.stage" in cmd:
            stages[int(cmd[cmd.index("--rank") + 1])] = child
    assert sorted(stages) == [1, 2, 3]
    return stages


def finish(proc: subprocess.Popen, stages: dict[int, psutil.Process]) -> None:
    """Whatever happened, nothing this test started outlives it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for child in stages.values():
        if child.is_running():
            child.kill()


@pytest.mark.parametrize(("sig", "expected"), [(signal.SIGKILL, "stage 2 (pid"), (signal.SIGSTOP, "stage 2 (")])
def test_a_dead_or_hung_stage_ends_the_run(tiny, tmp_path: Path, sig: signal.Signals, expected: str) -> None:
    proc, log = start_run(tiny, tmp_path)
    stages: dict[int, psutil.Process] = {}
    try:
        stages = stage_processes(proc, log)
        t_kill = time.monotonic()
        os.kill(stages[2].pid, sig)
        code = proc.wait(timeout=30)
        elapsed = time.monotonic() - t_kill
        text = log.read_text()
        assert code == 1, text
        assert expected in text, text
        if sig == signal.SIGKILL:
            assert "signal 9 (SIGKILL)" in text
            assert elapsed < 2 * TIMEOUT_S, f"took {elapsed:.1f} s"
        else:  # noticed by silence after TIMEOUT_S; a stopped process takes the slow cleanup path
            assert "silent for" in text
            assert elapsed < 2 * TIMEOUT_S + 4.0, f"took {elapsed:.1f} s"
        time.sleep(0.2)
        left = [c.pid for c in stages.values() if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"stage processes left behind: {left}"
    finally:
        finish(proc, stages)
