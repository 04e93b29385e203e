"""Simulation runs that leave files behind: frames per policy, sweep tables, benchmark rows.

Theory of operation
-------------------
What a user asked for is written as soon as it exists: the resolved scenario before anything runs,
each policy's record frames the moment that policy finishes, so a failure in a later policy (or a
Ctrl-C) loses nothing already computed. Plots and traces are not made here — they read frames only
and live in `report/`, beside the CLI, so that they serve the runtime alike.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from flowspec import metrics
from flowspec.config import Policy, Scenario, dump_scenario
from sim.experiment import simulate, sweep, with_policy

Echo = Callable[..., None]


def save_frames(frames: dict[str, pd.DataFrame], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in frames.items():
        frame.to_parquet(folder / f"{name}.parquet", index=False)


def simulate_and_save(
    scenario: Scenario, policies: Sequence[Policy], folder: Path, *, base_dir: Path | None, echo: Echo
) -> tuple[dict[str, dict[str, pd.DataFrame]], BaseException | None]:
    """Frames by policy for every policy that finished, and the error that stopped the rest."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "resolved.yaml").write_text(dump_scenario(scenario))
    done: dict[str, dict[str, pd.DataFrame]] = {}
    for policy in policies:
        t0 = time.perf_counter()
        try:
            result = simulate(with_policy(scenario, policy), base_dir=base_dir)
        except Exception as e:  # keep what is done; the caller reports and exits non-zero
            echo(f"  {policy}: failed", err=True)
            return done, e
        frames = result.frames()
        save_frames(frames, folder / str(policy))
        done[str(policy)] = frames
        n_tokens = sum(len(v) for v in result.outputs.values())
        echo(f"  {policy}: {n_tokens} tokens in {result.elapsed_s:.2f} simulated s "
             f"({time.perf_counter() - t0:.1f} s wall)", err=True)  # fmt: skip
    return done, None


def sweep_and_save(
    scenario: Scenario,
    grid: dict[str, list[str]],
    policies: Sequence[Policy],
    folder: Path,
    *,
    workers: int,
    source: str,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "resolved.yaml").write_text(dump_scenario(scenario))
    frame = sweep(scenario, grid, policies, workers=workers, source=source, progress=progress)
    frame.to_csv(folder / "sweep.csv", index=False)
    frame.to_parquet(folder / "sweep.parquet", index=False)
    return frame


def bench_policies(
    scenario: Scenario, policies: Sequence[Policy], *, repeat: int, base_dir: Path | None, profile: bool = False
) -> tuple[pd.DataFrame, str]:
    """Simulated output tokens per wall-clock second per policy (best of `repeat`), side by side.

    With `profile`, the last run of each policy is profiled and the top functions by own time
    are returned as text: where the simulator's time goes.
    """
    rows = []
    hot = io.StringIO()
    for policy in policies:
        sc = with_policy(scenario, policy)
        best = float("inf")
        n_tokens = 0
        sim_s = 0.0
        for i in range(repeat):
            profiler = cProfile.Profile() if profile and i == repeat - 1 else None
            t0 = time.perf_counter()
            if profiler:
                profiler.enable()
            result = simulate(sc, base_dir=base_dir)
            if profiler:
                profiler.disable()
                hot.write(f"--- {policy}\n")
                pstats.Stats(profiler, stream=hot).sort_stats("tottime").print_stats(12)
            wall = time.perf_counter() - t0
            best = min(best, wall)
            n_tokens = sum(len(v) for v in result.outputs.values())
            sim_s = result.elapsed_s
        summary = metrics.summary(result.frames()).iloc[0]
        rows.append({
            "policy": str(policy),
            "n_tokens": n_tokens,
            "wall_s": best,
            "sim_tokens_per_wall_s": n_tokens / best,
            "simulated_s": sim_s,
            "simulated_tokens_per_s": summary["tokens_per_s"],
            "speed_vs_realtime": sim_s / best,
        })  # fmt: skip
    return pd.DataFrame(rows), hot.getvalue()
