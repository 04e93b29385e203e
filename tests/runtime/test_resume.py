"""`flowspec run --resume`: a run that lost a stage mid-request, resumed once the stage is back, ends
with the generations of a run that was never interrupted, token for token (issue 16).

The failed run is real: `flowspec run` on the tiny model with three stage processes, and stage 2 is
SIGKILLed from D0's own token stream once request 1 has committed KILL_AFTER tokens, so the failure
always lands in the middle of that request, whatever the machine's load.
"""

from __future__ import annotations

import gc
import json
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from click.testing import CliRunner
from transformers import LlamaForCausalLM

from cli import main
from runtime.outputs import TextStream

pytestmark = pytest.mark.runtime

N_NEW = (20, 60, 20)  # request 1 is the one the failure cuts
KILL_AFTER = 12  # request 1's committed tokens when stage 2 dies


def stage_children() -> dict[int, psutil.Process]:
    """This process's stage children by rank (the cluster that `flowspec run` started in-process)."""
    out = {}
    for child in psutil.Process(os.getpid()).children():
        try:
            cmd = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "runtime.stage" in cmd:
            out[int(cmd[cmd.index("--rank") + 1])] = child
    return out


def end_stages() -> list[int]:
    """Kill whatever stage children are left (a run must leave none); their pids."""
    left = [c for c in stage_children().values() if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    for child in left:
        child.kill()
        child.wait(timeout=10)
    return [c.pid for c in left]


def run(args: list[str]):
    result = CliRunner().invoke(main, ["run", *args, "--no-plots"])
    gc.unfreeze()  # a failed run freezes the heap for its exit; this process goes on
    return result


@pytest.fixture(scope="module")
def failed(tiny, greedy, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[list[int]], list[list[int]]]:
    """A failed run's folder, its scenario file, the requests' prompts and their uninterrupted greedy outputs."""
    tmp = tmp_path_factory.mktemp("resume")
    model = LlamaForCausalLM.from_pretrained(tiny.folder).eval()
    prompts = [*tiny.prompts, np.random.default_rng(3).integers(0, tiny.vocab, 12).tolist()]
    expected = [greedy(model, p, n) for p, n in zip(prompts, N_NEW)]
    spec = tmp / "resume.yaml"
    spec.write_text(yaml.safe_dump({
        "policy": "flowspec",
        "pipeline": {"n_stages": 3},
        "decoding": {"max_new_tokens": max(N_NEW)},
        "workload": {"prompt_tokens": 12},
        "tree": {"total": 10, "topk": 3, "depth": 3, "segment_size": 4},
        "expansion": {"total": 6, "topk": 3, "depth": 2},
        "runtime": {"model": str(tiny.folder), "stop_at_eos": False, "timeout_s": 2.0},
    }))  # fmt: skip
    prompts_file = tmp / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"tokens": p, "max_new_tokens": n}) + "\n" for p, n in zip(prompts, N_NEW)))
    seen: dict[int, int] = {}

    def kill_mid_request(stream: TextStream, request_id: int, tokens: tuple[int, ...]) -> None:
        """D0's token stream (the first policy's): stage 2 dies once request 1 has KILL_AFTER tokens."""
        before = seen.get(request_id, 0)
        seen[request_id] = before + len(tokens)
        if request_id == 1 and before < KILL_AFTER <= seen[1]:
            os.kill(stage_children()[2].pid, signal.SIGKILL)

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(TextStream, "__call__", kill_mid_request)
            result = run([str(spec), "--prompts", str(prompts_file), "--out", str(tmp / "failed")])
        assert result.exit_code == 1, result.output
        assert "stage 2 (pid" in result.output and "SIGKILL" in result.output, result.output
    finally:
        assert end_stages() == [], "the failed run left stage processes behind"
    return tmp / "failed", spec, prompts, expected


def outputs(folder: Path) -> dict[int, dict]:
    return {r["request_id"]: r for r in map(json.loads, (folder / "outputs.jsonl").read_text().splitlines())}


def test_a_resumed_run_generates_what_an_uninterrupted_run_does(failed, tmp_path: Path) -> None:
    """Request 0 (finished before the failure) is carried over, request 1 continues after the tokens
    it committed, request 2 is served whole: all three equal greedy `generate` token for token."""
    folder, spec, prompts, expected = failed
    failure = json.loads((folder / "flowspec" / "failure.json").read_text())
    assert failure["completed_request_ids"] == [0] and failure["started_request_ids"] == [0, 1], failure
    committed = outputs(folder / "flowspec")[1]["tokens"]
    assert KILL_AFTER <= len(committed) < N_NEW[1]
    assert committed == expected[1][: len(committed)]  # committed tokens are final
    try:
        result = run([str(spec), "--resume", str(folder), "--out", str(tmp_path / "resumed")])
    finally:
        assert end_stages() == [], "the resumed run left stage processes behind"
    assert result.exit_code == 0, result.output
    assert f"request 1 after {len(committed)} token(s)" in result.output, result.output
    got = outputs(tmp_path / "resumed" / "flowspec")
    assert sorted(got) == [0, 1, 2]
    for rid, tokens in enumerate(expected):
        assert got[rid]["tokens"] == tokens, rid
        assert got[rid]["prompt_tokens"] == prompts[rid] and got[rid]["finish_reason"] == "max_new_tokens"
    assert got[1]["resumed_at"] == len(committed) and "resumed_at" not in got[2]
    served = pd.read_parquet(tmp_path / "resumed" / "flowspec" / "requests.parquet")
    assert sorted(served["request_id"]) == [1, 2]  # request 0 was not served again
    assert int(served.set_index("request_id").loc[1, "n_output_tokens"]) == N_NEW[1] - len(committed)
    record = json.loads((tmp_path / "resumed" / "resume.json").read_text())
    assert record["carried_request_ids"] == [0] and record["continued"] == {"1": len(committed)}
    assert (tmp_path / "resumed" / "requests.jsonl").read_text() == (folder / "requests.jsonl").read_text()


def test_resume_refuses_what_it_cannot_finish(failed, tmp_path: Path) -> None:
    """A folder that is not a failed run, a scenario other than the failed run's, an --out over the
    failed run and options that would change its requests: exit 2, one line naming what is wrong."""
    folder, spec, _, _ = failed
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "requests.jsonl").write_text((folder / "requests.jsonl").read_text())
    cases = [
        ([str(spec), "--resume", str(finished)], "not a failed run (no <policy>/failure.json)"),
        ([str(spec), "--resume", str(tmp_path / "nowhere")], "no such run folder"),
        ([str(spec), "--resume", str(folder), "--set", "tree.topk=2", "--out", str(tmp_path / "a")],
         "the scenario differs from the failed run's"),
        ([str(spec), "--resume", str(folder), "--out", str(folder)], "that is the failed run's folder"),
        ([str(spec), "--resume", str(folder), "--policy", "ar-pp"], "drop --prompt, --prompts and --policy"),
    ]  # fmt: skip
    for args, message in cases:
        try:
            result = run(args)
        finally:
            assert end_stages() == []
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    differs = run([str(spec), "--resume", str(folder), "--set", "tree.topk=2", "--out", str(tmp_path / "b")])
    assert "tree.topk: 2 here, 3 there" in differs.output, differs.output


def test_a_resumed_run_that_fails_again_resumes_from_all_it_committed(tmp_path: Path) -> None:
    """The bookkeeping alone, on literal folders: a run of three requests fails with request 0
    finished and request 1 two tokens in; its resumption commits one more token of request 1 and
    fails too; resuming that continues request 1 after all three tokens, request 2 whole."""
    from flowspec.config import scenario_from_dict
    from flowspec.records import RunRecords, RunResult
    from flowspec.workload import Request
    from runtime.outputs import write_failed, write_requests
    from runtime.resume import FailedRun

    sc = scenario_from_dict({})
    first = tmp_path / "first"
    (first / "flowspec").mkdir(parents=True)
    requests = [Request(0, None, (1, 2, 3), 4), Request(1, None, (4, 5), 4), Request(2, 0.5, (6,), 4)]
    write_requests(first / "requests.jsonl", requests)
    (first / "flowspec" / "failure.json").write_text(json.dumps({"completed_request_ids": [0]}))
    (first / "flowspec" / "outputs.jsonl").write_text(
        json.dumps({"request_id": 0, "tokens": [7, 7, 7, 7], "finish_reason": "max_new_tokens"}) + "\n"
        + json.dumps({"request_id": 1, "tokens": [8, 9], "finish_reason": None}) + "\n")  # fmt: skip
    failed = FailedRun.read(first)
    served = failed.remaining(sc)
    assert served == [Request(1, None, (4, 5, 8, 9), 2), Request(2, 0.0, (6,), 4)]
    assert failed.carried(sc) == [0] and failed.out_folder(None) == tmp_path / "first-resumed"

    second = tmp_path / "second"  # the resumption: request 1 commits token 10, then a stage is lost
    second.mkdir()
    write_requests(second / "requests.jsonl", failed.requests)
    write_failed(second / "flowspec", served, RunResult({1: [10]}, RunRecords(), 1.0), RuntimeError("lost"), None,
                 failed, sc)  # fmt: skip
    failure = json.loads((second / "flowspec" / "failure.json").read_text())
    assert failure["completed_request_ids"] == [0] and failure["started_request_ids"] == [0, 1]
    again = FailedRun.read(second)
    assert again.committed(1) == [8, 9, 10] and again.rows[1]["prompt_tokens"] == [4, 5]
    assert again.rows[1]["resumed_at"] == 2 and again.rows[0]["tokens"] == [7, 7, 7, 7]
    assert again.remaining(sc) == [Request(1, None, (4, 5, 8, 9, 10), 1), Request(2, 0.0, (6,), 4)]
