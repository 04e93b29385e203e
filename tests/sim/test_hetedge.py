"""hetedge-sd: the paper's formulas, the planner against brute force, the simulated pipeline, and
the joint plan against the baselines on the shipped scenario."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from flowspec.config import ScenarioError
from sim.hetedge import (HetEdgeScenario, NodeConfig, Plan, User, compare, estimate, evaluate, load, plan,
                         tokens_per_round, upload_ready_s)  # fmt: skip

SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "hetedge.yaml"


def test_tokens_per_round_is_the_papers_closed_form() -> None:
    assert tokens_per_round(0.8, 0) == pytest.approx(1.0)
    assert tokens_per_round(0.8, 1) == pytest.approx(1.8)
    assert tokens_per_round(0.8, 4) == pytest.approx((1 - 0.8**5) / 0.2)  # 3.3616


def test_the_uplink_split_serves_batches_in_order_and_uniform_waits_for_the_worst() -> None:
    """1 MHz; prompts of 100 tokens x 10 bits = 1000 bits; efficiencies 1, 2 and 4 bit/s/Hz: loads of
    1000, 500 and 250 Hz·s. In order, batch {0} is up at 1 ms and batch {1, 2} at 1.75 ms; uniform
    (1/3 MHz each) has user 0 up at 3 ms and users 1, 2 by 1.5 ms."""
    sc = HetEdgeScenario(users=3, bandwidth_mhz=1.0, token_bits=10)
    users = [User(100, 10, 1.0), User(100, 10, 2.0), User(100, 10, 4.0)]
    ordered = Plan("joint", ((0,), (1, 2)), (1, 1))
    assert upload_ready_s(sc, users, ordered) == pytest.approx([1e-3, 1.75e-3])
    assert upload_ready_s(sc, users, Plan("u", ((0,), (1, 2)), (1, 1), uniform_uplink=True)) == pytest.approx([3e-3, 1.5e-3])


def test_the_planner_finds_what_brute_force_finds() -> None:
    """Every split of the output-sorted users into runs, every length per run: none beats the DP."""
    sc = HetEdgeScenario(users=5, bandwidth_mhz=0.2, snr_db=(-5.0, 20.0), max_length=4, seed=3)
    from sim.hetedge import users_of

    users = users_of(sc)
    order = sorted(range(5), key=lambda k: (users[k].output_tokens, k))
    best = math.inf
    for cuts in itertools.chain.from_iterable(itertools.combinations(range(1, 5), r) for r in range(5)):
        bounds = (0, *cuts, 5)
        batches = tuple(tuple(order[a:b]) for a, b in zip(bounds, bounds[1:]))
        for lengths in itertools.product(range(0, 5), repeat=len(batches)):
            best = min(best, estimate(sc, users, Plan("brute", batches, lengths)))
    assert estimate(sc, users, plan(sc, users)) == pytest.approx(best, rel=1e-12)


def test_one_user_served_autoregressively_takes_its_forwards_in_sequence() -> None:
    """Upload, a prefill on the target (the first token), then one target forward per token."""
    node = NodeConfig(params_b=1.0, bytes_per_param=2.0, tflops=1.0, mem_gbps=100.0)  # 20 ms per memory-bound forward
    sc = HetEdgeScenario(users=1, bandwidth_mhz=1.0, token_bits=10, target=node)
    users = [User(prompt_tokens=100, output_tokens=5, spectral_efficiency=2.0)]
    (done,) = evaluate(sc, users, Plan("ar", ((0,),), (0,)))
    upload, prefill, decode = 100 * 10 / 2.0 / 1e6, 2 * 1e9 * 100 / 1e12, 0.02
    assert done == pytest.approx(upload + prefill + 4 * decode)


def test_two_batches_overlap_drafting_and_verification() -> None:
    """The SBS drafts one batch while the MBS verifies the other: both done sooner than one after another."""
    sc = HetEdgeScenario(users=2, bandwidth_mhz=100.0)
    users = [User(64, 100, 5.0), User(64, 100, 5.0)]
    together = max(evaluate(sc, users, Plan("two", ((0,), (1,)), (4, 4))))
    alone = max(evaluate(sc, users[:1], Plan("one", ((0,),), (4,))))
    assert alone < together < 1.6 * alone


def test_the_joint_plan_beats_every_baseline_on_the_shipped_scenario() -> None:
    rows = {r["scheme"]: r for r in compare(load(SCENARIO))}
    assert list(rows) == ["joint", "uniform uplink", "max batching", "autoregressive"]
    for name in ("uniform uplink", "max batching", "autoregressive"):
        assert rows["joint"]["total_latency_s"] <= rows[name]["total_latency_s"], name
    assert rows["uniform uplink"]["joint_reduction"] > 0.1  # the narrow uplink is where the split matters


def test_the_command_writes_its_table_and_plot_and_names_bad_keys(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["hetedge", str(SCENARIO), "--out", str(tmp_path / "he")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "he" / "hetedge.csv").stat().st_size > 100 and (tmp_path / "he" / "hetedge.png").stat().st_size > 1000
    bad = CliRunner().invoke(main, ["hetedge", str(SCENARIO), "--set", "alpha=1.5"])
    assert bad.exit_code == 2 and f"error: {SCENARIO}: alpha must be within (0, 1), got 1.5" in bad.stderr
    with pytest.raises(ScenarioError, match=r"draft.tflops must be > 0"):
        load(SCENARIO, ["draft.tflops=0"])
