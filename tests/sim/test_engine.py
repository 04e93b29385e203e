"""The SimPy engine with constant costs: exact timelines written out by hand, and closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from flowspec.config import DecodingConfig, ExpansionConfig, PipelineConfig, Policy, Scenario, TreeConfig
from flowspec.synthetic import TableDrafter, ContextOracle, GroundTruth, HashLM, OracleDrafter
from sim.engine import SimEngine
from flowspec.platform import ConstantPlatform
from flowspec.workload import Request


class ScriptedTarget:
    """The target's greedy token after a context, from a table (99 for contexts not in it)."""

    def __init__(self, table: dict[tuple[int, ...], int]) -> None:
        self.table = table
        self.context: dict[int, tuple[int, ...]] = {}

    def register(self, node_ids, tokens, parent_ids, positions, committed) -> None:
        for node, token, parent in zip(node_ids.tolist(), tokens.tolist(), parent_ids.tolist()):
            base = self.context[parent] if parent >= 0 else tuple(committed)
            self.context[node] = base + (token,)

    def argmax(self, node_ids) -> np.ndarray:
        return np.array([self.table.get(self.context[n], 99) for n in node_ids.tolist()], dtype=np.int64)

    def after(self, tokens) -> int:
        return self.table.get(tuple(tokens), 99)

    def forget(self) -> None:
        self.context.clear()


# Proposals by the frontier node's token path, root first.
PATH_TABLE = {
    (10,): ([11, 12], [-0.1, -1.0]),
    (10, 11): ([13, 14], [-0.2, -2.0]),
    (10, 12): ([15, 16], [-0.5, -0.6]),
    (12,): ([15, 17], [-0.5, -0.7]),
}


def PathDrafter() -> TableDrafter:
    return TableDrafter(PATH_TABLE, default=([20, 21], [-0.1, -0.2]))


def spans(result) -> list[tuple]:
    f = result.frames()["stage_spans"].sort_values(["t_start_s", "stage"], kind="stable")
    return [(int(r.stage), r.kind, int(r.n_tokens), int(r.kv_len), round(r.t_start_s, 6), round(r.t_end_s, 6))
            for r in f.itertuples()]  # fmt: skip


def transfers(result) -> list[tuple]:
    f = result.frames()["link_transfers"].sort_values(["t_send_s", "src", "dst", "kind"], kind="stable")
    return [(int(r.src), int(r.dst), r.kind, round(r.t_send_s, 6), round(r.t_recv_s, 6)) for r in f.itertuples()]


def test_ar_pp_exact_timeline() -> None:
    """ar-pp over 3 stages: 10 ms per forward, 2 ms per hop, 1 ms of LM head on D0.

    Prompt [3, 4]: prefill V1 2–12, V2 14–24, V3 26–36, D0 38–39 (first token), then each token
    goes round the ring: V1 41–51, V2 53–63, V3 65–75, D0 77–78 (second token); V1 80–90,
    V2 92–102, V3 104–114, D0 116–117 (third token, max_new_tokens = 3). Every hop is 2 ms.
    """
    scenario = Scenario(policy=Policy.AR_PP, pipeline=PipelineConfig(n_stages=3),
                        decoding=DecodingConfig(max_new_tokens=3), model={"n_layers": 6})  # fmt: skip
    target = ScriptedTarget({(3, 4): 7, (3, 4, 7): 8, (3, 4, 7, 8): 9})
    platform = ConstantPlatform(stage_ms_each=10, verify_ms_each=1, latency_ms_each=2)
    result = SimEngine(scenario, platform, PathDrafter(), target, [Request(0, 0.0, (3, 4), 3)]).run()
    assert result.outputs == {0: [7, 8, 9]}
    assert spans(result) == [
        (1, "prefill", 2, 0, 0.002, 0.012), (2, "prefill", 2, 0, 0.014, 0.024), (3, "prefill", 2, 0, 0.026, 0.036),
        (0, "verify", 1, 0, 0.038, 0.039),
        (1, "tree", 1, 2, 0.041, 0.051), (2, "tree", 1, 2, 0.053, 0.063), (3, "tree", 1, 2, 0.065, 0.075),
        (0, "verify", 1, 0, 0.077, 0.078),
        (1, "tree", 1, 3, 0.080, 0.090), (2, "tree", 1, 3, 0.092, 0.102), (3, "tree", 1, 3, 0.104, 0.114),
        (0, "verify", 1, 0, 0.116, 0.117),
    ]  # fmt: skip
    hops = [(0, 1), (1, 2), (2, 3), (3, 0)]
    starts = [0.0, 0.039, 0.078]
    expected = []
    for t in starts:
        for (src, dst), dt in zip(hops, (0.0, 0.012, 0.024, 0.036)):
            expected.append((src, dst, "segment", round(t + dt, 6), round(t + dt + 0.002, 6)))
    for t in (0.078, 0.117):  # each verification's prune (a round exit) goes to all three stages
        expected += [(0, k, "prune", t, round(t + 0.002, 6)) for k in (1, 2, 3)]
    assert transfers(result) == sorted(expected, key=lambda r: (r[3], r[0], r[1], r[2]))


def test_the_lm_head_on_the_last_stage_verifies_there_and_returns_ids() -> None:
    """The ar-pp timeline above with `pipeline.head: last`: V3 runs the LM head right after each
    forward (36–37, 75–76, 114–115) and D0 none, so the cadence is unchanged (the same cost on
    another device); a returned row carries its three ids and the argmax, 16 bytes, instead of
    12 + 576 × 4 (prefill: 2 rows; then 1 row a token)."""
    def run(head: str):
        scenario = Scenario(policy=Policy.AR_PP, pipeline=PipelineConfig(n_stages=3, head=head),
                            decoding=DecodingConfig(max_new_tokens=3), model={"n_layers": 6},
                            runtime={"drafter": "ngram"})  # fmt: skip
        target = ScriptedTarget({(3, 4): 7, (3, 4, 7): 8, (3, 4, 7, 8): 9})
        platform = ConstantPlatform(stage_ms_each=10, verify_ms_each=1, latency_ms_each=2)
        return SimEngine(scenario, platform, PathDrafter(), target, [Request(0, 0.0, (3, 4), 3)]).run()

    d0, last = run("d0"), run("last")
    assert last.outputs == d0.outputs == {0: [7, 8, 9]}
    moved = [(3, k, n, kv, round(t0 - 0.002, 6), round(t1 - 0.002, 6)) if k == "verify" else (s, k, n, kv, t0, t1)
             for s, k, n, kv, t0, t1 in spans(d0)]  # fmt: skip
    assert spans(last) == sorted(moved, key=lambda r: (r[4], r[0]))
    returned = [(r.nbytes, round(r.t_send_s, 6)) for r in last.frames()["link_transfers"].itertuples() if r.src == 3]
    assert returned == [(32, 0.037), (16, 0.076), (16, 0.115)]
    assert [r.nbytes for r in d0.frames()["link_transfers"].itertuples() if r.src == 3] == [2 * 2316, 2316, 2316]


def test_flowspec_first_steps_exact_timeline() -> None:
    """flowspec on 2 stages: the tree, re-root and expansion of tests/core/test_pipeline.py, timed.

    Costs: forward 10 ms, hop 2 ms, LM head 1 ms, 1 ms per drafter call. Prefill: V1 2–12,
    V2 14–24, D0 head 26–27 (token 10), drafting 2 calls 27–29; segments [10], [11, 13], [12, 15]
    reach V1 at 31: V1 runs them 31–41, 41–51, 51–61; V2 43–53 and 53–63. D0 verifies [10] at
    55–56 (target 12: re-root two segments ahead), drafts 56–57, then broadcasts prune v1 and
    sends [17] (the runtime's order: its drafter runs before the step's commands go out); the
    stages get both at 59, and V1 runs [17] 61–71 (busy with [12, 15] until 61).
    V2's [11, 13] finishes at 63 and is pruned empty; [12, 15] runs on V2 63–73, reaches D0 at
    75, is verified 75–76 (12 → 15 accepted, bonus 18 outside the tree; 4 tokens: done), and the
    exit prune reaches the stages at 78, in the middle of V2's forward of [17] (73–83), which
    then goes back empty.
    """
    scenario = Scenario(
        policy=Policy.FLOWSPEC, pipeline=PipelineConfig(n_stages=2), decoding=DecodingConfig(max_new_tokens=4),
        tree=TreeConfig(total=4, topk=2, depth=1, segment_size=2), expansion=ExpansionConfig(total=2, topk=2, depth=0),
        model={"n_layers": 4},
    )  # fmt: skip
    target = ScriptedTarget({(1, 2, 3): 10, (1, 2, 3, 10): 12, (1, 2, 3, 10, 12): 15, (1, 2, 3, 10, 12, 15): 18})
    platform = ConstantPlatform(stage_ms_each=10, verify_ms_each=1, draft_ms_per_call=1, latency_ms_each=2)
    result = SimEngine(scenario, platform, PathDrafter(), target, [Request(0, 0.0, (1, 2, 3), 4)]).run()
    assert result.outputs == {0: [10, 12, 15, 18]}
    assert spans(result) == [
        (1, "prefill", 3, 0, 0.002, 0.012), (2, "prefill", 3, 0, 0.014, 0.024),
        (0, "verify", 1, 0, 0.026, 0.027), (0, "draft", 3, 4, 0.027, 0.029),
        (1, "tree", 1, 3, 0.031, 0.041), (1, "tree", 2, 4, 0.041, 0.051), (2, "tree", 1, 3, 0.043, 0.053),
        (1, "tree", 2, 6, 0.051, 0.061), (2, "tree", 2, 4, 0.053, 0.063),
        (0, "verify", 1, 0, 0.055, 0.056), (0, "draft", 1, 5, 0.056, 0.057),
        (1, "tree", 1, 6, 0.061, 0.071), (2, "tree", 2, 4, 0.063, 0.073), (2, "tree", 1, 6, 0.073, 0.083),
        (0, "verify", 2, 0, 0.075, 0.076),
    ]  # fmt: skip
    assert transfers(result) == [
        (0, 1, "segment", 0.0, 0.002), (1, 2, "segment", 0.012, 0.014), (2, 0, "segment", 0.024, 0.026),
        (0, 1, "segment", 0.029, 0.031), (0, 1, "segment", 0.029, 0.031), (0, 1, "segment", 0.029, 0.031),
        (1, 2, "segment", 0.041, 0.043), (1, 2, "segment", 0.051, 0.053), (2, 0, "segment", 0.053, 0.055),
        (0, 1, "prune", 0.057, 0.059), (0, 1, "segment", 0.057, 0.059), (0, 2, "prune", 0.057, 0.059),
        (1, 2, "segment", 0.061, 0.063), (2, 0, "segment", 0.063, 0.065),
        (1, 2, "segment", 0.071, 0.073), (2, 0, "segment", 0.073, 0.075),
        (0, 1, "prune", 0.076, 0.078), (0, 2, "prune", 0.076, 0.078),
        (2, 0, "segment", 0.083, 0.085),
    ]  # fmt: skip
    steps = result.frames()["steps"]
    assert steps.outcome.tolist() == ["prefill", "continue", "empty", "finish", "empty"]
    assert steps.reroot_offset.tolist()[1] == 2


def test_draft_node_bookkeeping_is_charged_per_step_before_its_messages() -> None:
    """The flowspec timeline above with 1 ms of D0 bookkeeping ("step") per verification step.

    A step is charged after D0's LM head and before the step's messages leave, keyed by the tree
    size (the larger of before and after): the last prompt chunk starts a round with a 5-node tree
    (head 26–27, step 27–28, drafting 28–30); segments reach V1 at 32 (V1 32–42, 42–52, 52–62; V2
    44–54, 54–64). [10] comes back at 56: head 56–57, step 57–58 (the 5-node tree, re-rooted to 3),
    drafting 58–59, then prune v1 and [17] leave at 59; [17] waits on V1 until 62 (62–72).
    [12, 15] runs on V2 64–74, is back at 76: head 76–77, step 77–78 (3 nodes; the request ends),
    so the exit prune leaves at 78. The empty [11, 13] (back at 66) and the empty [17] change
    nothing, so they cost no step; neither does DraftDone.
    """
    scenario = Scenario(
        policy=Policy.FLOWSPEC, pipeline=PipelineConfig(n_stages=2), decoding=DecodingConfig(max_new_tokens=4),
        tree=TreeConfig(total=4, topk=2, depth=1, segment_size=2), expansion=ExpansionConfig(total=2, topk=2, depth=0),
        model={"n_layers": 4},
    )  # fmt: skip
    target = ScriptedTarget({(1, 2, 3): 10, (1, 2, 3, 10): 12, (1, 2, 3, 10, 12): 15, (1, 2, 3, 10, 12, 15): 18})
    platform = ConstantPlatform(stage_ms_each=10, verify_ms_each=1, draft_ms_per_call=1, step_ms_each=1, latency_ms_each=2)
    result = SimEngine(scenario, platform, PathDrafter(), target, [Request(0, 0.0, (1, 2, 3), 4)]).run()
    assert result.outputs == {0: [10, 12, 15, 18]}
    assert spans(result) == [
        (1, "prefill", 3, 0, 0.002, 0.012), (2, "prefill", 3, 0, 0.014, 0.024),
        (0, "verify", 1, 0, 0.026, 0.027), (0, "step", 5, 0, 0.027, 0.028), (0, "draft", 3, 4, 0.028, 0.030),
        (1, "tree", 1, 3, 0.032, 0.042), (1, "tree", 2, 4, 0.042, 0.052), (2, "tree", 1, 3, 0.044, 0.054),
        (1, "tree", 2, 6, 0.052, 0.062), (2, "tree", 2, 4, 0.054, 0.064),
        (0, "verify", 1, 0, 0.056, 0.057), (0, "step", 5, 0, 0.057, 0.058), (0, "draft", 1, 5, 0.058, 0.059),
        (1, "tree", 1, 6, 0.062, 0.072), (2, "tree", 2, 4, 0.064, 0.074), (2, "tree", 1, 6, 0.074, 0.084),
        (0, "verify", 2, 0, 0.076, 0.077), (0, "step", 3, 0, 0.077, 0.078),
    ]  # fmt: skip
    prunes = [t for t in transfers(result) if t[2] == "prune"]
    assert prunes == [(0, 1, "prune", 0.059, 0.061), (0, 2, "prune", 0.059, 0.061),
                      (0, 1, "prune", 0.078, 0.080), (0, 2, "prune", 0.078, 0.080)]  # fmt: skip


class StepBySize(ConstantPlatform):
    """D0's bookkeeping grows with the tree: 0.1 ms per node."""

    def step_ms(self, tree_size: int) -> float:
        return 0.1 * tree_size


def test_step_cost_follows_the_tree_size() -> None:
    """Every step span lasts exactly what the platform says for its tree size, and D0's busy time
    in steps is the sum over steps: the engine asks by size, it does not average."""
    scenario = Scenario(policy=Policy.FLOWSPEC, pipeline=PipelineConfig(n_stages=3), decoding=DecodingConfig(max_new_tokens=30),
                        tree=TreeConfig(total=15, topk=3, depth=2), model={"n_layers": 6, "vocab_size": 50})  # fmt: skip
    truth = GroundTruth(HashLM(50, 1))
    result = SimEngine(scenario, StepBySize(), OracleDrafter(truth, hit_rate=0.6, rank_weights=(2, 1, 1), seed=1),
                       ContextOracle(truth), [Request(0, 0.0, (1, 2), 30)]).run()  # fmt: skip
    steps = [s for s in spans(result) if s[1] == "step"]
    assert len(steps) >= 5 and {n for _, _, n, _, _, _ in steps} >= {16}
    assert all(end - start == pytest.approx(0.1 * n / 1000, abs=2e-6) for _, _, n, _, start, end in steps)


def _decode_rate(result) -> float:
    req = result.frames()["requests"].iloc[0]
    return (req.n_output_tokens - 1) / (req.t_finish_s - req.t_first_token_s)


@pytest.mark.parametrize("n_stages, stage_ms, link_ms, verify_ms", [(3, 10.0, 2.0, 1.0), (5, 4.0, 0.5, 0.0)])
def test_ar_pp_rate_is_one_over_a_ring_pass(n_stages: int, stage_ms: float, link_ms: float, verify_ms: float) -> None:
    """ar-pp decodes 1 / (N forwards + N+1 hops + the LM head) tokens per second."""
    scenario = Scenario(policy=Policy.AR_PP, pipeline=PipelineConfig(n_stages=n_stages),
                        decoding=DecodingConfig(max_new_tokens=20), model={"n_layers": 10, "vocab_size": 50})  # fmt: skip
    truth = GroundTruth(HashLM(50, 1))
    platform = ConstantPlatform(stage_ms_each=stage_ms, verify_ms_each=verify_ms, latency_ms_each=link_ms)
    result = SimEngine(scenario, platform, OracleDrafter(truth, hit_rate=0.5), ContextOracle(truth),
                       [Request(0, 0.0, (1, 2), 20)]).run()  # fmt: skip
    ring_s = (n_stages * stage_ms + (n_stages + 1) * link_ms + verify_ms) / 1000
    assert _decode_rate(result) == pytest.approx(1 / ring_s, rel=1e-9)


@pytest.mark.parametrize("n_stages", [2, 4])
def test_chunk_pp_round_time_is_the_pipeline_fill(n_stages: int) -> None:
    """chunk-pp sends N chunks at once; the last leaves VN after N + (N - 1) forwards.

    Round time = drafting + (N+1) hops + (2N - 1) forwards + the LM head, with every chunk of the
    same cost: every round (all end with an exit) takes exactly that long.
    """
    s, l, v, d = 10.0, 2.0, 1.0, 0.5
    scenario = Scenario(policy=Policy.CHUNK_PP, pipeline=PipelineConfig(n_stages=n_stages),
                        decoding=DecodingConfig(max_new_tokens=30), tree=TreeConfig(total=15, topk=3, depth=2),
                        model={"n_layers": 8, "vocab_size": 50})  # fmt: skip
    truth = GroundTruth(HashLM(50, 1))
    drafter = OracleDrafter(truth, hit_rate=0.6, rank_weights=(2, 1, 1), seed=1)
    platform = ConstantPlatform(stage_ms_each=s, verify_ms_each=v, draft_ms_per_call=d, latency_ms_each=l)
    result = SimEngine(scenario, platform, drafter, ContextOracle(truth), [Request(0, 0.0, (1, 2), 30)]).run()
    rounds = result.frames()["rounds"]
    expected_s = (3 * d + (n_stages + 1) * l + (2 * n_stages - 1) * s + v) / 1000  # 3 drafter calls per tree
    assert len(rounds) >= 3
    assert (rounds.t_end_s - rounds.t_start_s).tolist() == pytest.approx([expected_s] * len(rounds), rel=1e-9)


class StageLinksOnly(ConstantPlatform):
    """Forwards cost nothing; only the N - 1 hops between stages take time (D0 sits with V1 and VN)."""

    def latency_ms(self, src: int, dst: int) -> float:
        return self.latency_ms_each if src > 0 and dst > 0 else 0.0


@pytest.mark.parametrize("n_stages, k", [(3, 2), (4, 4), (5, 3)])
def test_chain_saving_over_per_token_traversal(n_stages: int, k: int) -> None:
    """A chain of k accepted drafts, one node per segment, saves (N−1)·t1·(k−1)/k per token.

    Per-token traversal (ar-pp) pays the N−1 inter-stage hops for every token. The k one-node
    segments of a chain travel the pipeline together, so a round of k tokens pays them once.
    """
    t1 = 3.0
    platform = StageLinksOnly(stage_ms_each=0.0, latency_ms_each=t1)
    truth = GroundTruth(HashLM(1000, 1))
    per_token_s = {}
    for policy in (Policy.AR_PP, Policy.FLOWSPEC_NOEXPAND):
        scenario = Scenario(
            policy=policy, pipeline=PipelineConfig(n_stages=n_stages), decoding=DecodingConfig(max_new_tokens=1 + 5 * k),
            tree=TreeConfig(total=k - 1, topk=1, depth=max(k - 2, 0), segment_size=1), model={"n_layers": 8, "vocab_size": 1000},
        )  # fmt: skip
        drafter = OracleDrafter(truth, rank_table=np.array([[1.0, 0.0]]))  # every draft is the target's token
        result = SimEngine(scenario, platform, drafter, ContextOracle(truth), [Request(0, 0.0, (1, 2), 1 + 5 * k)]).run()
        assert result.outputs[0] == truth.greedy([1, 2], 1 + 5 * k, None)
        per_token_s[policy] = 1 / _decode_rate(result)
    saving_s = per_token_s[Policy.AR_PP] - per_token_s[Policy.FLOWSPEC_NOEXPAND]
    assert saving_s == pytest.approx((n_stages - 1) * t1 / 1000 * (k - 1) / k, rel=1e-9)


def test_devices_sharing_a_host_wait_for_its_cores() -> None:
    """ar-pp prefill of a 130-token prompt (chunks of 43, 43, 44) on 2 stages, 10 ms per forward,
    2 ms per hop, on a host with one core: V1 runs chunk 0 2–12 and chunk 1 12–22; chunk 0 reaches
    V2 at 14 but the core is V1's until 22, so V2 runs it 22–32 (it asked before V1's chunk 2, which
    arrived at 2 but was queued behind chunk 1); V1's chunk 2 runs 32–42, V2's chunk 1 (here since
    24) 42–52 and chunk 2 52–62. With two cores, V2 runs chunk 0 at 14, as on separate boards."""
    def run(host_cores: int):
        scenario = Scenario(policy=Policy.AR_PP, pipeline=PipelineConfig(n_stages=2), decoding=DecodingConfig(max_new_tokens=1),
                            model={"n_layers": 4}, devices={"host_cores": host_cores})  # fmt: skip
        platform = ConstantPlatform(stage_ms_each=10, latency_ms_each=2)
        return SimEngine(scenario, platform, PathDrafter(), ScriptedTarget({}), [Request(0, 0.0, tuple(range(130)), 1)]).run()

    assert [(s[0], s[4], s[5]) for s in spans(run(1))] == [
        (1, 0.002, 0.012), (1, 0.012, 0.022), (2, 0.022, 0.032), (1, 0.032, 0.042), (2, 0.042, 0.052), (2, 0.052, 0.062),
    ]  # fmt: skip
    assert [(s[0], s[4], s[5]) for s in spans(run(2))] == [(s[0], s[4], s[5]) for s in spans(run(0))] == [
        (1, 0.002, 0.012), (1, 0.012, 0.022), (2, 0.014, 0.024), (1, 0.022, 0.032), (2, 0.024, 0.034), (2, 0.034, 0.044),
    ]  # fmt: skip


def test_ar_pp_db_serves_two_requests_in_the_time_of_one() -> None:
    """ar-pp-db, the ar-pp timeline above with two requests arriving together: every device forwards
    both requests' rows as one batch (constant costs), so both finish when ar-pp's one does, with
    every span twice the rows. A batch's messages travel one per request."""
    scenario = Scenario(policy=Policy.AR_PP_DB, pipeline=PipelineConfig(n_stages=3, max_batch=2),
                        decoding=DecodingConfig(max_new_tokens=3), model={"n_layers": 6})  # fmt: skip
    target = ScriptedTarget({(3, 4): 7, (3, 4, 7): 8, (3, 4, 7, 8): 9, (5, 6): 1, (5, 6, 1): 2, (5, 6, 1, 2): 3})
    platform = ConstantPlatform(stage_ms_each=10, verify_ms_each=1, latency_ms_each=2)
    requests = [Request(0, 0.0, (3, 4), 3), Request(1, 0.0, (5, 6), 3)]
    result = SimEngine(scenario, platform, PathDrafter(), target, requests).run()
    assert result.outputs == {0: [7, 8, 9], 1: [1, 2, 3]}
    assert spans(result) == [
        (1, "prefill", 4, 0, 0.002, 0.012), (2, "prefill", 4, 0, 0.014, 0.024), (3, "prefill", 4, 0, 0.026, 0.036),
        (0, "verify", 2, 0, 0.038, 0.039),
        (1, "tree", 2, 2, 0.041, 0.051), (2, "tree", 2, 2, 0.053, 0.063), (3, "tree", 2, 2, 0.065, 0.075),
        (0, "verify", 2, 0, 0.077, 0.078),
        (1, "tree", 2, 3, 0.080, 0.090), (2, "tree", 2, 3, 0.092, 0.102), (3, "tree", 2, 3, 0.104, 0.114),
        (0, "verify", 2, 0, 0.116, 0.117),
    ]  # fmt: skip
    assert sorted(set(result.frames()["stage_spans"].request_id)) == [-1]  # every span is both requests'
    assert len(transfers(result)) == 2 * 12 + 2 * 6  # segments (4 hops, 3 passes) and prunes, per request
    finish = result.frames()["requests"].t_finish_s.round(6).tolist()
    assert finish == [0.117, 0.117]


def test_a_batch_waits_for_a_free_lane() -> None:
    """max_batch = 1: the second request queues until the first is done (ar-pp's timeline twice)."""
    scenario = Scenario(policy=Policy.AR_PP_DB, pipeline=PipelineConfig(n_stages=3, max_batch=1),
                        decoding=DecodingConfig(max_new_tokens=3), model={"n_layers": 6})  # fmt: skip
    target = ScriptedTarget({(3, 4): 7, (3, 4, 7): 8, (3, 4, 7, 8): 9, (5, 6): 1, (5, 6, 1): 2, (5, 6, 1, 2): 3})
    platform = ConstantPlatform(stage_ms_each=10, verify_ms_each=1, latency_ms_each=2)
    requests = [Request(0, 0.0, (3, 4), 3), Request(1, 0.0, (5, 6), 3)]
    result = SimEngine(scenario, platform, PathDrafter(), target, requests).run()
    assert result.outputs == {0: [7, 8, 9], 1: [1, 2, 3]}
    req = result.frames()["requests"]
    assert req.t_start_s.round(6).tolist() == [0.0, 0.117] and req.t_finish_s.round(6).tolist() == [0.117, 0.234]


def test_a_batch_beyond_the_profile_runs_as_several_forwards() -> None:
    """Costs are never extrapolated: rows past the grid split into the fewest equal forwards it covers."""
    from flowspec.costs import OutOfGridError
    from flowspec.platform import in_pieces

    def cost_ms(rows: int) -> float:
        if rows > 10:
            raise OutOfGridError(f"{rows} rows")
        return 5.0 + rows

    assert in_pieces(cost_ms, 7) == 12.0
    assert in_pieces(cost_ms, 25) == 3 * (5.0 + 9)  # three forwards of ceil(25 / 3) = 9 rows
    with pytest.raises(OutOfGridError):
        in_pieces(lambda rows: cost_ms(rows + 10), 3)
