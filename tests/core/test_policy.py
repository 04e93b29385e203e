"""A policy is one `PolicySpec`: the core and the backends read its fields, never its name."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flowspec import metrics
from flowspec import policy as pol
from flowspec.config import DecodingConfig, DsdConfig, ModelConfig, PipelineConfig, Policy, Scenario, ScenarioError, TreeConfig
from flowspec.driver import Delays, InMemoryDriver
from flowspec.platform import Colocated, build_platform
from flowspec.synthetic import GroundTruth, HashLM, OracleDrafter


def test_every_policy_has_one_spec_and_the_table_in_the_docstring_holds() -> None:
    assert set(pol.POLICIES) == set(Policy)
    assert {str(p) for p, s in pol.POLICIES.items() if s.whole_tree} == {"chunk-pp", "ar-pp", "serial", "single-sd", "dsd",
                                                                             "ar-pp-db"}
    assert {str(p) for p, s in pol.POLICIES.items() if s.expand is not None} == {"flowspec", "pipedec", "specpipe",
                                                                                  "specpipe-db"}
    assert [str(p) for p, s in pol.POLICIES.items() if s.one_device] == ["single-sd"]
    assert pol.reference_baselines() == ["chunk-pp", "ar-pp"]
    assert [str(p) for p, s in pol.POLICIES.items() if not s.lossless] == ["dsd"]
    assert [str(p) for p, s in pol.POLICIES.items() if s.batched] == ["specpipe-db", "ar-pp-db"]


def scenario(policy: Policy) -> Scenario:
    return Scenario(name="spec", policy=policy, decoding=DecodingConfig(max_new_tokens=12, eos_token_id=None),
                    pipeline=PipelineConfig(n_stages=3), tree=TreeConfig(total=6, topk=2, depth=2, segment_size=3),
                    model=ModelConfig(hidden_size=8, vocab_size=16))  # fmt: skip


def run(sc: Scenario, *, seed: int = 3, rank_weights: tuple[float, ...] = (1.0, 0.5), hit_rate: float = 0.8,
        prompt: tuple[int, ...] = (3, 5, 7, 9, 11)) -> tuple[list[int], list[int], int, list[tuple], dict]:  # fmt: skip
    """Outputs, the target's greedy tokens, how many stages the run used, its steps, its frames."""
    model = HashLM(16, 4, seed=seed)
    truth = GroundTruth(model)
    drafter = OracleDrafter(truth, hit_rate=hit_rate, rank_weights=rank_weights, seed=seed)
    driver = InMemoryDriver(sc, drafter, model, delays=Delays(stage_s=0.01, link_s=0.001), delay_rng=np.random.default_rng(0))
    result = driver.run([(0.0, list(prompt))])
    frames = result.records.frames()
    steps = list(frames["steps"][["outcome", "n_verified", "n_accepted"]].itertuples(index=False))
    expected = truth.greedy(list(prompt), sc.decoding.max_new_tokens, sc.decoding.eos_token_id)
    return result.outputs[0], expected, len(set(frames["stage_spans"].stage) - {0}), steps, frames


def test_one_field_changes_how_every_backend_runs_a_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Marking serial `one_device` in its spec alone makes the core run it on one stage and the
    simulator's platform colocate D0 with it; its output stays the target's."""
    out, expected, n_stages, *_ = run(scenario(Policy.SERIAL))
    assert out == expected and n_stages == 3
    assert not isinstance(build_platform(scenario(Policy.SERIAL)), Colocated)
    monkeypatch.setitem(pol.POLICIES, Policy.SERIAL, dataclasses.replace(pol.POLICIES[Policy.SERIAL], one_device=True))
    out, expected, n_stages, *_ = run(scenario(Policy.SERIAL))
    assert out == expected and n_stages == 1
    assert isinstance(build_platform(scenario(Policy.SERIAL)), Colocated)


def test_flowspec_without_its_expansion_is_flowspec_noexpand(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two differ by the spec's `expand` alone: removed, flowspec takes noexpand's very steps."""
    _, _, _, noexpand, _ = run(scenario(Policy.FLOWSPEC_NOEXPAND))
    out, expected, _, with_expansion, _ = run(scenario(Policy.FLOWSPEC))
    assert out == expected and with_expansion != noexpand
    monkeypatch.setitem(pol.POLICIES, Policy.FLOWSPEC, dataclasses.replace(pol.POLICIES[Policy.FLOWSPEC], expand=None))
    out, expected, _, steps, _ = run(scenario(Policy.FLOWSPEC))
    assert out == expected and steps == noexpand


def test_pipedec_refills_the_place_of_a_segment_pruned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the new root lies several segments ahead, the segments between come back empty.
    PipeDec puts a new layer in each one's place (one more segment sent per emptied one of the
    round); both ways decode the target's tokens."""
    sc = dataclasses.replace(scenario(Policy.PIPEDEC), pipedec=dataclasses.replace(scenario(Policy.PIPEDEC).pipedec, width=3),
                             decoding=DecodingConfig(max_new_tokens=40, eos_token_id=None))  # fmt: skip

    def served(refill: bool) -> tuple[int, int]:
        monkeypatch.setitem(pol.POLICIES, Policy.PIPEDEC,
                            dataclasses.replace(pol.POLICIES[Policy.PIPEDEC], refills_emptied=refill))  # fmt: skip
        out, expected, _, _, frames = run(sc, seed=5, rank_weights=(1.0, 0.6, 0.3), hit_rate=0.9, prompt=(2, 4, 6))
        assert out == expected
        steps = frames["steps"]
        assert (steps.reroot_offset >= 2).any(), "no segment was skipped: the case proves nothing"
        n_sent = frames["stage_spans"].query("stage == 1 and kind == 'tree'").segment_id.nunique()
        return n_sent, int((steps.outcome == "empty").sum())

    sent_refill, empty_refill = served(True)
    sent_hole, empty_hole = served(False)
    assert empty_hole > 0 and sent_refill > sent_hole


def run_dsd(dsd: DsdConfig, distributions=None) -> tuple[list[int], list[int], dict]:
    sc = dataclasses.replace(scenario(Policy.DSD), dsd=dsd)
    model = HashLM(16, 4, seed=3)
    truth = GroundTruth(model)
    drafter = OracleDrafter(truth, hit_rate=0.6, rank_weights=(1.0, 0.5), seed=3)
    driver = InMemoryDriver(sc, drafter, model, delays=Delays(stage_s=0.01, link_s=0.001),
                            delay_rng=np.random.default_rng(0), distributions=distributions)  # fmt: skip
    prompt = [3, 5, 7, 9, 11]
    result = driver.run([(0.0, prompt)])
    return result.outputs[0], truth.greedy(prompt, sc.decoding.max_new_tokens, None), result.records.frames()


def test_dsd_verifies_one_drafted_chain_per_traversal_and_is_lossless_at_tau_zero() -> None:
    out, expected, frames = run_dsd(DsdConfig(length=4))
    assert out == expected
    steps = frames["steps"][frames["steps"].outcome != "prefill"]
    assert (steps.n_verified == 5).all()  # the root and its 4-token chain, every step
    assert steps["round"].is_unique  # one verification per round: a chain is verified whole
    assert set(frames["nodes"].groupby(["round", "depth"]).size()) == {1}  # one node per depth: a chain
    assert (steps.n_relaxed == 0).all()


def test_dsd_with_relaxed_acceptance_takes_what_the_target_would_refuse_and_counts_it() -> None:
    """A target unsure everywhere (uniform) and tau = 1 with importance `none`: every drafted token
    passes, so each step commits the whole chain plus a bonus, and the output is no longer the target's."""
    uniform = lambda argmax: np.full((len(argmax), 16), 1 / 16)  # noqa: E731
    out, expected, frames = run_dsd(DsdConfig(length=4, tau=1.0, importance="none"), uniform)
    steps = frames["steps"][frames["steps"].outcome != "prefill"]
    assert (steps.n_accepted[steps.n_trimmed == 0] == 5).all()
    assert steps.n_relaxed.sum() > 0 and out != expected
    # with the target certain everywhere, tau = 1 changes nothing: entropy importance is 1
    def certain(argmax):
        rows = np.zeros((len(argmax), 16))
        rows[np.arange(len(argmax)), np.maximum(argmax, 0)] = 1.0
        return rows
    out, expected, frames = run_dsd(DsdConfig(length=4, tau=1.0), certain)
    assert out == expected and frames["steps"].n_relaxed.sum() == 0
    # ... yet the run was asked to relax, so its records and summary say lossy (strict runs do not)
    assert frames["steps"].query("outcome != 'prefill'").relaxing.all() and bool(metrics.summary(frames)["lossy"].iloc[0])
    assert not bool(metrics.summary(run_dsd(DsdConfig(length=4))[2])["lossy"].iloc[0])


def test_relaxed_dsd_is_labelled_lossy_and_refused_at_temperature_above_zero() -> None:
    sc = dataclasses.replace(scenario(Policy.DSD), dsd=DsdConfig(tau=0.2))
    assert sc.relaxed and not sc.lossless and sc.target_distributions
    assert dataclasses.replace(sc, policy=Policy.FLOWSPEC).lossless  # the dsd section matters to dsd alone
    with pytest.raises(ScenarioError, match="dsd.tau relaxes greedy verification: it needs decoding.temperature 0"):
        dataclasses.replace(sc, decoding=DecodingConfig(temperature=0.7))
