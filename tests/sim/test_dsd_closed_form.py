"""dsd against ar-pp in the simulator: per-token times and savings equal the closed form of
sim/closed_form.py, and the link latency is paid once per traversal (DSD, arXiv 2511.11733:
(N−1)·t1·(k−1)/k per token with k tokens per traversal)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from flowspec.config import DecodingConfig, DsdConfig, PipelineConfig, Policy, Scenario, load_scenario
from flowspec.costs import LinkCostModel
from flowspec.links import RatedLink
from flowspec.platform import ConstantPlatform, build_platform
from flowspec.synthetic import ContextOracle, GroundTruth, HashLM, OracleDrafter
from flowspec.workload import Request
from sim import closed_form
from sim.engine import SimEngine
from sim.experiment import simulate

DSD_YAML = Path(__file__).resolve().parents[2] / "scenarios" / "dsd.yaml"

PROMPT = (1, 2, 3)
ALL_ACCEPTED = np.array([[1.0, 0.0]])  # the target's token is always the drafter's first choice


@dataclass(frozen=True)
class RowCosts:
    """Costs that grow with what is computed and sent: forwards per row and per cached slot, the
    LM head per row, drafting per call and per context token, D0's bookkeeping per tree node; links
    at 100 Mbit/s with 0.3 ms per message and `t1` ms of latency. `d0_t1`: the latency of D0's own
    two hops (D0 → V1, VN → D0); None: `t1` as well. 0 puts D0 beside V1 and VN, as DSD's drafter
    shares the first and last shards' nodes, leaving the N − 1 hops between stages."""

    t1: float
    d0_t1: float | None = None

    def stage_ms(self, stage: int, n_tokens: int, kv_len: int) -> float:
        return 3.0 + 0.5 * n_tokens + 0.01 * kv_len

    def verify_ms(self, n_rows: int, device: int = 0) -> float:
        return 0.2 + 0.1 * n_rows

    def draft_ms(self, n_calls: int, n_rows: int, kv_len: int) -> float:
        return n_calls * (1.0 + 0.001 * kv_len)

    def step_ms(self, tree_size: int) -> float:
        return 0.05 * tree_size

    def send_ms(self, src: int, nbytes: int) -> float:
        return RatedLink(LinkCostModel(100.0, self.t1, 0.3)).send_ms(nbytes)

    def latency_ms(self, src: int, dst: int) -> float:
        return self.t1 if self.d0_t1 is None or (src > 0 and dst > 0) else self.d0_t1


def scenario(policy: Policy, n_stages: int, k: int, max_new_tokens: int) -> Scenario:
    return Scenario(policy=policy, pipeline=PipelineConfig(n_stages=n_stages), dsd=DsdConfig(length=k),
                    decoding=DecodingConfig(max_new_tokens=max_new_tokens),
                    model={"n_layers": 12, "hidden_size": 64, "vocab_size": 1000})  # fmt: skip


def run(sc: Scenario, platform, rank_table: np.ndarray = ALL_ACCEPTED, seed: int = 0, engine=SimEngine):
    truth = GroundTruth(HashLM(1000, 1))
    drafter = OracleDrafter(truth, rank_table=rank_table, seed=seed)
    result = engine(sc, platform, drafter, ContextOracle(truth), [Request(0, 0.0, PROMPT, None)]).run()
    assert result.outputs[0] == truth.greedy(list(PROMPT), sc.decoding.max_new_tokens, None)  # τ = 0: lossless
    return result


def per_token_s(result) -> float:
    """Decode seconds per token after the first (first token to last)."""
    req = result.frames()["requests"].iloc[0]
    return (req.t_finish_s - req.t_first_token_s) / (req.n_output_tokens - 1)


def saving_s(platform, n_stages: int, k: int, n_rounds: int = 5) -> float:
    """ar-pp's per-token time minus dsd's, every draft accepted, over `n_rounds` whole rounds."""
    n_new = 1 + n_rounds * (k + 1)
    ar, dsd = (per_token_s(run(scenario(p, n_stages, k, n_new), platform)) for p in (Policy.AR_PP, Policy.DSD))
    return ar - dsd


def closed_saving_s(platform, n_stages: int, k: int, n_rounds: int = 5) -> float:
    n_new = 1 + n_rounds * (k + 1)
    ar, dsd = (scenario(p, n_stages, k, n_new) for p in (Policy.AR_PP, Policy.DSD))
    return (closed_form.per_token_s(ar, platform, len(PROMPT), closed_form.rounds_all_accepted(ar, n_new))
            - closed_form.per_token_s(dsd, platform, len(PROMPT), closed_form.rounds_all_accepted(dsd, n_new)))  # fmt: skip


def test_a_round_of_constant_costs_by_hand() -> None:
    """2 stages, 10 ms a forward, 1 ms of LM head, 1 ms a drafter call, 5 ms a hop (3 hops).

    ar-pp: every token goes round the ring: 2·10 + 3·5 + 1 = 36 ms a token.
    dsd, k = 3, all accepted: 3 drafter calls + the same ring = 39 ms for 4 tokens, 9.75 ms a token.
    Saving 26.25 ms a token, of which the latency's share is 3·5·(1 − 1/4) = 11.25 ms.
    """
    platform = ConstantPlatform(stage_ms_each=10, verify_ms_each=1, draft_ms_per_call=1, latency_ms_each=5)
    ar = per_token_s(run(scenario(Policy.AR_PP, 2, 3, 13), platform))
    dsd = per_token_s(run(scenario(Policy.DSD, 2, 3, 13), platform))
    assert (ar, dsd) == pytest.approx((0.036, 0.00975), rel=1e-12)
    assert ar - dsd == pytest.approx(0.02625, rel=1e-12)


@pytest.mark.parametrize("n_stages, t1, k", [(2, 5.0, 3), (3, 1.0, 2), (4, 20.0, 5), (6, 50.0, 8)])
def test_per_token_times_and_saving_match_the_closed_form(n_stages: int, t1: float, k: int) -> None:
    """Compute per row and per cached slot, links at bytes / bandwidth + overhead + latency, prunes
    queued on D0's link: the simulator's per-token times of both policies, and so the saving, are
    the closed form's to rounding."""
    platform = RowCosts(t1)
    n_new = 1 + 4 * (k + 1)
    for policy in (Policy.AR_PP, Policy.DSD):
        sc = scenario(policy, n_stages, k, n_new)
        expected = closed_form.per_token_s(sc, platform, len(PROMPT), closed_form.rounds_all_accepted(sc, n_new))
        assert per_token_s(run(sc, platform)) == pytest.approx(expected, rel=1e-9)
    assert saving_s(platform, n_stages, k, 4) == pytest.approx(closed_saving_s(platform, n_stages, k, 4), rel=1e-9)


@pytest.mark.parametrize("d0_t1, hops", [(None, 5), (0.0, 3)])
def test_latency_is_paid_once_per_traversal(d0_t1: float | None, hops: int) -> None:
    """N = 4, k = 3 (4 tokens per traversal, all accepted), t1 = 20 ms against t1 = 0 with every
    other cost the same: the saving grows by hops·t1·(4 − 1)/4 exactly — 5·20·3/4 = 75 ms on this
    ring of N + 1 hops, DSD's (N − 1)·t1·(k − 1)/k = 3·20·3/4 = 45 ms with D0 beside V1 and VN.
    Paid once per token instead, dsd would save nothing on latency and the growth would be 0."""
    grown = saving_s(RowCosts(20.0, d0_t1), 4, 3) - saving_s(RowCosts(0.0, d0_t1), 4, 3)
    assert grown == pytest.approx({5: 0.075, 3: 0.045}[hops], rel=1e-9)
    assert grown == pytest.approx(hops * 0.020 * 3 / 4, rel=1e-9)


class LatencyPerToken(SimEngine):
    """A mis-modelled simulator: a segment's hop pays the latency once per row (a token each), not
    once per message."""

    def _send(self, src, dst, kind, nbytes, deliver) -> None:
        if kind != "segment":
            return super()._send(src, dst, kind, nbytes, deliver)
        rows = nbytes // (4 * 4 if src == 0 else 3 * 4 + 64 * 4)  # ids on the first hop, then hidden states
        extra_s = (rows - 1) * self.platform.latency_ms(src, dst) / 1000

        def late() -> None:
            self.env.timeout(extra_s).callbacks.append(lambda _event: deliver())

        super()._send(src, dst, kind, nbytes, late)


def test_the_check_tells_a_per_token_latency_apart() -> None:
    """The closed form's tolerance is sharp: a simulator that paid the latency per token would miss
    the per-traversal saving by far more than rounding — by 5·20·3/4 = 75 ms a token for N = 4,
    k = 3, t1 = 20 ms."""
    platform = RowCosts(20.0)
    ar, dsd = (scenario(p, 4, 3, 21) for p in (Policy.AR_PP, Policy.DSD))
    wrong = per_token_s(run(ar, platform, engine=LatencyPerToken)) - per_token_s(run(dsd, platform, engine=LatencyPerToken))
    assert wrong != pytest.approx(closed_saving_s(platform, 4, 3), rel=1e-3)
    assert closed_saving_s(platform, 4, 3) - wrong == pytest.approx(0.075, rel=1e-9)


def test_partial_acceptance_matches_given_each_rounds_outcome() -> None:
    """With drafts accepted 70% of the time, rounds emit 1..k+1 tokens and rejected rows are pruned
    from every KV cache: the closed form, fed each round's emitted tokens, still gives the
    simulated decode time."""
    sc = scenario(Policy.DSD, 3, 5, 60)
    platform = RowCosts(10.0)
    result = run(sc, platform, rank_table=np.array([[0.7, 0.3]]), seed=3)
    emitted = result.frames()["rounds"].sort_values("round").n_emitted.tolist()
    assert len(set(emitted)) > 2  # outcomes vary
    req = result.frames()["requests"].iloc[0]
    assert req.t_finish_s - req.t_first_token_s == pytest.approx(
        closed_form.decode_s(sc, platform, len(PROMPT), emitted), rel=1e-9)  # fmt: skip


def test_rounds_all_accepted() -> None:
    """After the prefill's first token, rounds of k + 1 tokens; the last takes what is left."""
    assert closed_form.rounds_all_accepted(scenario(Policy.DSD, 2, 3, 11), 11) == [4, 4, 2]
    assert closed_form.rounds_all_accepted(scenario(Policy.AR_PP, 2, 3, 4), 4) == [1, 1, 1]
    with pytest.raises(ValueError, match="not flowspec"):
        closed_form.chain_length(scenario(Policy.FLOWSPEC, 2, 3, 4))


@pytest.mark.parametrize("policy", [Policy.AR_PP, Policy.DSD])
def test_the_shipped_scenario_on_its_profiles_matches_the_closed_form(policy: Policy) -> None:
    """scenarios/dsd.yaml as `flowspec simulate` builds it (the Orin profile's forwards by rows and
    KV length, 100 Mbit/s links with 20 ms of latency), every draft accepted: the closed form holds
    on measured-style costs too, not only on the hand-set ones above."""
    sc = load_scenario(DSD_YAML, ["acceptance.profile=acceptance/all-accepted.csv", "decoding.max_new_tokens=13",
                                  "workload.n_requests=1", f"policy={policy}"])  # fmt: skip
    req = simulate(sc).frames()["requests"].iloc[0]
    expected = closed_form.decode_s(sc, build_platform(sc), sc.workload.prompt_tokens,
                                    closed_form.rounds_all_accepted(sc, 13))  # fmt: skip
    assert req.t_finish_s - req.t_first_token_s == pytest.approx(expected, rel=1e-9)
