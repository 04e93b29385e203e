"""DSD against a plain pipeline over N and the link latency t1: the simulator and the closed form.

For every point of a grid over `pipeline.n_stages` (N), `network.latency_ms` (t1) and `dsd.length`
(k) of a scenario (default scenarios/dsd.yaml), simulates dsd and ar-pp and sets beside each
policy's decode time per token (first token to last, as `1 / decode_tokens_per_s`) what
sim/closed_form.py says the simulator charges, given how many tokens each round emitted. The
saving per token (ar-pp - dsd) is split into its latency part, hops * t1 * (1 - 1/e) with e the
tokens per traversal (DSD's (N-1)*t1*(k-1)/k on this ring of N + 1 hops), and the rest (bytes,
overheads, compute, drafting). With `--acceptance acceptance/all-accepted.csv` (the default) every
draft is accepted, e = k + 1 and the closed form is exact; with the scenario's own profile
(`--acceptance scenario`) it is exact given the rounds' outcomes, which the simulation supplies.

It runs `sim.experiment.simulate` itself rather than `flowspec sweep`: the closed form needs each
round's emitted tokens (the `rounds` frame), which a sweep's summary rows do not keep.

Usage: PYTHONPATH=. python bench/dsd_sweep.py [--scenario scenarios/dsd.yaml] [--n-stages 2,4,8]
       [--latency-ms 0,5,20,50] [--length 3,5] [--acceptance acceptance/all-accepted.csv | scenario]
       [--tokens 121] [--out runs/dsd-sweep]
Writes OUT/dsd_sweep.csv and OUT/dsd_sweep.png (speed-up of dsd over ar-pp against t1, per N).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

import pandas as pd

from flowspec.config import Policy, Scenario, load_scenario
from flowspec.platform import build_platform
from sim import closed_form
from sim.experiment import simulate, with_policy


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def measure(scenario: Scenario) -> dict[str, float]:
    """Simulated and closed-form decode seconds per token of one policy, and its tokens per round."""
    frames = simulate(scenario).frames()
    requests, rounds = frames["requests"], frames["rounds"].sort_values(["request_id", "round"])
    platform = build_platform(scenario)
    closed_s = 0.0
    for req in requests.itertuples():
        emitted = rounds.loc[rounds.request_id == req.request_id, "n_emitted"].tolist()
        assert sum(emitted) == req.n_output_tokens - 1, "every token after the first comes from a round"
        closed_s += closed_form.decode_s(scenario, platform, int(req.n_prompt_tokens), emitted)
    n_tokens = int((requests.n_output_tokens - 1).sum())
    sim_s = float((requests.t_finish_s - requests.t_first_token_s).sum())
    return {"sim_ms": 1000 * sim_s / n_tokens, "closed_ms": 1000 * closed_s / n_tokens,
            "tokens_per_round": n_tokens / len(rounds), "n_rounds": len(rounds)}  # fmt: skip


def point(base: Scenario, n_stages: int, latency_ms: float, length: int) -> dict[str, float]:
    network = dataclasses.replace(base.network, latency_ms=latency_ms, links=())
    sc = dataclasses.replace(base, pipeline=dataclasses.replace(base.pipeline, n_stages=n_stages, layers=()),
                             network=network, dsd=dataclasses.replace(base.dsd, length=length))  # fmt: skip
    ar, dsd = (measure(with_policy(sc, p)) for p in (Policy.AR_PP, Policy.DSD))
    hops = n_stages + 1
    e = dsd["tokens_per_round"]
    return {
        "n_stages": n_stages, "latency_ms": latency_ms, "length": length, "hops": hops, "tokens_per_round": e,
        "ar_pp_ms": ar["sim_ms"], "ar_pp_closed_ms": ar["closed_ms"],
        "dsd_ms": dsd["sim_ms"], "dsd_closed_ms": dsd["closed_ms"],
        "saving_ms": ar["sim_ms"] - dsd["sim_ms"], "saving_closed_ms": ar["closed_ms"] - dsd["closed_ms"],
        # the paper's term: every round pays the ring's latency once, ar-pp once per token
        "latency_saving_ms": hops * latency_ms * (1 - 1 / e),
        # bytes, overheads, compute and drafting: the same at every t1 of one (N, k)
        "other_saving_ms": ar["closed_ms"] - dsd["closed_ms"] - hops * latency_ms * (1 - 1 / e),
        "speedup": ar["sim_ms"] / dsd["sim_ms"],
        "max_rel_err": max(abs(r["sim_ms"] / r["closed_ms"] - 1) for r in (ar, dsd)),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", type=Path, default=Path("scenarios/dsd.yaml"))
    ap.add_argument("--n-stages", type=_ints, default=[2, 4, 8])
    ap.add_argument("--latency-ms", type=_floats, default=[0.0, 5.0, 20.0, 50.0])
    ap.add_argument("--length", type=_ints, default=[3, 5])
    ap.add_argument("--acceptance", default="acceptance/all-accepted.csv",
                    help="acceptance profile, or 'scenario' for the scenario's own")  # fmt: skip
    ap.add_argument("--requests", type=int, default=1, help="workload.n_requests (identical when all accepted)")
    # 1 + 120: every round whole when all drafts are accepted (k + 1 divides 120 for k = 1..5, 7)
    ap.add_argument("--tokens", type=int, default=121, help="decoding.max_new_tokens (0: the scenario's)")
    ap.add_argument("--out", type=Path, default=Path("runs/dsd-sweep"))
    args = ap.parse_args()

    overrides = [f"workload.n_requests={args.requests}"]
    if args.acceptance != "scenario":
        overrides.append(f"acceptance.profile={args.acceptance}")
    if args.tokens:
        overrides.append(f"decoding.max_new_tokens={args.tokens}")
    base = load_scenario(args.scenario, overrides)
    rows = [point(base, n, t1, k) for n, t1, k in itertools.product(args.n_stages, args.latency_ms, args.length)]
    frame = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "dsd_sweep.csv", index=False)
    import report  # matplotlib, lazily

    keys = ["n_stages", "latency_ms", "length"]
    shown = frame.drop(columns=["hops"]).astype({k: str for k in keys})  # not 2.00 stages
    print(f"{base.name}: acceptance {base.acceptance.profile}, per-token decode times in ms (sim | closed form)")
    print(report.format_table(shown))
    plot = report.plot_sweep(frame.assign(**{"N, k": frame.n_stages.astype(str) + " stages, k = " + frame.length.astype(str)}),
                             "latency_ms", "speedup", hue="N, k", path=args.out / "dsd_sweep.png")  # fmt: skip
    print(f"\nwrote {args.out / 'dsd_sweep.csv'}, {plot}")


if __name__ == "__main__":
    main()
