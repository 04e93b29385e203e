"""Real processes over ZeroMQ on loopback: every lossless policy equals `generate(do_sample=False)`.

A tiny random Llama (built from a config, saved to a temporary folder) is split 3 and 5 ways. The
drafter is scripted around the target's own greedy outputs, so each script forces one pattern —
reject at depth 0, accept two then reject, reject a branch but accept its sibling, re-root into a
segment still in flight, accept to a leaf — and the test checks from the records that the pattern
really happened. The real drafters (prompt lookup, a causal LM, an EAGLE head loaded from its
checkpoint layout) run on the same processes. Each test starts its stage processes and stops them
before it returns.
"""

from __future__ import annotations

import json
from pathlib import Path

import dataclasses

import pandas as pd
import pytest
import torch
from transformers import LlamaConfig

from flowspec import metrics
from flowspec.config import DrafterKind, Policy, scenario_from_dict
from flowspec.lookup import PromptLookupDrafter, WithLookup
from flowspec.policy import spec
from flowspec.synthetic import ReferenceDrafter
from flowspec.workload import one_after_another
from runtime.drafters import CausalLMDrafter
from runtime.eagle import EagleDrafter, EagleHead, save_eagle
from runtime.launcher import Cluster, Target, make_drafter, stage_scenario
from runtime.models import load_model
from sim.replay import first_divergence, replay_frames

pytestmark = pytest.mark.runtime

# (name, ranks of the true token by depth, segment size)
SCRIPTS = [
    ("reject at depth 0", [-1], 4),
    ("accept 2 then reject", [0, 0, -1], 4),
    ("reject a branch, accept its sibling", [1], 4),
    ("re-root into a segment in flight", [1, 0], 2),
    ("accept to a leaf", [0], 4),
]


def scenario(folder: Path, n_stages: int, segment_size: int, n_new: int = 20):
    return scenario_from_dict({
        "pipeline": {"n_stages": n_stages},
        "decoding": {"max_new_tokens": n_new},
        "tree": {"total": 10, "topk": 3, "depth": 3, "segment_size": segment_size},
        "expansion": {"total": 6, "topk": 3, "depth": 2},
        "pipedec": {"width": 3},
        "specpipe": {"width": 3},
        "runtime": {"model": str(folder), "stop_at_eos": False, "timeout_s": 20},
    })  # fmt: skip


def check_pattern(name: str, policy: Policy, frames) -> None:
    """The records show the script's pattern (for the policies where it can show)."""
    steps, nodes = frames["steps"], frames["nodes"]
    verified = nodes[nodes.parent_accepted]
    if name == "reject at depth 0":
        assert not nodes.accepted.any()
    elif name == "accept 2 then reject" and policy is Policy.CHUNK_PP:
        assert steps[steps.outcome == "exit"].n_accepted.max() == 3  # root + 2 drafts
    elif name == "reject a branch, accept its sibling" and policy in (Policy.CHUNK_PP, Policy.SERIAL, Policy.SINGLE_SD):
        assert verified.accepted.any() and (~verified.accepted).any()  # whole trees: siblings verified together
    elif name == "re-root into a segment in flight" and policy is Policy.FLOWSPEC:
        assert (steps.reroot_offset >= 1).any()
    elif name == "accept to a leaf" and policy is Policy.CHUNK_PP:
        assert steps[steps.outcome == "exit"].n_accepted.max() == 5  # root + depth + 1 drafts


def assert_on_one_clock(spans) -> None:
    """Every stage's spans are on D0's clock: a segment's forward on stage k+1 starts after it ended
    on stage k, and D0 verifies it after the last stage. The offset estimate is late by the least
    delay a clock message met (a few ms when 6 processes share 2 cores; beyond 10 ms once, with other
    jobs on the machine), hence 50 ms of slack; the bug this guards against shifted stages by the
    time they spent loading (~0.2 s on the tiny model)."""
    work = spans[spans.stage >= 1].pivot_table(index="segment_id", columns="stage", values=["t_start_s", "t_end_s"])
    stages = sorted(work["t_start_s"].columns)
    for a, b in zip(stages, stages[1:]):
        gap = (work["t_start_s"][b] - work["t_end_s"][a]).dropna()
        assert (gap > -5e-2).all(), (a, b, gap.min())
    verify = spans[spans.stage == 0].query("kind == 'verify'").set_index("segment_id")
    gap = (verify.t_start_s - work["t_end_s"][stages[-1]]).dropna()
    assert (gap > -5e-2).all(), ("verify", gap.min())


def assert_links_recorded(transfers, n_stages: int) -> None:
    """Every hop of the ring carried segments and D0 sent prunes, each paired with its arrival: bytes
    as sent, and an arrival after the send (10 ms of slack: each stage's clock offset is an estimate)."""
    segments = transfers[transfers.kind == "segment"]
    ring = {(r, (r + 1) % (n_stages + 1)) for r in range(n_stages + 1)} if n_stages > 1 else {(0, 1), (1, 0)}
    assert set(zip(segments.src, segments.dst)) == ring
    assert set(transfers[transfers.kind == "prune"].src) <= {0}
    assert (transfers.nbytes > 0).all() and (transfers.t_recv_s - transfers.t_send_s > -1e-2).all()


def run_scripts(cluster: Cluster, tiny, n_stages: int, policies: list[Policy]) -> int:
    """Every script under every policy on one running cluster; the number of runs."""
    prompts, outputs = tiny.prompts, tiny.outputs
    requests = one_after_another(prompts)
    references = [p + o for p, o in zip(prompts, outputs)]
    failures = []
    runs = 0
    for name, ranks, segment_size in SCRIPTS:
        sc = Target.load(scenario(tiny.folder, n_stages, segment_size, tiny.n_new)).scenario
        for policy in policies:
            batched = spec(policy).batched  # then every request arrives at once, so several are served together
            reqs = [dataclasses.replace(r, t_arrival_s=0.0) for r in requests] if batched else requests
            result = cluster.serve(stage_scenario(sc, policy), ReferenceDrafter(references, ranks, tiny.vocab), reqs,
                                   run_id=f"{name}/{policy}")  # fmt: skip
            runs += 1
            got = [result.outputs[i] for i in range(len(prompts))]
            if got != outputs:
                failures.append(f"{name} / {policy}: {got} != {outputs}")
            frames = result.frames()
            check_pattern(name, policy, frames)
            assert set(cluster.node.rejected.values()) == {0}, cluster.node.rejected  # real peers' frames all fit
            assert set(frames["stage_spans"].stage) == set(range(cluster.node.n_stages + 1))
            drafts = {"draft"} if policy not in (Policy.AR_PP, Policy.AR_PP_DB) else set()
            assert {"step", "verify"} | drafts <= set(frames["stage_spans"].query("stage == 0").kind)  # D0's time, by kind
            assert_on_one_clock(frames["stage_spans"])
            assert_links_recorded(frames["link_transfers"], cluster.node.n_stages)
            if batched:  # its lanes interleave as the timing falls, which a replay cannot repeat (flowspec.batch)
                assert metrics.max_concurrent(frames["requests"]) == len(prompts), (name, policy)
                continue
            # Invariant 6: fed this run's drafts and target decisions, the simulator's core issues
            # exactly the commands the runtime's core issued, although its timing differs.
            replayed = replay_frames(stage_scenario(sc, policy), requests, frames)
            assert first_divergence(frames["commands"], replayed.frames()["commands"]) is None, (name, policy)
            assert len(frames["commands"]) > 0 and replayed.outputs == result.outputs
    assert not failures, "\n".join(failures)
    return runs


@pytest.mark.parametrize("n_stages", [3, 5])
def test_every_pipelined_policy_equals_generate(tiny, n_stages: int, tmp_path: Path) -> None:
    policies = [p for p in Policy if p is not Policy.SINGLE_SD]
    target = Target.load(scenario(tiny.folder, n_stages, 4, tiny.n_new))
    with Cluster(stage_scenario(target.scenario, Policy.FLOWSPEC), target) as cluster:
        procs = list(cluster.procs.values())
        assert len(procs) == n_stages
        runs = run_scripts(cluster, tiny, n_stages, policies)
        if n_stages == 3:
            run_real_drafters(cluster, target, tiny, tmp_path)
    assert runs == len(SCRIPTS) * len(policies)
    assert all(p.poll() == 0 for p in procs), [p.returncode for p in procs]  # stopped cleanly


def run_real_drafters(cluster: Cluster, target: Target, tiny, tmp_path: Path) -> None:
    """The drafters a scenario can name, on the running cluster: outputs still equal generate."""
    lookup = make_drafter(target.scenario, target)  # the scenario's own drafter: auto, so prompt lookup here
    assert isinstance(lookup, PromptLookupDrafter)
    requests = one_after_another(tiny.prompts)
    for policy in (Policy.FLOWSPEC, Policy.PIPEDEC, Policy.SPECPIPE):
        result = cluster.serve(stage_scenario(target.scenario, policy), lookup, requests)
        assert [result.outputs[0], result.outputs[1]] == tiny.outputs, policy
    # a causal-LM drafter: the target drafting for itself ranks every true token first, and the
    # root's best child is in every tree, so every round accepts at least one drafted token
    self_draft = CausalLMDrafter(load_model(tiny.folder), vocab_size=tiny.vocab)
    result = cluster.serve(stage_scenario(target.scenario, Policy.CHUNK_PP), self_draft, requests)
    assert [result.outputs[0], result.outputs[1]] == tiny.outputs
    steps = result.frames()["steps"]
    exits = steps[steps.outcome == "exit"]
    assert exits.n_accepted.min() >= 2 and exits.n_accepted.mean() > 2.5, exits.n_accepted.tolist()
    # an EAGLE head (random weights: lossless whatever it proposes) loaded as the scenario names it
    torch.manual_seed(2)
    head = EagleHead(LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2))
    save_eagle(head, tmp_path / "eagle", draft_vocab=torch.arange(0, tiny.vocab, 2))  # drafts over even ids only
    eagle_sc = dataclasses.replace(target.scenario, runtime=dataclasses.replace(
        target.scenario.runtime, drafter=DrafterKind.EAGLE, draft_model=str(tmp_path / "eagle")))  # fmt: skip
    drafter = make_drafter(eagle_sc, target)
    assert isinstance(drafter, WithLookup) and isinstance(drafter.model, EagleDrafter)  # runtime.draft_lookup: on
    for policy in (Policy.FLOWSPEC, Policy.CHUNK_PP):
        result = cluster.serve(stage_scenario(eagle_sc, policy), drafter, requests)
        assert [result.outputs[0], result.outputs[1]] == tiny.outputs, policy
    bare_sc = dataclasses.replace(eagle_sc, runtime=dataclasses.replace(eagle_sc.runtime, draft_lookup=False))
    assert isinstance(make_drafter(bare_sc, target), EagleDrafter)
    run_relaxed_dsd(cluster, target, tiny)


def run_relaxed_dsd(cluster: Cluster, target: Target, tiny) -> None:
    """dsd with tau = 1 and importance `none` accepts whatever it drafted: the target's distributions
    reach D0's core through the real processes (a drafter that never proposes the true token has
    every chain accepted whole, each token counted as relaxed), and the output is no longer the target's."""
    references = [p + o for p, o in zip(tiny.prompts, tiny.outputs)]
    never = ReferenceDrafter(references, [-1], tiny.vocab)  # the true token is never proposed
    sc = stage_scenario(target.scenario, Policy.DSD)
    relaxed = dataclasses.replace(sc, dsd=dataclasses.replace(sc.dsd, length=3, tau=1.0, importance="none"))
    result = cluster.serve(relaxed, never, one_after_another(tiny.prompts))
    steps = result.frames()["steps"]
    full = steps[(steps.outcome == "exit") & (steps.n_trimmed == 0)]
    assert len(full) > 0 and (full.n_accepted == 4).all() and (full.n_relaxed == 3).all()
    assert [result.outputs[0], result.outputs[1]] != tiny.outputs
    strict = cluster.serve(sc, never, one_after_another(tiny.prompts))  # tau = 0: lossless again
    assert [strict.outputs[0], strict.outputs[1]] == tiny.outputs and strict.frames()["steps"].n_relaxed.sum() == 0


def test_single_device_policy_equals_generate(tiny) -> None:
    target = Target.load(scenario(tiny.folder, 3, 4, tiny.n_new))
    with Cluster(stage_scenario(target.scenario, Policy.SINGLE_SD), target) as cluster:
        assert len(cluster.procs) == 1
        assert run_scripts(cluster, tiny, 3, [Policy.SINGLE_SD]) == len(SCRIPTS)


def test_bfloat16_stages_run_end_to_end_and_send_bfloat16(tiny) -> None:
    """runtime.dtype: bfloat16 on CPU: every stage computes and sends in bfloat16, D0 decides in it,
    and every request gets its tokens (the outputs are the bf16 target's, not the fp32 one's)."""
    sc = scenario(tiny.folder, 3, 4, tiny.n_new)
    sc = dataclasses.replace(sc, runtime=dataclasses.replace(sc.runtime, dtype="bfloat16"))
    target = Target.load(sc)
    assert target.scenario.model.dtype == "bfloat16"  # the simulator prices what travels
    references = [p + o for p, o in zip(tiny.prompts, tiny.outputs)]
    with Cluster(stage_scenario(target.scenario, Policy.FLOWSPEC), target) as cluster:
        assert cluster.node.lm_head.dtype == torch.bfloat16
        result = cluster.serve(stage_scenario(target.scenario, Policy.FLOWSPEC), ReferenceDrafter(references, [0], tiny.vocab),
                               one_after_another(tiny.prompts))  # fmt: skip
    assert [len(result.outputs[i]) for i in range(2)] == [tiny.n_new, tiny.n_new]
    assert set(result.frames()["stage_spans"].stage) == {0, 1, 2, 3}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_cuda_scenario_without_cuda_is_bad_input(tiny, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cli import main

    tiny_yaml = str(Path(__file__).parents[2] / "scenarios" / "tiny.yaml")
    result = CliRunner().invoke(main, ["run", tiny_yaml, "--set", f"runtime.model={tiny.folder}",
                                       "--set", "runtime.device=cuda", "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "error: runtime.device: cuda: torch " in result.stderr and "sees no CUDA device" in result.stderr


@pytest.mark.parametrize("n_stages", [3, 5])
def test_the_lm_head_on_the_last_stage_is_lossless(tiny, n_stages: int) -> None:
    """pipeline.head: last: the last stage decides (its spans hold every verification), returns
    argmax ids instead of hidden states (the drafter reads none), and every policy still equals
    generate; above temperature 0 it returns logits and D0 samples from them."""
    sc = scenario(tiny.folder, n_stages, 4, tiny.n_new)
    sc = dataclasses.replace(sc, pipeline=dataclasses.replace(sc.pipeline, head="last"))
    target = Target.load(sc)
    assert not target.scenario.features_on_the_wire
    references = [p + o for p, o in zip(tiny.prompts, tiny.outputs)]
    requests = one_after_another(tiny.prompts)
    with Cluster(stage_scenario(target.scenario, Policy.FLOWSPEC), target) as cluster:
        for policy in (Policy.FLOWSPEC, Policy.CHUNK_PP, Policy.PIPEDEC, Policy.AR_PP):
            result = cluster.serve(stage_scenario(target.scenario, policy),
                                   ReferenceDrafter(references, [0, 0, -1], tiny.vocab), requests)  # fmt: skip
            assert [result.outputs[0], result.outputs[1]] == tiny.outputs, policy
            spans = result.frames()["stage_spans"]
            assert set(spans[spans.kind == "verify"].stage) == {n_stages}, policy
    if n_stages == 3:  # the stages return what the temperature they started with needs
        hot = dataclasses.replace(target.scenario, decoding=dataclasses.replace(target.scenario.decoding, temperature=0.8))
        with Cluster(stage_scenario(hot, Policy.FLOWSPEC), dataclasses.replace(target, scenario=hot)) as cluster:
            result = cluster.serve(stage_scenario(hot, Policy.FLOWSPEC), ReferenceDrafter(references, [0], tiny.vocab),
                                   requests)  # fmt: skip
        assert [len(result.outputs[0]), len(result.outputs[1])] == [tiny.n_new, tiny.n_new]


def test_bench_runtime_leaves_every_policys_generations_behind(tiny, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cli import main

    tiny_yaml = str(Path(__file__).parents[2] / "scenarios" / "tiny.yaml")
    out = tmp_path / "bench.csv"
    result = CliRunner().invoke(main, ["bench", "runtime", tiny_yaml, "--set", f"runtime.model={tiny.folder}",
                                       "--set", "decoding.max_new_tokens=6", "--set", "workload.n_requests=2",
                                       "--set", "runtime.stop_at_eos=false", "--policy", "ar-pp", "--policy", "flowspec",
                                       "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    for policy in ("ar-pp", "flowspec"):
        lines = [json.loads(line) for line in (tmp_path / "bench" / policy / "outputs.jsonl").read_text().splitlines()]
        assert [r["request_id"] for r in lines] == [0, 1] and all(len(r["tokens"]) == 6 for r in lines), lines
    table = pd.read_csv(out).set_index("policy")
    assert (table.loc[["ar-pp", "flowspec"], ["d0_step_ms", "d0_verify_ms"]] > 0).all().all()  # D0 timed by kind
