"""Simulations from scenarios and profiles: monotonicity, workloads, policies side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flowspec import metrics
from flowspec.config import Policy, ScenarioError, load_scenario
from sim.engine import SimEngine
from sim.experiment import build_engine, simulate, sweep, with_policy
from flowspec.platform import ProfiledPlatform
from flowspec.workload import build_workload, read_trace

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
SMALL = ["workload.n_requests=1", "decoding.max_new_tokens=40", "workload.prompt_tokens=64"]
POLICIES = [Policy.FLOWSPEC, Policy.CHUNK_PP, Policy.PIPEDEC, Policy.AR_PP]


def tokens_per_s(engine: SimEngine) -> float:
    return float(metrics.summary(engine.run().frames())["tokens_per_s"].iloc[0])


class SlowStage:
    """A profiled platform with one stage `factor` times slower."""

    def __init__(self, inner: ProfiledPlatform, stage: int, factor: float) -> None:
        self.inner, self.stage, self.factor = inner, stage, factor

    def stage_ms(self, stage: int, n_tokens: int, kv_len: int) -> float:
        ms = self.inner.stage_ms(stage, n_tokens, kv_len)
        return ms * self.factor if stage == self.stage else ms

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@pytest.mark.parametrize("policy", POLICIES)
def test_more_bandwidth_never_lowers_tokens_per_s(policy: Policy) -> None:
    """On a fixed seed the core makes the same decisions at any bandwidth; only times shrink."""
    rates = []
    for mbps in (50, 150, 500, 1000, 10000):
        scenario = load_scenario(SCENARIOS / "bandwidth.yaml", SMALL + [f"network.bandwidth_mbps={mbps}", f"policy={policy}"])
        rates.append(tokens_per_s(build_engine(scenario)))
    assert rates == sorted(rates), rates
    assert rates[-1] > rates[0], "bandwidth must matter at 50 Mbps"


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("stage", [1, 3])
def test_slowing_one_stage_never_raises_tokens_per_s(policy: Policy, stage: int) -> None:
    """A stage 1.5x and 3x slower gives no more tokens/s than at its profiled speed."""
    scenario = load_scenario(SCENARIOS / "sparse-edge.yaml", SMALL + [f"policy={policy}"])
    rates = []
    for factor in (1.0, 1.5, 3.0):
        platform = SlowStage(ProfiledPlatform(scenario), stage, factor)
        rates.append(tokens_per_s(build_engine(scenario, platform=platform)))
    assert rates == sorted(rates, reverse=True), rates
    assert rates[-1] < rates[0]


def test_policies_see_the_same_requests_and_target() -> None:
    """Every policy of a comparison emits the same tokens: same prompts, same synthetic target."""
    scenario = load_scenario(SCENARIOS / "tiny.yaml", ["workload.n_requests=2"])
    outputs = {p: simulate(with_policy(scenario, p)).outputs for p in Policy}
    first = outputs[Policy.FLOWSPEC]
    assert all(o == first for o in outputs.values())
    assert [len(v) for v in first.values()] == [48, 48]


def test_poisson_arrivals_queue_fifo_and_are_reproducible() -> None:
    """Poisson arrivals: exponential gaps from the seed; a busy pipeline makes requests wait."""
    scenario = load_scenario(SCENARIOS / "tiny.yaml", ["workload.arrivals=poisson", "workload.n_requests=4",
                                                       "workload.rate_per_s=5"])  # fmt: skip
    requests = build_workload(scenario)
    assert requests == build_workload(scenario)
    times = [r.t_arrival_s for r in requests]
    assert times == sorted(times) and times[0] > 0
    frame = simulate(scenario).frames()["requests"]
    assert frame.t_arrival_s.tolist() == pytest.approx(times)
    assert (frame.t_start_s >= frame.t_arrival_s).all()
    assert ((frame.t_start_s - frame.t_arrival_s) > 0).any(), "at 5 requests/s some must queue"
    assert (frame.t_start_s.iloc[1:].to_numpy() >= frame.t_finish_s.iloc[:-1].to_numpy()).all()


def test_closed_loop_single_arrivals_wait_only_for_the_drain() -> None:
    """`single`: each request arrives when the previous one finishes, once D0 has done its last
    step's bookkeeping (as in the runtime, where it arrives after `handle` returns), and starts
    once the segments still in flight have drained (a fraction of the request's own service time)."""
    scenario = load_scenario(SCENARIOS / "tiny.yaml", ["workload.n_requests=3"])
    frames = simulate(scenario).frames()
    frame, spans = frames["requests"], frames["stage_spans"]
    steps = spans[spans.kind == "step"]
    finished = frame.t_finish_s.iloc[:-1].to_numpy()
    last_step_s = [float((steps.t_end_s - steps.t_start_s)[steps.t_start_s == t].max()) for t in finished]
    assert frame.t_arrival_s.iloc[1:].to_numpy() == pytest.approx(finished + last_step_s)
    wait = frame.t_start_s - frame.t_arrival_s
    assert (wait >= 0).all() and (wait < 0.1 * (frame.t_finish_s - frame.t_start_s)).all()


def test_trace_workload_and_its_errors(tmp_path: Path) -> None:
    """A trace CSV sets arrival times and lengths; a bad row is named with file, line and column."""
    trace = tmp_path / "trace.csv"
    trace.write_text("t_arrival_s,prompt_tokens,max_new_tokens\n0.0,16,8\n0.5,80,4\n")
    scenario = load_scenario(SCENARIOS / "tiny.yaml", ["workload.arrivals=trace", f"workload.trace={trace}"])
    frame = simulate(scenario).frames()["requests"]
    assert frame[["n_prompt_tokens", "n_output_tokens"]].values.tolist() == [[16, 8], [80, 4]]
    trace.write_text("t_arrival_s,prompt_tokens,max_new_tokens\n0.0,16,8\n0.5,0,4\n")
    with pytest.raises(ScenarioError, match=r"trace.csv: line 3: prompt_tokens must be a whole number >= 1, got 0"):
        read_trace(trace)
    trace.write_text("t_arrival_s,prompt\n0.0,16\n")
    with pytest.raises(ScenarioError, match="missing column"):
        read_trace(trace)


def test_sweep_runs_every_point_and_policy() -> None:
    """A 2 x 2 grid over two policies gives 8 rows in grid order, with the swept values."""
    scenario = load_scenario(SCENARIOS / "tiny.yaml", ["decoding.max_new_tokens=16"])
    frame = sweep(scenario, {"network.bandwidth_mbps": ["100", "1000"], "tree.topk": ["3", "4"]},
                  [Policy.FLOWSPEC, Policy.AR_PP], workers=2)  # fmt: skip
    assert len(frame) == 8
    assert frame[["network.bandwidth_mbps", "tree.topk", "policy"]].values.tolist()[:3] == [
        ["100", "3", "flowspec"], ["100", "3", "ar-pp"], ["100", "4", "flowspec"]]
    assert np.isfinite(frame.tokens_per_s).all()


def test_a_bad_sweep_point_fails_before_any_run() -> None:
    """An invalid grid value is reported with its key before the pool starts."""
    scenario = load_scenario(SCENARIOS / "tiny.yaml")
    with pytest.raises(ScenarioError, match=r"tree.topk must be >= 1, got 0"):
        sweep(scenario, {"tree.topk": ["4", "0"]}, [Policy.FLOWSPEC], workers=1)


def test_dsd_simulates_its_strict_chain_and_refuses_relaxed_acceptance_by_name() -> None:
    """The simulator's target is an argmax oracle: dsd at tau = 0 runs (one chain per round), tau > 0
    is refused naming the key rather than run as if strict."""
    scenario = load_scenario(SCENARIOS / "sparse-edge.yaml", [*SMALL, "policy=dsd", "dsd.length=4"])
    steps = simulate(scenario).frames()["steps"]
    verifying = steps[steps.outcome != "prefill"]
    assert (verifying.n_verified == 5).all() and verifying["round"].is_unique
    with pytest.raises(ScenarioError, match=r"dsd.tau = 0.2: the simulator models dsd's strict verification only"):
        simulate(load_scenario(SCENARIOS / "sparse-edge.yaml", [*SMALL, "policy=dsd", "dsd.tau=0.2"]))


def test_batching_serves_a_loaded_workload_faster_and_emits_the_same_tokens() -> None:
    """multi-request.yaml, shortened: under a load one request at a time cannot keep up with, the
    batching policies serve max_batch requests at once and lift the workload's throughput over
    their one-at-a-time selves, with the same tokens (the lanes share one synthetic target)."""
    scenario = load_scenario(SCENARIOS / "multi-request.yaml", ["workload.n_requests=8", "decoding.max_new_tokens=24",
                                                                "workload.prompt_tokens=32"])  # fmt: skip
    runs = {p: simulate(with_policy(scenario, p)) for p in (Policy.SPECPIPE_DB, Policy.SPECPIPE, Policy.AR_PP_DB, Policy.AR_PP)}
    rows = {p: metrics.summary(r.frames()).iloc[0] for p, r in runs.items()}
    assert all(r.outputs == runs[Policy.SPECPIPE].outputs for r in runs.values())
    assert [int(rows[p].max_concurrent) for p in runs] == [4, 1, 4, 1]
    for batched, alone in ((Policy.SPECPIPE_DB, Policy.SPECPIPE), (Policy.AR_PP_DB, Policy.AR_PP)):
        assert rows[batched].throughput_tokens_per_s > 1.3 * rows[alone].throughput_tokens_per_s, (batched, rows)
        assert rows[batched].ttft_s < rows[alone].ttft_s  # a request joins the batch instead of queueing
    assert rows[Policy.SPECPIPE_DB].throughput_tokens_per_s > rows[Policy.AR_PP_DB].throughput_tokens_per_s
    # D0 sends one step of several requests as one group, which each device forwards as one batch:
    # a span charged to no single request (56% of specpipe-db's stage spans here, with requests
    # arriving one by one; ar-pp-db keeps fewer requests than the pipeline has devices, so each
    # rides a group of its own, as pipelined micro-batches do).
    spans = runs[Policy.SPECPIPE_DB].frames()["stage_spans"]
    assert (spans.query("stage > 0").request_id == -1).mean() > 0.4
    assert (runs[Policy.SPECPIPE].frames()["stage_spans"].request_id >= 0).all()
