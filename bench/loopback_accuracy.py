"""How far the simulator's predictions are from the runtime's measurements, on this machine.

Runs the real runtime on a scenario (loopback stages), then the simulator on the same scenario in
two modes, and prints one table per policy: tokens/s and accepted tokens per step, measured,
predicted and the error.

- calibrated: `flowspec simulate`'s own model — the scenario's device profiles and acceptance
  profile — on the run's requests (prompt and output lengths): what a user gets before any run;
- calibrated-on-run: the same with an acceptance profile calibrated from this run's own node
  outcomes, which separates the synthetic acceptance model's error from a different prompt mix;
- replay: `flowspec replay` — the run's own drafts and target decisions, so only timing differs.

Usage (measure on a quiet machine; writes the run folder and runs/loopback-accuracy.csv):
    python bench/loopback_accuracy.py scenarios/loopback.yaml --policy ar-pp --policy serial \
        --policy single-sd --set workload.n_requests=8
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from flowspec import metrics
from flowspec.config import Policy, load_scenario
from sim.calibrate import calibrate
from sim.experiment import simulate
from sim.replay import first_divergence, load_run, replay


def calibrated(args: argparse.Namespace, run, policy: Policy, requests: pd.DataFrame,
               extra: Sequence[str] = ()) -> dict[str, pd.DataFrame]:  # fmt: skip
    """The simulator's own model on the run's requests: each request simulated alone (they are served
    one after another) with its prompt length and the output length it really had (EOS included),
    acceptance from the scenario's acceptance profile; frames concatenated."""
    parts: dict[str, list[pd.DataFrame]] = {}
    for r in requests.itertuples():
        sc = load_scenario(args.scenario, [*args.overrides, f"policy={policy}", "workload.arrivals=single",
                                           "workload.n_requests=1", f"workload.prompt_tokens={r.n_prompt_tokens}",
                                           f"decoding.max_new_tokens={r.n_output_tokens}", f"seed={r.request_id}",
                                           *extra])  # fmt: skip
        for name, frame in simulate(sc, base_dir=args.scenario.parent, run_id=f"calibrated/{r.request_id}").frames().items():
            parts.setdefault(name, []).append(frame)
    return {name: pd.concat(frames, ignore_index=True) for name, frames in parts.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", type=Path)
    p.add_argument("--policy", action="append", default=[], help="repeatable; default: ar-pp, serial, single-sd")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--run-dir", type=Path, help="reuse this run folder instead of running the runtime")
    p.add_argument("--prompts", type=Path, help="JSONL prompts for the run (default: the scenario's built-in ones)")
    p.add_argument("--out", type=Path, default=Path("runs/loopback-accuracy.csv"))
    args = p.parse_args(argv)
    policies = [Policy(x) for x in (args.policy or ["ar-pp", "serial", "single-sd"])]
    scenario = load_scenario(args.scenario, args.overrides)
    run_dir = args.run_dir or Path("runs") / f"{scenario.name}-accuracy-runtime"
    if args.run_dir is None:
        cmd = [sys.executable, "-m", "cli", "run", str(args.scenario), "--out", str(run_dir), "--no-stream",
               "--no-plots", *sum((["--policy", str(x)] for x in policies), []),
               *sum((["--set", o] for o in args.overrides), []),
               *(["--prompts", str(args.prompts)] if args.prompts else [])]  # fmt: skip
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    run = load_run(run_dir)
    own = Path(tempfile.mkdtemp(prefix="flowspec-acceptance-")) / "this-run"
    calibrate([run_dir], own, min_sets=20)  # the run's own acceptance: separates model error from prompt mix
    rows = []
    for policy in policies:
        measured = run.frames[str(policy)]
        m = metrics.summary(measured).iloc[0]
        predicted = {
            "calibrated": metrics.summary(calibrated(args, run, policy, measured["requests"])).iloc[0],
            "calibrated-on-run": metrics.summary(calibrated(args, run, policy, measured["requests"],
                                                            [f"acceptance.profile={own.with_suffix('.csv')}"])).iloc[0],
        }  # fmt: skip
        replayed = replay(run, policy).frames()
        predicted["replay"] = metrics.summary(replayed).iloc[0]
        same = first_divergence(measured["commands"], replayed["commands"]) is None
        for mode, s in predicted.items():
            rows.append({
                "policy": str(policy), "mode": mode,
                "tokens_per_s_measured": m.tokens_per_s, "tokens_per_s_predicted": s.tokens_per_s,
                "tokens_per_s_error": s.tokens_per_s / m.tokens_per_s - 1,
                "accepted_per_step_measured": m.accepted_per_step, "accepted_per_step_predicted": s.accepted_per_step,
                "accepted_per_step_error": s.accepted_per_step / m.accepted_per_step - 1,
                "same_commands": same if mode == "replay" else None,
            })  # fmt: skip
    frame = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
        print(frame.to_string(index=False))
    print(f"\nrun folder {run_dir}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
