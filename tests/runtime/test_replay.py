"""A runtime run folder feeds the simulator: `flowspec replay` repeats its decisions exactly, and
`flowspec calibrate` turns its node outcomes into an acceptance profile the simulator loads.

One loopback run of the tiny random Llama (two policies, prompt lookup drafting) is written the way
`flowspec run` writes it; the tests then read that folder, and damaged copies of it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from cli import main
from flowspec.config import Policy, scenario_from_dict
from runtime.outputs import run_and_save
from sim.calibrate import acceptance_table
from flowspec.costs import AcceptanceProfile
from sim.replay import RunFolderError, load_run

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory) -> Path:
    sc = scenario_from_dict({
        "name": "tiny-run",
        "pipeline": {"n_stages": 2},
        "decoding": {"max_new_tokens": 16},
        "tree": {"total": 10, "topk": 3, "depth": 3, "segment_size": 4},
        "expansion": {"total": 6, "topk": 3, "depth": 2},
        "workload": {"n_requests": 2, "prompt_tokens": 12},
        "runtime": {"model": str(tiny.folder), "stop_at_eos": False, "timeout_s": 20},
    })  # fmt: skip
    folder = tmp_path_factory.mktemp("runs") / "tiny-run-runtime"
    done, error, _ = run_and_save(sc, [Policy.FLOWSPEC, Policy.SERIAL], folder, base_dir=None, prompt=None,
                                  prompts_file=None, echo=lambda *a, **k: None, stream=False)  # fmt: skip
    assert error is None and set(done) == {"flowspec", "serial"}
    return folder


def test_a_run_folder_leaves_requests_outputs_and_a_trace(run_dir: Path) -> None:
    requests = [json.loads(line) for line in (run_dir / "requests.jsonl").read_text().splitlines()]
    assert [r["request_id"] for r in requests] == [0, 1] and [r["t_arrival_s"] for r in requests] == [0.0, None]
    outputs = [json.loads(line) for line in (run_dir / "flowspec" / "outputs.jsonl").read_text().splitlines()]
    serial = [json.loads(line) for line in (run_dir / "serial" / "outputs.jsonl").read_text().splitlines()]
    assert [len(o["tokens"]) for o in outputs] == [16, 16] and [o["tokens"] for o in outputs] == [o["tokens"] for o in serial]
    assert [o["finish_reason"] for o in outputs] == ["max_new_tokens"] * 2
    commands = pd.read_parquet(run_dir / "flowspec" / "commands.parquet")
    assert commands.seq.tolist() == list(range(len(commands)))
    assert {"send", "prune", "draft", "emit", "finish"} <= set(commands.command)
    spans = pd.read_parquet(run_dir / "flowspec" / "stage_spans.parquet")
    d0 = spans[spans.stage == 0]
    assert (d0.request_id >= 0).all(), "D0's spans name their request, as the simulator's do"
    assert (d0[d0.kind == "verify"].segment_id >= 0).all()


def test_replay_repeats_the_run_and_reports_the_timing_error(run_dir: Path) -> None:
    result = CliRunner().invoke(main, ["replay", str(run_dir)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(run_dir / "replay.csv")
    assert table.policy.tolist() == ["flowspec", "serial"] and table.same_commands.all()
    # the same decisions: accepted tokens per step are the run's, exactly
    assert (table.accepted_per_step_predicted == table.accepted_per_step_measured).all()
    assert (table.tokens_per_s_predicted > 0).all()


def test_replay_notices_a_run_that_does_not_match(run_dir: Path, tmp_path: Path) -> None:
    """A decision changed in the record: the replaying core accepts differently and the check says so."""
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    path = bad / "serial" / "decisions.parquet"
    decisions = pd.read_parquet(path)
    tree = decisions.node_id >= 0
    decisions.loc[tree, "argmax"] = (decisions.loc[tree, "argmax"] + 1) % 97
    decisions.to_parquet(path)
    result = CliRunner().invoke(main, ["replay", str(bad), "--policy", "serial"])
    assert result.exit_code == 1 and "diverged" in result.output and "command" in result.output


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "requests.jsonl").unlink(), r"requests.jsonl: file missing"),
    (lambda f: (f / "requests.jsonl").write_text('{"request_id": 0, "prompt": []}\n'),
     r"requests.jsonl:1: prompt must be a non-empty list of token ids"),
    (lambda f: (f / "flowspec" / "proposals.parquet").write_text("not parquet"),
     r"flowspec/proposals.parquet: not a readable Parquet file"),
    (lambda f: pd.read_parquet(f / "serial" / "commands.parquet").drop(columns="detail").to_parquet(
        f / "serial" / "commands.parquet"), r"serial/commands.parquet: column detail missing"),
    (lambda f: (f / "resolved.yaml").write_text("tree: {topk: 0}\n"), r"resolved.yaml: tree.topk must be >= 1"),
    (lambda f: (f / "resume.json").write_text("{}\n"), r"resume.json: a resumed run's frames hold only the requests"),
])  # fmt: skip
def test_a_malformed_run_folder_is_named(run_dir: Path, tmp_path: Path, damage, message: str) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    damage(bad)
    with pytest.raises(RunFolderError, match=message):
        load_run(bad)
    result = CliRunner().invoke(main, ["replay", str(bad)])
    assert result.exit_code == 2 and "error:" in result.output


def test_calibrate_writes_a_profile_the_simulator_loads(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "acceptance" / "tiny"
    result = CliRunner().invoke(main, ["calibrate", str(run_dir), "--out", str(out), "--min-sets", "1"])
    assert result.exit_code == 0, result.output
    profile = AcceptanceProfile.load(out.with_suffix(".csv"))
    assert profile.source == "measured" and profile.n_ranks >= 1
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["n_candidate_sets"] > 0 and card["cells"][0]["n_at_risk"] > 0
    result = CliRunner().invoke(main, ["calibrate", str(tmp_path / "nowhere"), "--out", str(out)])
    assert result.exit_code == 2 and "no such run folder" in result.output


def test_the_estimator_counts_censored_sets_only_for_the_ranks_they_saw() -> None:
    """Depth 1, 4 sets: hit at rank 0; hit at rank 1; ranks 0-1 verified, no hit; rank 0 verified, no hit.
    Rank 0: 4 at risk, 1 hit -> h0 = 1/4, P0 = 1/4. Rank 1: the 3 sets without a rank-0 hit verified
    rank 1 except the last -> 2 at risk, 1 hit -> h1 = 1/2, P1 = 3/4 * 1/2 = 3/8. Rank 2: none at risk.
    """
    sets = pd.DataFrame({"depth": [1, 1, 1, 1], "n_verified_ranks": [2, 2, 2, 1], "hit_rank": [0, 1, -1, -1]})
    table = acceptance_table(sets, n_ranks=3, min_sets=1)
    assert table[["rank", "probability", "n_at_risk", "n_hits"]].values.tolist() == [
        [0, 0.25, 4, 1], [1, 0.375, 2, 1], [2, 0.0, 0, 0], [-1, 0.375, 4, 2]]
