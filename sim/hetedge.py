"""Heterogeneous-edge speculative serving (`hetedge-sd`, after arXiv 2510.11331), simulated.

Theory of operation
-------------------
A system of another shape than the pipeline's, compared on its own scenario: many users, a small
base station (SBS) whose edge server runs the draft model, a macro base station (MBS) that runs
the target, a wired fronthaul between them, and a shared wireless uplink.

    users --uplink (FDMA)--> SBS: draft l tokens per task --fronthaul--> MBS: verify, return

Users upload their prompts over the uplink; user k holds a share b_k of the bandwidth B and sends
at b_k log2(1 + SNR_k). Tasks are served in batches; a batch's round drafts l tokens per task
autoregressively on the SBS (l forwards over the batch), sends them (token and draft probability)
over the fronthaul, verifies them in one target forward over l + 1 rows per task on the MBS, and
returns the decisions. The SBS drafts one batch while the MBS verifies another (the paper's
pipelining). The paper's pieces, as the issue states them:

- chain drafts accepted with min(1, p/q): with acceptance α per token, a round yields
  τ(l) = (1 − α^(l+1)) / (1 − α) tokens in expectation (`tokens_per_round`);
- the speculation length, the batching and the uplink split are chosen jointly to minimise the
  total serving latency (the sum over users of their completion times): the split in closed form,
  batches and lengths by dynamic programming (`plan`);
- baselines: uniform bandwidth, maximal batching (one batch), and autoregressive serving.

The paper's exact formulation was not available to us; each assumption below is ours:

1. A forward over n tokens takes max(2·P·n / FLOPS, W / memory bandwidth) (a roofline: batching
   is free while weights stream, the paper's FLOP count once it computes), plus the prompt's
   prefill once per batch on both nodes.
2. Acceptance is i.i.d. with rate α per drafted token (the paper's τ(l)); a task needs
   ceil(O_k / τ(l)) rounds, and a batch runs in lockstep until its longest task is done.
3. The closed-form split: batches are served in order, so the uplink carries them in that order,
   each user's share proportional to the bits it must send over its spectral efficiency: batch b
   is uploaded at (Σ_{j≤b} S_j) / B with S_j = Σ_{k∈j} bits_k / log2(1 + SNR_k). It minimises every
   batch's ready time at once; uniform gives each user B/K for the whole upload.
4. The dynamic program orders users by output length (shortest first: a batch is a run of that
   order) and prices a batch as its fill plus rounds × its bottleneck stage, max(draft, fronthaul +
   verify); with the sum of completions, a batch's time counts once per user still waiting, which
   makes the objective additive. `evaluate` then runs every plan, the DP's and the baselines', in
   a SimPy model of the two nodes, the fronthaul and the uplink: the reported latencies are the
   simulation's, not the planner's estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import simpy

from flowspec import schema
from flowspec.schema import ScenarioError, Section, at_least, from_dict


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig(Section):
    params_b: float = 1.0
    """Model parameters, in billions."""
    bytes_per_param: float = 2.0
    """Weight precision (fp16: 2)."""
    tflops: float = 20.0
    """Sustained dense throughput of the node, in TFLOP/s."""
    mem_gbps: float = 100.0
    """Memory bandwidth, in GB/s (weights stream once per forward)."""

    def _check(self) -> None:
        for name in ("params_b", "bytes_per_param", "tflops", "mem_gbps"):
            if not getattr(self, name) > 0:
                raise ScenarioError(f"{name} must be > 0, got {getattr(self, name)!r}")

    def forward_s(self, n_tokens: int) -> float:
        """One forward over `n_tokens` rows (assumption 1)."""
        params = self.params_b * 1e9
        return max(2.0 * params * n_tokens / (self.tflops * 1e12), params * self.bytes_per_param / (self.mem_gbps * 1e9))


@dataclass(frozen=True, slots=True, kw_only=True)
class HetEdgeScenario(Section):
    name: str = "hetedge"
    seed: int = 0
    """Draws the users' prompt and output lengths and their SNRs."""
    users: int = 8
    prompt_tokens: tuple[int, ...] = (64, 512)
    """Each user's prompt length is drawn uniformly from this [low, high]."""
    output_tokens: tuple[int, ...] = (64, 256)
    """Each user's output length is drawn uniformly from this [low, high]."""
    snr_db: tuple[float, ...] = (0.0, 30.0)
    """Each user's uplink SNR is drawn uniformly (in dB) from this [low, high]."""
    bandwidth_mhz: float = 10.0
    """The uplink's total bandwidth, shared by FDMA."""
    token_bits: int = 16
    """Bits per token id on the uplink and the fronthaul."""
    prob_bits: int = 16
    """Bits per draft probability q(x) sent with each drafted token (min(1, p/q) needs it)."""
    fronthaul_gbps: float = 10.0
    fronthaul_latency_ms: float = 0.1
    alpha: float = 0.8
    """Acceptance rate of a drafted token."""
    max_length: int = 8
    """Longest speculation length the planner considers."""
    draft: NodeConfig = field(default_factory=lambda: NodeConfig(params_b=0.5, tflops=30.0, mem_gbps=300.0))
    """The SBS's edge server running the draft model (default: a 0.5B model on an L4-class GPU)."""
    target: NodeConfig = field(default_factory=lambda: NodeConfig(params_b=8.0, tflops=300.0, mem_gbps=2000.0))
    """The MBS running the target (default: an 8B model on an A100-class GPU)."""

    def _check(self) -> None:
        at_least(self, "users", 1)
        at_least(self, "max_length", 1)
        at_least(self, "token_bits", 1)
        at_least(self, "prob_bits", 0)
        for name in ("prompt_tokens", "output_tokens", "snr_db"):
            pair = getattr(self, name)
            if len(pair) != 2 or pair[0] > pair[1]:
                raise ScenarioError(f"{name} must be [low, high] with low <= high, got {list(pair)}")
        if min(self.prompt_tokens + self.output_tokens) < 1:
            raise ScenarioError("prompt_tokens and output_tokens must be >= 1")
        if not 0.0 < self.alpha < 1.0:
            raise ScenarioError(f"alpha must be within (0, 1), got {self.alpha}")
        for name in ("bandwidth_mhz", "fronthaul_gbps"):
            if not getattr(self, name) > 0:
                raise ScenarioError(f"{name} must be > 0, got {getattr(self, name)!r}")
        at_least(self, "fronthaul_latency_ms", 0.0)


@dataclass(frozen=True, slots=True)
class User:
    prompt_tokens: int
    output_tokens: int
    spectral_efficiency: float  # log2(1 + SNR), bit/s/Hz


@dataclass(frozen=True, slots=True)
class Plan:
    scheme: str
    batches: tuple[tuple[int, ...], ...]  # user indices, in service order
    lengths: tuple[int, ...]  # speculation length per batch; 0: autoregressive
    uniform_uplink: bool = False


def users_of(sc: HetEdgeScenario) -> list[User]:
    rng = np.random.default_rng(sc.seed)
    prompts = rng.integers(sc.prompt_tokens[0], sc.prompt_tokens[1] + 1, sc.users)
    outputs = rng.integers(sc.output_tokens[0], sc.output_tokens[1] + 1, sc.users)
    snr = 10 ** (rng.uniform(sc.snr_db[0], sc.snr_db[1], sc.users) / 10)
    return [User(int(p), int(o), float(np.log2(1 + s))) for p, o, s in zip(prompts, outputs, snr)]


def tokens_per_round(alpha: float, length: int) -> float:
    """τ(l) = (1 − α^(l+1)) / (1 − α): drafted tokens accepted plus the target's own (l = 0: one)."""
    return (1 - alpha ** (length + 1)) / (1 - alpha)


def upload_ready_s(sc: HetEdgeScenario, users: list[User], plan: Plan) -> list[float]:
    """When each batch's prompts are all at the SBS (assumption 3; uniform: B/K per user)."""
    hz = sc.bandwidth_mhz * 1e6
    load = [[users[k].prompt_tokens * sc.token_bits / users[k].spectral_efficiency for k in b] for b in plan.batches]
    if plan.uniform_uplink:
        return [max(x * len(users) / hz for x in b) for b in load]
    return list(np.cumsum([sum(b) for b in load]) / hz)


def _round_s(sc: HetEdgeScenario, n: int, length: int) -> tuple[float, float]:
    """(SBS drafting, fronthaul + MBS verification) of one round of a batch of `n` tasks."""
    draft = length * sc.draft.forward_s(n)
    bits = n * length * (sc.token_bits + sc.prob_bits)
    # without drafts the MBS decodes on its own: nothing crosses the fronthaul per round
    link = sc.fronthaul_latency_ms / 1e3 + bits / (sc.fronthaul_gbps * 1e9) if length else 0.0
    return draft, link + sc.target.forward_s(n * (length + 1))


def _rounds(sc: HetEdgeScenario, users: list[User], batch: tuple[int, ...], length: int) -> int:
    return max(math.ceil(users[k].output_tokens / tokens_per_round(sc.alpha, length)) for k in batch)


def _prefill_s(sc: HetEdgeScenario, users: list[User], batch: tuple[int, ...], length: int) -> float:
    n = sum(users[k].prompt_tokens for k in batch)
    return (sc.draft.forward_s(n) if length else 0.0) + sc.target.forward_s(n)


def batch_estimate(sc: HetEdgeScenario, users: list[User], batch: tuple[int, ...], length: int, *,
                   uniform_uplink: bool = False) -> float:  # fmt: skip
    """The planner's price of one batch (assumption 4): its upload, its prefills, its first round
    whole and every later round at its bottleneck stage."""
    hz = sc.bandwidth_mhz * 1e6 / (len(users) if uniform_uplink else 1)
    loads = [users[k].prompt_tokens * sc.token_bits / users[k].spectral_efficiency / hz for k in batch]
    draft, verify = _round_s(sc, len(batch), length)
    busy = _prefill_s(sc, users, batch, length) + draft + verify + (_rounds(sc, users, batch, length) - 1) * max(draft, verify)
    return (max(loads) if uniform_uplink else sum(loads)) + busy


def estimate(sc: HetEdgeScenario, users: list[User], p: Plan) -> float:
    """The planner's objective for `p`: each batch's price, counted once per user still waiting."""
    waiting, total = len(users), 0.0
    for batch, length in zip(p.batches, p.lengths, strict=True):
        total += batch_estimate(sc, users, batch, length, uniform_uplink=p.uniform_uplink) * waiting
        waiting -= len(batch)
    return total


def plan(sc: HetEdgeScenario, users: list[User], *, one_batch: bool = False, uniform_uplink: bool = False) -> Plan:
    """The DP of assumption 4 over batches (runs of users by output length) and lengths 0..max_length
    (0: the batch is served autoregressively, where drafting does not pay); `one_batch`: every user
    in one batch with the best length >= 1 (the maximal-batching baseline). Minimises `estimate`."""
    order = sorted(range(len(users)), key=lambda k: (users[k].output_tokens, k))
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[i]: the first i users of `order` batched
    choice: list[tuple[int, int]] = [(0, 0)] * (n + 1)
    for i in range(1, n + 1):
        for j in ([0] if one_batch else range(i)):
            batch = tuple(order[j:i])
            for length in range(1 if one_batch else 0, sc.max_length + 1):
                cost = best[j] + batch_estimate(sc, users, batch, length, uniform_uplink=uniform_uplink) * (n - j)
                if cost < best[i]:
                    best[i], choice[i] = cost, (j, length)
    batches, lengths, i = [], [], n
    while i > 0:
        j, length = choice[i]
        batches.append(tuple(order[j:i]))
        lengths.append(length)
        i = j
    name = "max batching" if one_batch else "uniform uplink" if uniform_uplink else "joint"
    return Plan(name, tuple(reversed(batches)), tuple(reversed(lengths)), uniform_uplink)


def autoregressive(users: list[User]) -> Plan:
    """Every user in one batch, no draft: the target decodes one token per task per forward."""
    return Plan("autoregressive", (tuple(range(len(users))),), (0,))


def evaluate(sc: HetEdgeScenario, users: list[User], p: Plan) -> list[float]:
    """Each user's completion time (s) under `p`, simulated: the SBS and the MBS each serve one
    forward at a time, in request order, so one batch drafts while another verifies."""
    env = simpy.Environment()
    sbs, mbs = simpy.Resource(env), simpy.Resource(env)
    done = [math.nan] * len(users)
    ready = upload_ready_s(sc, users, p)

    def batch(index: int):
        members, length = p.batches[index], p.lengths[index]
        yield env.timeout(ready[index])
        n = len(members)
        if length:
            with sbs.request() as turn:
                yield turn
                yield env.timeout(sc.draft.forward_s(sum(users[k].prompt_tokens for k in members)))
        with mbs.request() as turn:
            yield turn
            yield env.timeout(sc.target.forward_s(sum(users[k].prompt_tokens for k in members)))
        left = {k: users[k].output_tokens - 1 for k in members}  # the prefill's token
        tau = tokens_per_round(sc.alpha, length)
        while any(v > 0 for v in left.values()):
            draft, verify = _round_s(sc, n, length)
            if length:
                with sbs.request() as turn:
                    yield turn
                    yield env.timeout(draft)
            with mbs.request() as turn:
                yield turn
                yield env.timeout(verify)
            for k in left:
                if left[k] > 0:
                    left[k] -= tau
                    if left[k] <= 0:
                        done[k] = env.now
        for k in members:
            if math.isnan(done[k]):
                done[k] = env.now

    for i in range(len(p.batches)):
        env.process(batch(i))
    env.run()
    return done


def joint(sc: HetEdgeScenario, users: list[User]) -> Plan:
    """The DP's plan, refined where its estimate is rough: the DP's batches with each length moved by
    one, and one batch of everyone, are simulated too, and the fastest is kept (the DP prices a
    batch alone; the simulation sees batches share the nodes)."""
    best = plan(sc, users)
    candidates = [best, replace(plan(sc, users, one_batch=True), scheme="joint")]
    for i, length in enumerate(best.lengths):
        for moved in (length - 1, length + 1):
            if 0 <= moved <= sc.max_length:
                candidates.append(replace(best, lengths=best.lengths[:i] + (moved,) + best.lengths[i + 1 :]))
    return min(candidates, key=lambda p: sum(evaluate(sc, users, p)))


def compare(sc: HetEdgeScenario) -> list[dict[str, object]]:
    """One row per scheme: the joint optimum and the paper's baselines, simulated on one draw of users."""
    users = users_of(sc)
    plans = [joint(sc, users), plan(sc, users, uniform_uplink=True), plan(sc, users, one_batch=True),
             autoregressive(users)]  # fmt: skip
    rows = []
    for p in plans:
        done = evaluate(sc, users, p)
        rows.append({"scheme": p.scheme, "total_latency_s": float(np.sum(done)), "mean_latency_s": float(np.mean(done)),
                     "makespan_s": float(np.max(done)), "batches": len(p.batches),
                     "lengths": "/".join(map(str, p.lengths))})  # fmt: skip
    ours = rows[0]["total_latency_s"]
    for r in rows:
        r["joint_reduction"] = 1.0 - ours / r["total_latency_s"]  # type: ignore[operator]
    return rows


def load(path: Path, overrides: Sequence[str] = ()) -> HetEdgeScenario:
    """A hetedge scenario from YAML with `dotted.key=value` overrides; errors name the file and key."""
    from flowspec.config import _read_yaml  # the scenario loader's reading and YAML errors, shared

    source = str(path)
    data = _read_yaml(Path(path), source)
    data.setdefault("name", Path(path).stem)
    return from_dict(HetEdgeScenario, schema.apply_overrides(data, overrides, source, HetEdgeScenario), source)
