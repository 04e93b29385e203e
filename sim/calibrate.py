"""Acceptance profiles from real runs: how often the target's token is the drafter's rank-r child.

Theory of operation
-------------------
Every verification a runtime run recorded leaves node rows (`NodeRecord`): for each verified draft
node, its depth, its rank among its parent's children in the tree (score order, which is the
drafter's rank order within one proposal) and whether the target chose it. The children of one
accepted parent verified in one step form a *candidate set*; at most one of them is the target's
token.

A set shows only the ranks that were drafted and verified: a tree keeps the best few children of a
node, and a step-wise policy may verify the rest later. So a set that drafted ranks 0..v-1 and
saw no hit says "not rank 0..v-1", nothing about rank v. That is right-censoring, and the
estimator is the discrete hazard one (Kaplan–Meier): per depth d and rank r,

    h(d, r) = hits at rank r / sets that verified rank r and had no hit below it
    P(d, r) = h(d, r) · Π_{j<r} (1 − h(d, j)),     P(d, none) = 1 − Σ_r P(d, r)

which uses every set for the ranks it saw. Depths with too few sets are left out (deeper depths
reuse the deepest row, as the simulator's loader does). The card records the runs, the counts
behind every cell and the tree the runs drafted.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from sim.replay import RunFolderError

MIN_SETS = 30  # a depth needs this many candidate sets to get its own row


def candidate_sets(nodes: pd.DataFrame) -> pd.DataFrame:
    """One row per candidate set: depth, how many leading ranks it verified, and the hit rank (-1: none).

    >>> n = pd.DataFrame({"run_id": "r", "request_id": 0, "round": 0, "step": 1, "parent_id": [5, 5, 5, 6],
    ...                   "depth": [1, 1, 1, 2], "rank": [0, 1, 3, 0], "parent_accepted": [True, True, True, False],
    ...                   "accepted": [False, True, False, False]})
    >>> candidate_sets(n).to_dict("list")  # ranks 0, 1 verified as a prefix (3 is not contiguous)
    {'depth': [1], 'n_verified_ranks': [2], 'hit_rank': [1]}
    """
    cands = nodes[nodes["parent_accepted"].astype(bool)]
    keys = [k for k in ("run_id", "request_id", "round", "step", "parent_id") if k in cands.columns]
    rows = []
    for _, group in cands.groupby(keys, sort=False):
        ranks = set(group["rank"].astype(int).tolist())
        prefix = 0
        while prefix in ranks:
            prefix += 1
        hits = group.loc[group["accepted"].astype(bool), "rank"].astype(int).tolist()
        hit = hits[0] if hits and hits[0] < prefix else -1
        rows.append((int(group["depth"].iloc[0]), prefix, hit))
    return pd.DataFrame(rows, columns=["depth", "n_verified_ranks", "hit_rank"])


def acceptance_table(sets: pd.DataFrame, n_ranks: int, min_sets: int = MIN_SETS) -> pd.DataFrame:
    """Per depth and rank (-1: none of them): probability, and the sets at risk and hits behind it."""
    rows = []
    for depth in range(1, int(sets["depth"].max()) + 1 if len(sets) else 1):
        at_depth = sets[sets["depth"] == depth]
        if len(at_depth) < min_sets:
            break
        survive, total = 1.0, 0.0
        for rank in range(n_ranks):
            at_risk = at_depth[(at_depth["n_verified_ranks"] > rank)
                               & ((at_depth["hit_rank"] < 0) | (at_depth["hit_rank"] >= rank))]  # fmt: skip
            hits = int((at_risk["hit_rank"] == rank).sum())
            hazard = hits / len(at_risk) if len(at_risk) else 0.0
            p = survive * hazard
            rows.append((depth, rank, p, len(at_risk), hits))
            survive *= 1 - hazard
            total += p
        rows.append((depth, -1, max(0.0, 1.0 - total), len(at_depth), int((at_depth["hit_rank"] < 0).sum())))
    return pd.DataFrame(rows, columns=["depth", "rank", "probability", "n_at_risk", "n_hits"])


def read_nodes(run_dirs: Sequence[Path]) -> tuple[pd.DataFrame, list[str]]:
    """Node frames of every policy folder in the runs, and which folders they came from."""
    frames, sources = [], []
    for run in run_dirs:
        run = Path(run)
        if not run.is_dir():
            raise RunFolderError(f"{run}: no such run folder")
        found = sorted(run.glob("*/nodes.parquet"))
        if not found:
            raise RunFolderError(f"{run}: no <policy>/nodes.parquet (a folder written by `flowspec run`)")
        for path in found:
            try:
                frame = pd.read_parquet(path)
            except Exception as e:  # pyarrow raises several types for a damaged file
                raise RunFolderError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
            for c in ("request_id", "round", "step", "depth", "rank", "parent_id", "parent_accepted", "accepted"):
                if c not in frame.columns:
                    raise RunFolderError(f"{path}: column {c} missing (runs recorded before ranks were recorded "
                                         "cannot be calibrated from)")  # fmt: skip
            frames.append(frame.assign(run_id=str(path.parent)))
            sources.append(str(path.parent))
    return pd.concat(frames, ignore_index=True), sources


def calibrate(run_dirs: Sequence[Path], out: Path, *, n_ranks: int | None = None, min_sets: int = MIN_SETS,
              command: str = "", notes: str = "") -> pd.DataFrame:  # fmt: skip
    """Write `out`.csv (the simulator's acceptance profile) and `out`.json (its card); the table."""
    nodes, sources = read_nodes(run_dirs)
    sets = candidate_sets(nodes)
    if n_ranks is None:
        n_ranks = int(nodes["n_siblings"].max()) if "n_siblings" in nodes.columns and len(nodes) else 1
    table = acceptance_table(sets, n_ranks, min_sets)
    if table.empty:
        raise RunFolderError(f"{', '.join(map(str, run_dirs))}: fewer than {min_sets} candidate sets at depth 1 "
                             f"({len(sets)} sets in all): run longer or with more prompts")  # fmt: skip
    out = Path(out).with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    table[["depth", "rank", "probability"]].assign(probability=lambda f: f["probability"].round(6)).pipe(
        _renormalized).to_csv(out.with_suffix(".csv"), index=False)
    scenario = _scenario_of(run_dirs[0])
    card = {
        "source": "measured",
        "method": (f"{command or 'flowspec calibrate'}: candidate sets (the verified children of an accepted "
                   "parent in one step) from the runs' node records; per depth and rank, a discrete hazard "
                   "(Kaplan-Meier) estimate over the ranks each set verified (right-censored beyond them)"),
        "assumes": scenario,
        "citations": [],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "runs": sources,
        "n_candidate_sets": int(len(sets)),
        "cells": table.to_dict("records"),
        "expected_tokens_per_set": _mean_tokens(table),
        "notes": ((notes + ". ") if notes else "") + (
            f"Depths with fewer than {min_sets} candidate sets are left out (deeper depths reuse the deepest "
            "row); n_at_risk: sets that verified that rank with no hit below it; for rank -1, the depth's sets "
            "and those with no hit among the ranks they verified."),
    }
    out.with_suffix(".json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    return table


def _renormalized(frame: pd.DataFrame) -> pd.DataFrame:
    """Rounded probabilities that still sum to 1 per depth (the loader checks it to 1e-6)."""
    frame = frame.copy()
    for depth, group in frame.groupby("depth"):
        none = group.index[group["rank"] == -1][0]
        frame.loc[none, "probability"] = round(max(0.0, 1.0 - group.loc[group["rank"] != -1, "probability"].sum()), 6)
    return frame


def _mean_tokens(table: pd.DataFrame) -> dict[str, float]:
    hit = table[table["rank"] >= 0].groupby("depth")["probability"].sum()
    return {f"p_hit_depth_{int(d)}": round(float(p), 4) for d, p in hit.items()}


def _scenario_of(run: Path) -> dict:
    """The tree and drafter the first run used, from its resolved scenario (what the profile assumes)."""
    import yaml

    try:
        data = yaml.safe_load((Path(run) / "resolved.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    rt = data.get("runtime", {}) if isinstance(data, dict) else {}
    return {"tree": data.get("tree"), "expansion": data.get("expansion"), "model": rt.get("model"),
            "drafter": rt.get("drafter"), "draft_lookup": rt.get("draft_lookup")}  # fmt: skip
