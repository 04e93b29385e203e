"""Simulation experiments: one scenario, several policies side by side, grids of scenarios.

Theory of operation
-------------------
`simulate(scenario)` builds everything a run needs from the scenario alone — the profiled platform,
the synthetic target and the drafter calibrated by the acceptance profile, the workload — and runs
the engine. Every policy of a comparison sees the same target, the same acceptance profile and the
same requests (all are derived from the scenario's seed), so the differences are the policies'.
`sweep` runs a grid of overrides in worker processes. These are the plain functions `cli.py` calls.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd

from flowspec import metrics
from flowspec.config import Policy, Scenario, apply_overrides, scenario_from_dict, scenario_to_dict
from flowspec.policy import device_scenario
from flowspec.synthetic import ContextOracle, GroundTruth, HashLM, OracleDrafter
from flowspec.costs import AcceptanceProfile, ProfileError
from flowspec.records import RunResult
from sim.engine import SimEngine
from flowspec.platform import PROFILES_DIR, Platform, build_platform, resolve_profile
from flowspec.workload import Request, build_workload


def rank_table(profile: AcceptanceProfile) -> np.ndarray:
    """[depths, ranks + 1] probabilities (last column: none of the children), depth 1 first."""
    return np.array([profile.for_depth(d) for d in range(1, profile.max_depth + 1)])


def build_engine(
    scenario: Scenario,
    *,
    platform: Platform | None = None,
    profiles_dir: Path = PROFILES_DIR,
    base_dir: Path | None = None,
    run_id: str | None = None,
    requests: list[Request] | None = None,
) -> SimEngine:
    """The engine for `scenario`; `platform` replaces the profiled one (tests use constants),
    `requests` the scenario's workload."""
    scenario = device_scenario(scenario)
    if platform is None:
        platform = build_platform(scenario, profiles_dir)
    try:
        acceptance = AcceptanceProfile.load(resolve_profile(scenario.acceptance.profile, profiles_dir))
    except ProfileError as e:
        raise ProfileError(f"acceptance.profile = {scenario.acceptance.profile!r}: {e}") from None
    truth = GroundTruth(HashLM(scenario.model.vocab_size, 1, seed=scenario.seed))
    drafter = OracleDrafter(truth, rank_table=rank_table(acceptance), seed=scenario.seed)
    requests = build_workload(scenario, base_dir) if requests is None else requests
    return SimEngine(
        scenario, platform, drafter, ContextOracle(truth), requests,
        run_id=run_id or f"{scenario.name}/{scenario.policy}",
    )  # fmt: skip


def simulate(scenario: Scenario, **kwargs: object) -> RunResult:
    return build_engine(scenario, **kwargs).run()  # type: ignore[arg-type]


def with_policy(scenario: Scenario, policy: Policy | str) -> Scenario:
    return dataclasses.replace(scenario, policy=Policy(policy))


def simulate_policies(
    scenario: Scenario,
    policies: Sequence[Policy],
    *,
    on_result: Callable[[Policy, RunResult], None] | None = None,
    **kwargs: object,
) -> dict[Policy, RunResult]:
    """Every policy on the same scenario; `on_result` sees each result as soon as it exists."""
    results = {}
    for policy in policies:
        result = simulate(with_policy(scenario, policy), **kwargs)
        results[policy] = result
        if on_result is not None:
            on_result(policy, result)
    return results


def summaries(results: dict[Policy, RunResult]) -> dict[str, pd.DataFrame]:
    return {str(p): metrics.summary(r.frames()) for p, r in results.items()}


# ---- sweeps ---------------------------------------------------------------------------------------


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values, as {dotted key: value text}."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _sweep_point(base: dict, point: dict[str, str], policy: str, source: str) -> dict[str, object]:
    overrides = [f"{k}={v}" for k, v in point.items()] + [f"policy={policy}"]
    scenario = scenario_from_dict(apply_overrides(base, overrides, source), source)
    t0 = time.perf_counter()
    result = simulate(scenario)
    row = metrics.summary(result.frames()).iloc[0].to_dict()
    return {**point, "policy": policy, **row, "wall_s": time.perf_counter() - t0}


def sweep(
    scenario: Scenario,
    grid: dict[str, list[str]],
    policies: Iterable[Policy],
    *,
    workers: int = 2,
    source: str = "<sweep>",
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Summary rows for every grid point × policy, simulated in `workers` processes."""
    base = scenario_to_dict(scenario)
    jobs = [(point, str(policy)) for point in grid_points(grid) for policy in policies]
    # Validate every point before spending minutes: a typo fails now, naming the override.
    for point, policy in jobs:
        scenario_from_dict(apply_overrides(base, [f"{k}={v}" for k, v in point.items()], source), source)
    rows = []
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(_sweep_point, base, point, policy, source) for point, policy in jobs]
        for done, future in enumerate(as_completed(futures), start=1):
            rows.append(future.result())
            if progress is not None:
                progress(done, len(jobs))
    order = {(tuple(p.values()), pol): i for i, (p, pol) in enumerate(jobs)}
    rows.sort(key=lambda r: order[(tuple(str(r[k]) for k in grid), r["policy"])])
    return pd.DataFrame(rows)
