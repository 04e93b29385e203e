"""`flowspec run` when a stage dies, hangs or wedges, when a link holds its messages past the budget,
or when the run itself is signalled: a non-zero exit in time that names the stage (or the signal),
no process or temporary folder left behind, and every request that completed before the failure on
disk (issue 16)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml

from runtime.emulation import LINK_DELAY_ENV
from runtime.stage import WEDGE_ENV

pytestmark = pytest.mark.runtime

TIMEOUT_S = 2.0
N_REQUESTS = 50
LONG_TOKENS = 200  # after the tiny fixture's two short requests: far more work than a test waits for
MID_RUN_S = 3.0  # after the stages are ready: the two short requests (40 tokens, ~0.3 s idle) are done, with
# room for a loaded machine (at 1.5 s, request 1 was still running once under the full suite and two other jobs)


def start_run(tiny, tmp_path: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """`flowspec run` on the tiny model: the fixture's two prompts (tiny.n_new tokens each, whose
    greedy outputs are known), then long requests that keep it busy for minutes."""
    spec = tmp_path / "long.yaml"
    spec.write_text(yaml.safe_dump({
        "pipeline": {"n_stages": 3},
        "decoding": {"max_new_tokens": LONG_TOKENS},
        "workload": {"prompt_tokens": 12},  # the prompts file's length: within the tiny model's 256 positions
        "tree": {"total": 10, "topk": 3, "depth": 3, "segment_size": 4},
        "expansion": {"total": 6, "topk": 3, "depth": 2},
        "runtime": {"model": str(tiny.folder), "stop_at_eos": False, "timeout_s": TIMEOUT_S},
    }))  # fmt: skip
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(N_REQUESTS):
            short = i < len(tiny.prompts)
            tokens = tiny.prompts[i] if short else np.random.default_rng(i).integers(0, tiny.vocab, 12).tolist()
            f.write(json.dumps({"tokens": tokens, "max_new_tokens": tiny.n_new if short else LONG_TOKENS}) + "\n")
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        cmd = [sys.executable, "-m", "cli", "run", str(spec), "--policy", "ar-pp", "--no-plots", "--no-stream",
               "--prompts", str(prompts), "--out", str(tmp_path / "out")]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2],
                                env={**os.environ, **(env or {})})  # fmt: skip
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
    time.sleep(MID_RUN_S)
    stages = {}
    for child in psutil.Process(proc.pid).children():
        cmd = child.cmdline()
        if "runtime.stage" in cmd:
            stages[int(cmd[cmd.index("--rank") + 1])] = child
    assert sorted(stages) == [1, 2, 3]
    return stages


def stage_folder(stages: dict[int, psutil.Process]) -> Path:
    """The launcher's temporary folder (it holds the scenario every stage was started with)."""
    cmd = stages[1].cmdline()
    folder = Path(cmd[cmd.index("runtime.stage") + 1]).parent
    assert folder.name.startswith("flowspec-stages-") and folder.is_dir(), folder
    return folder


def finish(proc: subprocess.Popen, stages: dict[int, psutil.Process]) -> None:
    """Whatever happened, nothing this test started outlives it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for child in stages.values():
        try:
            child.kill()  # a stopped process dies of SIGKILL too
        except psutil.NoSuchProcess:
            pass


def assert_nothing_left(stages: dict[int, psutil.Process], folder: Path) -> None:
    time.sleep(0.2)
    left = [c.pid for c in stages.values() if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"stage processes left behind: {left}"
    assert not folder.exists(), f"temporary folder left behind: {sorted(p.name for p in folder.iterdir())}"


def assert_completed_on_disk(tiny, tmp_path: Path, error: str) -> None:
    """The requests that completed before the failure are on disk — outputs, frames and the
    failure's record — and the two whose greedy output is known hold exactly that."""
    folder = tmp_path / "out" / "ar-pp"
    failure = json.loads((folder / "failure.json").read_text())
    assert error in failure["error"], failure
    completed = failure["completed_request_ids"]
    assert completed[:2] == [0, 1], failure
    assert len(completed) < N_REQUESTS
    outputs = {r["request_id"]: r for r in map(json.loads, (folder / "outputs.jsonl").read_text().splitlines())}
    assert sorted(outputs) == failure["started_request_ids"]
    for i, expected in enumerate(tiny.outputs):
        assert outputs[i]["tokens"] == expected
    for i in completed:
        assert outputs[i]["finish_reason"] == "max_new_tokens"
        assert len(outputs[i]["tokens"]) == (tiny.n_new if i < len(tiny.outputs) else LONG_TOKENS)
    for i in set(outputs) - set(completed):  # started, not finished: the tokens committed so far
        assert outputs[i]["finish_reason"] is None and len(outputs[i]["tokens"]) < LONG_TOKENS
    requests = pd.read_parquet(folder / "requests.parquet")
    assert sorted(requests["request_id"]) == completed
    assert set(pd.read_parquet(folder / "rounds.parquet")["request_id"]) == set(completed)


# how each failure is caused, what the error says, and how soon the run must end after it
FAILURES = {
    "killed": (signal.SIGKILL, {}, ["stage 2 (pid", "signal 9 (SIGKILL)"], 2 * TIMEOUT_S),
    # noticed by silence after TIMEOUT_S; the cleanup kills a stopped process at once (it defers SIGTERM)
    "stopped": (signal.SIGSTOP, {}, ["stage 2 (", "silent for"], 2 * TIMEOUT_S),
    "terminated": (signal.SIGTERM, {}, ["stage 2 (pid", "SIGTERM"], 2 * TIMEOUT_S),
    # heartbeats on, forwards off: the progress watchdog's case
    "wedged": (signal.SIGUSR1, {WEDGE_ENV: "2"}, ["no progress for", "is held by stage 2 (tcp://"], 2 * TIMEOUT_S),
    # the link from stage 2 to stage 3 holds every segment past the budget; both ends heartbeat: the watchdog's case
    "delayed": (signal.SIGUSR2, {LINK_DELAY_ENV: f"2>3:{3 * TIMEOUT_S:g}"},
                ["no progress for", "has not reached stage 3 (tcp://", "late or lost on the link from stage 2"],
                2 * TIMEOUT_S),  # fmt: skip
    # the link from stage 2 to D0 holds its heartbeats past the budget while the data flows: silence
    "delayed-heartbeats": (signal.SIGUSR2, {LINK_DELAY_ENV: f"2>0:{3 * TIMEOUT_S:g}"}, ["stage 2 (tcp://", "silent for"],
                           2 * TIMEOUT_S),  # fmt: skip
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_lost_stage_ends_the_run_named_and_loses_nothing(tiny, tmp_path: Path, failure: str) -> None:
    sig, env, expected, within_s = FAILURES[failure]
    proc, log = start_run(tiny, tmp_path, env)
    stages: dict[int, psutil.Process] = {}
    try:
        stages = stage_processes(proc, log)
        folder = stage_folder(stages)
        t_fail = time.monotonic()
        os.kill(stages[2].pid, sig)
        code = proc.wait(timeout=30)
        elapsed = time.monotonic() - t_fail
        text = log.read_text()
        assert code == 1, text
        error = next(line for line in text.splitlines() if line.startswith("error: "))
        for part in expected:
            assert part in text, text
        assert elapsed < within_s, f"took {elapsed:.1f} s"
        assert_nothing_left(stages, folder)
        assert_completed_on_disk(tiny, tmp_path, error.removeprefix("error: ").split("\n")[0])
    finally:
        finish(proc, stages)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signalled_run_cleans_up_and_keeps_what_it_finished(tiny, tmp_path: Path, sig: signal.Signals,
                                                              code: int) -> None:  # fmt: skip
    """SIGTERM (`timeout`, a CI cancel, `kill`) and SIGINT (Ctrl-C) take the error path: stages
    stopped, temporary folder removed, completed requests written; exit 128 + the signal."""
    proc, log = start_run(tiny, tmp_path)
    stages: dict[int, psutil.Process] = {}
    try:
        stages = stage_processes(proc, log)
        folder = stage_folder(stages)
        t_signal = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == code, log.read_text()
        elapsed = time.monotonic() - t_signal
        text = log.read_text()
        assert f"interrupted by {sig.name}: stages stopped" in text, text
        assert "Traceback" not in text, text
        assert elapsed < 3.0, f"took {elapsed:.1f} s"
        assert_nothing_left(stages, folder)
        assert_completed_on_disk(tiny, tmp_path, f"interrupted by {sig.name}")
        for rank, stage_log in ((r, folder / f"stage{r}.log") for r in stages):  # removed, so the exit codes tell
            assert not stage_log.exists(), rank
    finally:
        finish(proc, stages)
