"""Ranking policies by tokens/s: an inversion counts only where the simulator's draws are sure of it."""

from __future__ import annotations

import pandas as pd

from sim.validation import inversions


def rates(mode: str, measured: dict[str, float], predicted: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame({"policy": list(measured), "mode": mode, "observable": "tokens_per_s",
                         "measured": list(measured.values()), "predicted": [predicted[p] for p in measured]})  # fmt: skip


def draws(mode: str, per_policy: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([(p, mode, r, v) for p, vs in per_policy.items() for r, v in enumerate(vs)],
                        columns=["policy", "mode", "replicate", "tokens_per_s"])  # fmt: skip


def test_a_pair_the_draws_split_on_is_a_tie_and_one_they_agree_on_is_an_inversion() -> None:
    table = rates("calibrated", {"a": 10.0, "b": 9.9, "c": 8.0, "d": 5.0}, {"a": 9.8, "b": 10.0, "c": 10.5, "d": 4.0})
    d = draws("calibrated", {"a": [9.0, 10.4, 9.6, 10.2, 9.8, 9.8, 9.8, 9.8, 9.8, 9.8],
                             "b": [10.0] * 10, "c": [10.5] * 10, "d": [4.0] * 10})  # fmt: skip
    out = inversions(table, d, "calibrated").sort_values(["faster", "slower"])
    # a beat b in 2 of 10 paired draws: too close to call; a beat c in none, b beat c in none: decided
    assert out[["faster", "slower", "draws_agree", "decided"]].to_dict("list") == {
        "faster": ["a", "a", "b"], "slower": ["b", "c", "c"], "draws_agree": [0.2, 0.0, 0.0],
        "decided": [False, True, True]}  # fmt: skip
    assert out.measured_ratio.round(4).tolist() == [1.0101, 1.25, 1.2375]
    assert out.predicted_ratio.round(4).tolist() == [0.98, 0.9333, 0.9524]


def test_replay_has_one_draw_so_every_inversion_is_decided_and_agreeing_orders_are_none() -> None:
    table = rates("replay", {"a": 10.0, "b": 9.99}, {"a": 9.0, "b": 9.01})
    out = inversions(table, draws("replay", {"a": [9.0], "b": [9.01]}), "replay")
    assert out[["faster", "slower", "decided"]].values.tolist() == [["a", "b", True]]
    same = rates("replay", {"a": 10.0, "b": 9.0}, {"a": 12.0, "b": 11.0})
    assert inversions(same, draws("replay", {"a": [12.0], "b": [11.0]}), "replay").empty
