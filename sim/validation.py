"""How far the simulator's predictions are from the runtime's measurements (`flowspec validate`).

Theory of operation
-------------------
A runtime run folder (`flowspec run`, on loopback, an emulated testbed or real boards) is
predicted by the simulator in two modes, each policy on the run's own requests:

- *replay* (`sim.replay`): the run's own drafts and target decisions, so only timing can differ.
  The simulator's core must issue the runtime's command sequence exactly; an emulated run is
  replayed on the testbed it emulated (`emulated.yaml`: its model, devices and network). A
  batching policy has no replay: its node ids and drafter calls follow how its lanes interleaved,
  which the run's timing decided.
- *calibrated*: the simulator as a user runs it before any run: the scenario's acceptance
  profile drives the synthetic drafter and target, on the run's prompt lengths and output
  lengths (each request simulated alone, as the runs serve them one after another; a batching
  policy's requests together, each arriving when it did in the run). One draw of
  a few dozen tokens is as noisy as the run it predicts, so the run is simulated `replicates`
  times with different seeds: the prediction is the replicates' mean, and their 5th and 95th
  percentiles (`predicted_p05`, `predicted_p95`) say how far one run of this length may fall
  from it by chance alone.

`compare` returns one long frame: per policy, mode and observable, the measured value, the
predicted one and the error. Rates (`tokens_per_s`, `step_ms`, `accepted_per_step`) have a
relative error, predicted / measured - 1; shares of a device's time (`busy`, `idle_<cause>`,
one row per device) an absolute one, predicted - measured, since a share near 0 has no
meaningful ratio. `ranking` says whether the policies rank alike by tokens/s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from flowspec import idle, metrics
from flowspec.config import Policy, apply_overrides, scenario_from_dict, scenario_to_dict
from flowspec.platform import PROFILES_DIR
from flowspec.policy import spec
from flowspec.workload import Request
from sim.experiment import build_engine, simulate, with_policy
from sim.replay import RecordedRun, RunFolderError, first_divergence, replay

MODES = ("replay", "calibrated")
RATES = ("tokens_per_s", "step_ms", "accepted_per_step", "throughput_tokens_per_s")  # the last: batches only
COLUMNS = ("policy", "mode", "observable", "device", "measured", "predicted", "error", "predicted_p05", "predicted_p95")
REPLICATES = 16  # calibrated draws per run: the mean's noise is a quarter of one draw's
CONFIDENCE = 0.9  # an inversion counts when nine in ten paired draws order the pair against the run
SEED_STRIDE = 1_000_003  # replicate r of request i simulates with seed i + r * SEED_STRIDE


def run_frames(run: RecordedRun, policy: Policy) -> dict[str, pd.DataFrame]:
    """Every frame the run wrote for `policy` (replay's loader reads only what replay needs)."""
    folder = run.folder / str(policy)
    frames = {}
    for path in sorted(folder.glob("*.parquet")):
        try:
            frames[path.stem] = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise RunFolderError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    return frames


def calibrated(run: RecordedRun, policy: Policy, measured: dict[str, pd.DataFrame], *, replicate: int = 0,
               profiles_dir: Path = PROFILES_DIR) -> dict[str, pd.DataFrame]:  # fmt: skip
    """The simulator's own model on the run's requests: each request alone with its prompt length and
    the output length it really had; EOS off (the synthetic target's ids mean nothing), seeds by id
    and `replicate`; the requests' frames laid end to end on one time axis, with their run's ids."""
    base = scenario_to_dict(with_policy(run.scenario, policy))
    requests = measured["requests"].sort_values("request_id")
    if spec(policy).batched:
        return _calibrated_together(run, policy, base, requests, replicate, profiles_dir)
    parts: dict[str, list[pd.DataFrame]] = {}
    offset_s = 0.0
    for r in requests.itertuples():
        data = apply_overrides(base, ["workload.arrivals=single", "workload.n_requests=1",
                                      f"workload.prompt_tokens={int(r.n_prompt_tokens)}",
                                      f"decoding.max_new_tokens={int(r.n_output_tokens)}",
                                      "decoding.eos_token_id=null",
                                      f"seed={int(r.request_id) + SEED_STRIDE * replicate}"])  # fmt: skip
        sc = scenario_from_dict(data, f"{run.folder} (calibrated, request {r.request_id})")
        result = simulate(sc, profiles_dir=profiles_dir, run_id=f"{sc.name}/{policy}/calibrated")
        for name, frame in result.frames().items():  # one after another on one time axis, as served
            times = [c for c in frame.columns if c.startswith("t_") and c.endswith("_s")]
            frame = frame.assign(**{c: frame[c] + offset_s for c in times})
            if "request_id" in frame:
                frame["request_id"] = int(r.request_id)
            parts.setdefault(name, []).append(frame)
        offset_s += result.elapsed_s
    return {name: pd.concat(frames, ignore_index=True) for name, frames in parts.items()}


def _calibrated_together(run: RecordedRun, policy: Policy, base: dict, requests: pd.DataFrame, replicate: int,
                         profiles_dir: Path) -> dict[str, pd.DataFrame]:  # fmt: skip
    """A batching policy's requests are served side by side, so they are simulated together: each
    arriving when it did in the run, with its prompt and output lengths (synthetic prompts)."""
    data = apply_overrides(base, ["decoding.eos_token_id=null", f"seed={SEED_STRIDE * replicate}"])
    sc = scenario_from_dict(data, f"{run.folder} (calibrated)")
    rng = np.random.default_rng([sc.seed, 1])
    reqs = [Request(int(r.request_id), float(r.t_arrival_s),
                    tuple(int(t) for t in rng.integers(1, sc.model.vocab_size, size=int(r.n_prompt_tokens))),
                    int(r.n_output_tokens)) for r in requests.itertuples()]  # fmt: skip
    engine = build_engine(sc, profiles_dir=profiles_dir, run_id=f"{sc.name}/{policy}/calibrated", requests=reqs)
    return engine.run().frames()


def observables(frames: dict[str, pd.DataFrame]) -> list[tuple[str, str, float]]:
    """(observable, device, value) of one run: its rates, then each device's shares of its time."""
    s = metrics.summary(frames).iloc[0]
    req = metrics.frame_of(frames, "requests")
    decode_s = float((metrics.numeric(req, "t_finish_s") - metrics.numeric(req, "t_first_token_s")).sum())
    step_ms = 1000 * decode_s / s.n_steps if s.n_steps else np.nan
    rows = [("tokens_per_s", "", float(s.tokens_per_s)), ("step_ms", "", step_ms),
            ("accepted_per_step", "", float(s.accepted_per_step))]  # fmt: skip
    if s.max_concurrent > 1:  # a batch: the workload's rate, first arrival to last finish, too
        rows.append(("throughput_tokens_per_s", "", float(s.throughput_tokens_per_s)))
    table = idle.idle_attribution(frames)
    for r in table.to_dict("records"):
        device = "D0" if r["stage"] == 0 else f"V{r['stage']}"
        window = r["window_s"]
        rows.append(("busy", device, r["busy_s"] / window if window else np.nan))
        for key in (k for k in r if k.startswith("idle_") and k.endswith("_s")):
            rows.append((key.removesuffix("_s"), device, (r[key] or 0.0) / window if window else np.nan))
    return rows


def _pair(policy: str, mode: str, measured: list, predicted: list[list]) -> list[dict]:
    """Rows of measured against predicted; `predicted` holds one list of observables per draw."""
    draws: dict[tuple[str, str], list[float]] = {}
    for one in predicted:
        for o, d, v in one:
            draws.setdefault((o, d), []).append(v)
    rows = []
    for observable, device, m in measured:
        values = np.asarray(draws.get((observable, device), [np.nan]), dtype=float)
        p = float(np.nanmean(values)) if np.isfinite(values).any() else np.nan
        lo, hi = (float(np.nanquantile(values, q)) for q in (0.05, 0.95)) if len(values) > 1 and np.isfinite(p) \
            else (np.nan, np.nan)  # fmt: skip
        if observable in RATES:
            error = p / m - 1 if m and np.isfinite(m) else np.nan
        else:
            error = p - m
        rows.append(dict(zip(COLUMNS, (policy, mode, observable, device, m, p, error, lo, hi))))
    return rows


def _draw_rows(policy: str, mode: str, predicted: list[list]) -> list[tuple[str, str, int, float]]:
    return [(policy, mode, r, v) for r, one in enumerate(predicted) for o, d, v in one if o == "tokens_per_s"]


def compare(run: RecordedRun, policies: Sequence[Policy], modes: Sequence[str] = MODES, *, replicates: int = REPLICATES,
            profiles_dir: Path = PROFILES_DIR, echo=lambda _m: None) -> tuple[pd.DataFrame, dict[str, bool], pd.DataFrame]:  # fmt: skip
    """The long table of measured vs predicted (module docstring); per policy whether replay's
    command sequence equals the run's (True where replay was not asked for); and each draw's
    tokens/s (policy, mode, replicate, tokens_per_s: replay is one draw), for `inversions`."""
    rows: list[dict] = []
    draws: list[tuple[str, str, int, float]] = []
    same: dict[str, bool] = {}
    for policy in policies:
        measured = run_frames(run, policy)
        m = observables(measured)
        same[str(policy)] = True
        if "replay" in modes and spec(policy).batched:  # ids and drafter calls follow the lanes' interleaving
            echo(f"  {policy}: no replay (a batch's lanes interleave as the run's timing fell); calibrated only")
        elif "replay" in modes:
            echo(f"  {policy}: replay")
            replayed = replay(run, policy, profiles_dir=profiles_dir).frames()
            same[str(policy)] = first_divergence(measured["commands"], replayed["commands"]) is None
            one = [observables(replayed)]
            rows += _pair(str(policy), "replay", m, one)
            draws += _draw_rows(str(policy), "replay", one)
        if "calibrated" in modes:
            echo(f"  {policy}: calibrated, {replicates} draw(s)")
            many = [observables(calibrated(run, policy, measured, replicate=r, profiles_dir=profiles_dir))
                    for r in range(replicates)]  # fmt: skip
            rows += _pair(str(policy), "calibrated", m, many)
            draws += _draw_rows(str(policy), "calibrated", many)
    return (pd.DataFrame(rows, columns=list(COLUMNS)), same,
            pd.DataFrame(draws, columns=["policy", "mode", "replicate", "tokens_per_s"]))  # fmt: skip


def headline(table: pd.DataFrame) -> pd.DataFrame:
    """One row per policy and mode: the rates measured, predicted and their errors, and the band of
    tokens/s the calibrated draws spanned (5th to 95th percentile; empty for replay)."""
    rates = table[table.observable.isin(RATES)]
    wide = rates.pivot_table(index=["policy", "mode"], columns="observable", values=["measured", "predicted", "error"],
                             aggfunc="first", sort=False)  # fmt: skip
    wide.columns = [f"{obs}_{what}" for what, obs in wide.columns]
    order = [f"{o}_{w}" for o in RATES for w in ("measured", "predicted", "error") if f"{o}_{w}" in wide.columns]
    band = rates[rates.observable == "tokens_per_s"].set_index(["policy", "mode"])[["predicted_p05", "predicted_p95"]]
    band.columns = ["tokens_per_s_p05", "tokens_per_s_p95"]
    return wide[order].join(band).reset_index()


def ranking(table: pd.DataFrame, mode: str) -> tuple[list[str], list[str]]:
    """Policies by tokens/s, fastest first: measured, and as `mode` predicts."""
    t = table[(table.observable == "tokens_per_s") & (table["mode"] == mode)]
    return (t.sort_values("measured", ascending=False).policy.tolist(),
            t.sort_values("predicted", ascending=False).policy.tolist())  # fmt: skip


def inversions(table: pd.DataFrame, draws: pd.DataFrame, mode: str, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Pairs of policies the run and `mode`'s mean prediction order differently by tokens/s.

    Per pair (`faster`: faster in the run): the run's ratio faster / slower, the prediction's, and
    `draws_agree`, the share of draws that order the pair as the run did, draw r of one policy
    against draw r of the other (same seeds: paired). An inversion is `decided` when fewer than
    1 - `confidence` of the draws agree with the run: the simulator is sure of the other order.
    Otherwise the pair is too close for a run this long, and either order is a chance outcome.
    Replay has one draw, so each of its inversions is decided.

    >>> t = pd.DataFrame({"policy": ["a", "b", "c"], "mode": "calibrated", "observable": "tokens_per_s",
    ...                   "measured": [10.0, 9.0, 5.0], "predicted": [9.0, 9.5, 5.0]})
    >>> d = pd.DataFrame({"policy": ["a"] * 4 + ["b"] * 4, "mode": "calibrated", "replicate": [0, 1, 2, 3] * 2,
    ...                   "tokens_per_s": [9.0, 9.9, 8.0, 9.1, 9.5, 9.5, 9.5, 9.5]})
    >>> inversions(t, d, "calibrated")[["faster", "slower", "draws_agree", "decided"]].to_dict("records")
    [{'faster': 'a', 'slower': 'b', 'draws_agree': 0.25, 'decided': False}]
    """
    rates = table[(table.observable == "tokens_per_s") & (table["mode"] == mode)].set_index("policy")
    per_draw = draws[draws["mode"] == mode].pivot_table(index="replicate", columns="policy", values="tokens_per_s")
    rows = []
    for a in rates.index:
        for b in rates.index:
            ma, mb, pa, pb = rates.at[a, "measured"], rates.at[b, "measured"], rates.at[a, "predicted"], rates.at[b, "predicted"]
            if not (ma > mb and pa < pb):
                continue
            pair = per_draw[[a, b]].dropna() if {a, b} <= set(per_draw.columns) else per_draw.iloc[:0]
            agree = float((pair[a] > pair[b]).mean()) if len(pair) else 0.0
            rows.append((a, b, ma / mb, pa / pb, agree, agree < 1 - confidence))
    return pd.DataFrame(rows, columns=["faster", "slower", "measured_ratio", "predicted_ratio", "draws_agree", "decided"])
