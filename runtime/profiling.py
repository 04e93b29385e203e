"""How the device profiler times things: a budget, grid points sampled round-robin, summaries, and
D0's own bookkeeping measured on an in-memory pipeline.

Theory of operation
-------------------
A `Point` is one grid point of one component: an untimed `prepare` that restores state before
every call (a KV cache cropped back, a drafter's root run), the timed `call`, and the `group` it
belongs to, with an untimed `enter` run when sampling moves into that group (a drafter's new
context). `sample_points` warms every point (the first call allocates; the second estimates the
cost), then takes as many samples per point as the component's share of the budget allows, 3 to
25, round-robin within each group. Calls under a millisecond are repeated within one sample so the
timer's own overhead stays out of the number. When even 3 samples per point would overrun, interior
grid values are dropped (every other one of the longer axis, ends kept, so the grid still covers
its range) and the note returned says so, as does a share that allowed fewer samples than 25.

`d0_steps` drives a real `PipelineCore` through `flowspec.driver.InMemoryDriver` (emulated stages,
a hash target, an oracle drafter) and times `handle` for every returned segment that led to
commands, adding the `DraftDone` that follows it, minus the drafter's own time. That is what
`sim.engine` charges as one "step". Requests for the grid's tree sizes take turns, and samples are
binned by tree size to the nearest grid value.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import groupby

import numpy as np
import torch
from tqdm import tqdm

from flowspec.config import DecodingConfig, ExpansionConfig, ModelConfig, PipelineConfig, Policy, Scenario, TreeConfig
from flowspec.messages import Draft, DraftDone, SegmentReturned

MIN_SAMPLES = 3
MAX_SAMPLES = 25
MIN_SAMPLE_S = 1e-3  # shorter calls are repeated within one sample
STEP_SAMPLES = 200  # d0_step samples aimed at per tree size (a step takes a few ms: cheap)
STEP_VOCAB = 1000  # the hash target's vocabulary: large enough that drafts rarely collide by chance


class Timer:
    """Wall-clock time of a call, waiting for the device to finish (CUDA and MPS run async)."""

    def __init__(self, device: torch.device) -> None:
        self.sync: Callable[[], None] = (torch.cuda.synchronize if device.type == "cuda"
                                         else torch.mps.synchronize if device.type == "mps" else lambda: None)  # fmt: skip

    def ms(self, fn: Callable[[], object], inner: int = 1) -> float:
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        self.sync()
        return (time.perf_counter() - t) * 1000.0 / inner


class Budget:
    """Seconds per component: its share of what is left, so time a component leaves unused (it
    reached 25 samples) goes to the ones after it."""

    def __init__(self, total_s: float, shares: dict[str, float]) -> None:
        self.total_s = total_s
        self.shares = dict(shares)
        self.t0 = time.perf_counter()

    def phase(self, name: str) -> float:
        share = self.shares.pop(name)
        left = max(0.0, self.total_s - (time.perf_counter() - self.t0))
        return left * share / (share + sum(self.shares.values()))


@dataclass(frozen=True, eq=False)
class Point:
    n_tokens: int
    kv_len: int
    call: Callable[[], object]
    prepare: Callable[[], None] | None = None
    group: int = 0
    enter: Callable[[], None] | None = None


def _groups(points: list[Point]) -> Iterator[list[Point]]:
    for _, members in groupby(points, key=lambda p: p.group):
        members = list(members)
        if members[0].enter is not None:
            members[0].enter()
        yield members


def _bar(desc: str, total: int, unit: str = "sample") -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)


def sample_points(component: str, points: list[Point], budget_s: float,
                  timer: Timer) -> tuple[dict[tuple[int, int], list[float]], str]:  # fmt: skip
    """Samples in ms per (n_tokens, kv_len), and a note when the budget shaped them."""
    t0 = time.perf_counter()
    cost: dict[Point, float] = {}
    inner: dict[Point, int] = {}
    with _bar(f"{component} (warm-up)", len(points), "point") as bar:
        for members in _groups(points):
            for p in members:
                for _ in range(2):  # the first call allocates; the second is the estimate
                    t = time.perf_counter()
                    if p.prepare is not None:
                        p.prepare()
                    t_prep = time.perf_counter() - t
                    est_ms = timer.ms(p.call)
                inner[p] = 1 if p.prepare else max(1, math.ceil(MIN_SAMPLE_S * 1000 / max(est_ms, 1e-6)))
                cost[p] = est_ms / 1000 * inner[p] + t_prep
                bar.update()
    left_s = budget_s - (time.perf_counter() - t0)
    kept, dropped = _thin(points, cost, left_s)
    total_s = sum(cost[p] for p in kept)
    n = min(MAX_SAMPLES, max(MIN_SAMPLES, int(left_s / total_s) if total_s > 0 else MAX_SAMPLES))
    samples: dict[tuple[int, int], list[float]] = {(p.n_tokens, p.kv_len): [] for p in kept}
    deadline = t0 + budget_s
    with _bar(component, n * len(kept)) as bar:
        for members in _groups(kept):
            share = sum(cost[p] for p in members) / max(total_s, 1e-12)
            group_deadline = time.perf_counter() + max(0.0, deadline - time.perf_counter()) * share
            total_s -= sum(cost[p] for p in members)
            for r in range(n):
                for p in members:
                    if p.prepare is not None:
                        p.prepare()
                    samples[(p.n_tokens, p.kv_len)].append(timer.ms(p.call, inner[p]))
                bar.update(len(members))
                if r + 1 >= MIN_SAMPLES and time.perf_counter() > group_deadline:
                    break
    taken = min(len(s) for s in samples.values())
    notes = []
    if dropped:
        notes.append(f"grid thinned to fit {budget_s:.0f} s (dropped {', '.join(dropped)})")
    if taken < MAX_SAMPLES:
        notes.append(f"{taken} samples per point (its share of --budget-s, {budget_s:.0f} s, allowed no more)")
    if time.perf_counter() - t0 > 1.2 * budget_s + 1:
        notes.append(f"took {time.perf_counter() - t0:.0f} s of a {budget_s:.0f} s share (warm-up alone overran)")
    return samples, "; ".join(notes)


def _thin(points: list[Point], cost: dict[Point, float], left_s: float) -> tuple[list[Point], list[str]]:
    """Drop every other interior value of the longer axis until MIN_SAMPLES per point fit."""
    axes = {"n_tokens": sorted({p.n_tokens for p in points}), "kv_len": sorted({p.kv_len for p in points})}

    def kept() -> list[Point]:
        return [p for p in points if p.n_tokens in axes["n_tokens"] and p.kv_len in axes["kv_len"]]
    dropped: list[str] = []
    while MIN_SAMPLES * sum(cost[p] for p in kept()) > left_s:
        name = max((k for k in ("kv_len", "n_tokens") if len(axes[k]) > 2), key=lambda k: len(axes[k]), default=None)
        if name is None:
            break
        axis = axes[name]
        keep = axis[::2] if len(axis) % 2 else axis[::2] + axis[-1:]
        dropped += [f"{name} {v}" for v in axis if v not in keep]
        axes[name] = keep
    return kept(), dropped


def _number(x: float) -> float:
    """Six significant digits, and never 0 (the schema wants positive medians)."""
    return max(float(f"{x:.6g}"), 1e-6)


def summarize(component: str, samples: dict[tuple[int, int], list[float]], dtype: str) -> list[dict]:
    """Rows of the profile schema: median, p10, p90 and count per grid point."""
    rows = []
    for (n, kv), values in sorted(samples.items(), key=lambda item: (item[0][1], item[0][0])):
        a = np.asarray(values)
        med, p10, p90 = (_number(v) for v in (np.median(a), np.percentile(a, 10), np.percentile(a, 90)))
        rows.append({"component": component, "n_tokens": n, "kv_len": kv, "dtype": dtype, "latency_ms_median": med,
                     "latency_ms_p10": min(p10, med), "latency_ms_p90": max(p90, med), "n_samples": len(a)})  # fmt: skip
    return rows


# ---- D0's bookkeeping ---------------------------------------------------------------------------


def step_scenario(tree_size: int) -> Scenario:
    """The pipeline whose steps are timed for `tree_size`: flowspec on trees of that size (root
    included) in the default tree's shape, or ar-pp for size 1 (nothing drafted)."""
    pipeline, model = PipelineConfig(), ModelConfig(n_layers=PipelineConfig().n_stages, vocab_size=STEP_VOCAB)
    decoding = DecodingConfig(max_new_tokens=32)
    if tree_size == 1:
        return Scenario(name="d0-step", policy=Policy.AR_PP, pipeline=pipeline, decoding=decoding, model=model)
    shape, total = TreeConfig(), tree_size - 1
    k = min(shape.topk, total)
    depth = max(shape.depth, math.ceil((total - k) / (k * k)))  # enough beam iterations for the size
    return Scenario(name="d0-step", policy=Policy.FLOWSPEC, pipeline=pipeline, decoding=decoding, model=model,
                    tree=TreeConfig(total=total, topk=k, depth=depth, segment_size=shape.segment_size),
                    expansion=ExpansionConfig(total=total, topk=k, depth=depth))  # fmt: skip


def _serve_one(scenario: Scenario, seed: int, samples: list[list[float]]) -> None:
    """One request through an in-memory pipeline; appends [tree size, ms] per step to `samples`."""
    from flowspec.driver import InMemoryDriver
    from flowspec.synthetic import GroundTruth, HashLM, OracleDrafter
    from runtime.draft_node import TimedDrafter

    truth = GroundTruth(HashLM(STEP_VOCAB, scenario.model.n_layers, seed=seed))
    timed = TimedDrafter(OracleDrafter(truth, hit_rate=0.7, rank_weights=(4, 2, 1), seed=seed))
    driver = InMemoryDriver(scenario, timed, truth.model)
    core, handle = driver.core, driver.core.handle
    pending: dict[int, int] = {}

    def timed_handle(event, now):
        size, drafted, t = core.tree_size, timed.elapsed_s, time.perf_counter()
        cmds = handle(event, now)
        own_ms = (time.perf_counter() - t - (timed.elapsed_s - drafted)) * 1000.0
        if isinstance(event, SegmentReturned) and cmds:
            samples.append([max(1, size, core.tree_size), own_ms])
            pending.update({c.draft_id: len(samples) - 1 for c in cmds if isinstance(c, Draft)})
        elif isinstance(event, DraftDone) and event.draft_id in pending:
            samples[pending.pop(event.draft_id)][1] += own_ms
        return cmds

    core.handle = timed_handle  # the driver calls core.handle; timing it here needs no hook in the core
    prompt = np.random.default_rng(seed).integers(0, STEP_VOCAB, 24).tolist()
    driver.run([(0.0, prompt)])


def d0_steps(tree_sizes: tuple[int, ...], budget_s: float, dtype: str) -> tuple[list[dict], str]:
    """`d0_step` rows (n_tokens = tree size), and a note on grid values left without enough samples."""
    grid = np.log(np.asarray(tree_sizes, dtype=np.float64))
    bins: dict[tuple[int, int], list[float]] = {(n, 0): [] for n in tree_sizes}
    deadline = time.perf_counter() + budget_s
    scenarios = {size: step_scenario(size) for size in tree_sizes}
    with _bar("d0_step", len(tree_sizes) * STEP_SAMPLES, "step") as bar:
        # One request per tree size in turn (round-robin, as elsewhere: a burst of foreign load
        # then spreads over the sizes). Every request starts with a step on a tree of exactly
        # `size` nodes, so each size's own bin fills and the loop ends.
        for seed in itertools.count():
            wanted = [n for n in tree_sizes if len(bins[(n, 0)]) < STEP_SAMPLES]
            late = time.perf_counter() > deadline
            wanted = [n for n in wanted if not late or len(bins[(n, 0)]) < MIN_SAMPLES]
            if not wanted:
                break
            for size in wanted:
                samples: list[list[float]] = []
                _serve_one(scenarios[size], seed, samples)
                for n, ms in samples:  # to the nearest grid value, in log scale
                    bins[(tree_sizes[int(np.abs(grid - math.log(n)).argmin())], 0)].append(ms)
            bar.n = sum(min(len(v), STEP_SAMPLES) for v in bins.values())
            bar.refresh()
    thin = [n for n in tree_sizes if len(bins.get((n, 0), [])) < MIN_SAMPLES]
    rows = summarize("d0_step", {k: v for k, v in bins.items() if len(v) >= MIN_SAMPLES}, dtype)
    note = f"tree sizes {thin} left out: fewer than {MIN_SAMPLES} steps landed near them" if thin else ""
    return rows, note
