"""Greedy losslessness of every policy, end to end through the in-memory driver.

Each case draws a random scenario (stages, tree shapes, vocabulary, EOS, length cap), a random
drafter quality, random per-message delays (pruning messages may trail the segments they prune by
several stage times) and one or two requests, some with prompts long enough to be prefilled in
chunks. The target is a `HashLM`, whose output changes if any stage keeps a wrong KV slot, masks a
tree row wrongly or shifts a position, so equality with single-device greedy decoding checks the
whole pruning and KV bookkeeping, not only the verification rule.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import numpy as np
import pytest

from flowspec.config import (
    DecodingConfig,
    DsdConfig,
    ExpansionConfig,
    PipeDecConfig,
    SpecPipeConfig,
    PipelineConfig,
    Policy,
    Scenario,
    TreeConfig,
    ModelConfig,
)
from flowspec import metrics
from flowspec.driver import Delays, InMemoryDriver
from flowspec.policy import spec
from flowspec.synthetic import GroundTruth, HashLM, OracleDrafter

N_CASES = 100
# Each step of these verifies a segment that holds no node's parent (one tree layer; specpipe's
# best new children of nodes sent before), so it commits the root alone and emits one token:
# nothing can be trimmed mid-step.
ONE_TOKEN_PER_STEP = frozenset({Policy.AR_PP, Policy.PIPEDEC, Policy.SPECPIPE, Policy.SPECPIPE_DB, Policy.AR_PP_DB})


def _beam(rng: np.random.Generator, max_topk: int, max_depth: int, max_total: int) -> tuple[int, int, int]:
    topk = int(rng.integers(1, max_topk + 1))
    depth = int(rng.integers(0, max_depth + 1))
    pool = topk + depth * topk * topk
    return topk, depth, int(rng.integers(0, min(pool, max_total) + 1))


def make_case(policy: Policy, case: int) -> tuple[InMemoryDriver, GroundTruth, list[tuple[float, list[int]]]]:
    rng = np.random.default_rng([list(Policy).index(policy), case])
    vocab = int(rng.integers(6, 40))
    topk, depth, total = _beam(rng, min(4, vocab - 1), 4, 40)
    e_topk, e_depth, e_total = _beam(rng, min(4, vocab - 1), 3, 24)
    n_stages = int(rng.integers(1, 6))
    scenario = Scenario(
        name=f"case{case}",
        policy=policy,
        seed=case,
        decoding=DecodingConfig(
            max_new_tokens=int(rng.integers(1, 40)),
            eos_token_id=0 if rng.random() < 0.7 else None,
        ),
        pipeline=PipelineConfig(n_stages=n_stages),
        tree=TreeConfig(total=total, topk=topk, depth=depth, segment_size=int(rng.integers(1, 12))),
        expansion=ExpansionConfig(total=e_total, topk=e_topk, depth=e_depth),
        pipedec=PipeDecConfig(width=int(rng.integers(1, min(5, vocab - 1) + 1))),
        specpipe=SpecPipeConfig(width=1),  # drawn below
        model=ModelConfig(hidden_size=8, vocab_size=vocab),
    )
    model = HashLM(vocab, n_stages + int(rng.integers(0, 3)), seed=case)
    truth = GroundTruth(model)
    drafter = OracleDrafter(
        truth,
        hit_rate=float(rng.uniform(0.3, 1.0)),
        rank_weights=tuple(rng.uniform(0.1, 1.0, size=4)),
        seed=case,
    )
    delays = Delays(
        stage_s=float(rng.uniform(0.001, 0.02)),
        link_s=float(rng.uniform(0.0, 0.01)),
        broadcast_s=float(rng.choice([0.0005, 0.005, 0.05])),
        verify_s=float(rng.uniform(0.0, 0.005)),
        draft_s_per_call=float(rng.uniform(0.0, 0.005)),
        jitter=float(rng.uniform(0.0, 0.9)),
    )
    requests = []
    for _ in range(int(rng.integers(1, 3))):
        n_prompt = int(rng.choice([1, 5, 30, 70, 130]))
        prompt = rng.integers(1, vocab, size=n_prompt).tolist()
        requests.append((float(rng.uniform(0.0, 0.3)), prompt))
    requests.sort(key=lambda r: r[0])
    scenario = dataclasses.replace(scenario, dsd=DsdConfig(length=int(rng.integers(1, 9))))  # drawn last: the
    # other policies' cases stay what they were
    scenario = dataclasses.replace(scenario, specpipe=SpecPipeConfig(width=int(rng.integers(1, min(5, vocab - 1) + 1))))
    driver = InMemoryDriver(scenario, drafter, model, delays=delays, delay_rng=np.random.default_rng(case))
    return driver, truth, requests


def run_cases(policy: Policy) -> pd.DataFrame:
    """Run every case; assert equality per request; return the concatenated step frames."""
    steps, requests_frames = [], []
    for case in range(N_CASES):
        driver, truth, requests = make_case(policy, case)
        result = driver.run(requests)
        dec = driver.scenario.decoding
        for rid, (_, prompt) in enumerate(requests):
            expected = truth.greedy(prompt, dec.max_new_tokens, dec.eos_token_id)
            assert result.outputs[rid] == expected, f"{policy} case {case} request {rid}"
        frames = result.records.frames()
        steps.append(frames["steps"].assign(case=case))
        requests_frames.append(frames["requests"].assign(case=case))
    return pd.concat(steps), pd.concat(requests_frames)


@pytest.mark.parametrize("policy", list(Policy))
def test_greedy_output_equals_target_greedy(policy: Policy) -> None:
    """Every lossless policy emits exactly the target's greedy tokens in 100 random cases."""
    steps, requests = run_cases(policy)
    # Coverage: the cases must exercise the hard paths, or equality proves little.
    assert (steps.outcome == "exit").any(), "a bonus token outside the tree"
    if policy not in ONE_TOKEN_PER_STEP:
        finish = steps[steps.outcome == "finish"].merge(requests, on=["case", "request_id"])
        eos_inside = (finish.finish_reason == "eos") & (finish.n_trimmed > 0)
        assert eos_inside.any(), "EOS inside an accepted run"
        cap_mid_step = (finish.finish_reason == "max_new_tokens") & (finish.n_trimmed > 0)
        assert cap_mid_step.any(), "max_new_tokens reached mid-step"
    if spec(policy).batched:  # requests served side by side, each with its own ledger and KV per stage
        overlap = requests.groupby("case").apply(metrics.max_concurrent, include_groups=False)
        assert (overlap >= 2).sum() >= 20, "two requests in service at once"
    if policy in (Policy.FLOWSPEC, Policy.FLOWSPEC_NOEXPAND, Policy.PIPEDEC, Policy.SPECPIPE, Policy.SPECPIPE_DB):
        assert (steps.reroot_offset >= 2).any(), "re-rooting into a segment several steps ahead"
        assert ((steps.outcome == "empty") & (steps.n_verified == 0)).any(), "segments emptied by pruning"
    if policy is Policy.FLOWSPEC:
        assert (steps.n_expanded > 0).any()
