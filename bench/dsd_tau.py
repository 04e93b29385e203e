"""DSD's lossy gain as tau grows, from runtime runs of dsd (the simulator refuses tau > 0).

Reads the folders `flowspec run SCENARIO --policy dsd --set dsd.tau=T --out DIR` wrote (one per
tau) and prints, per run: tokens per verification step (bonus included), what strict verification
would have accepted on the *same* drafted chains (the target's argmax per node is recorded in
`decisions`, the chain's tokens in `commands`), the gain between them, the share of output tokens
strict verification would have refused (`relaxed_share`), measured tokens/s, and the tokens/s the
run's own round outcomes are worth on scenarios/dsd.yaml's boards and links (sim/closed_form.py:
the acceptance is the runtime's, the costs the scenario's; D0's extra work for relaxed
verification is not in them).

Measured tokens/s on a shared 2-core machine moves with its load; the per-step counts do not.

Usage: PYTHONPATH=. python bench/dsd_tau.py RUN_DIR... [--project scenarios/dsd.yaml]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import yaml

from flowspec import metrics
from flowspec.config import Policy, load_scenario
from flowspec.platform import build_platform
from sim import closed_form
from sim.experiment import with_policy


def chains(commands: pd.DataFrame) -> dict[int, tuple[list[int], list[int], list[int]]]:
    """Tree segments sent, by segment id: (node ids, tokens, parent ids), from the command log."""
    out = {}
    for detail in commands.loc[commands.command == "send", "detail"]:
        head, *fields = detail.split(" | ")
        if " tree " not in f" {head} ":
            continue
        parts = dict(f.split(" ", 1) for f in fields)
        out[int(head.split()[1])] = tuple([int(v) for v in parts[k].split()] for k in ("ids", "tokens", "parents"))
    return out


def strict_accepted(steps: pd.DataFrame, commands: pd.DataFrame, decisions: pd.DataFrame) -> pd.Series:
    """Per verifying step, tokens strict greedy verification would commit on the same chain
    (root + leading drafts equal to the target's argmax at their parent, + the bonus - 1)."""
    argmax = dict(zip(decisions.node_id, decisions.argmax))
    sent = chains(commands)
    counts = []
    for step in steps.itertuples():
        ids, tokens, parents = sent[step.segment_id]
        n = 1  # the root
        for node, token, parent in zip(ids[1:], tokens[1:], parents[1:]):
            if argmax.get(parent) != token:
                break
            n += 1
        counts.append(n)
    return pd.Series(counts, index=steps.index)


def row(folder: Path, projected: object) -> dict[str, object]:
    run = next(p for p in folder.iterdir() if p.is_dir())
    frames = {name: pd.read_parquet(run / f"{name}.parquet")
              for name in ("steps", "rounds", "requests", "commands", "decisions")}  # fmt: skip
    tau = yaml.safe_load((folder / "resolved.yaml").read_text())["dsd"]["tau"]
    steps = frames["steps"][frames["steps"].outcome.isin(["exit", "continue", "finish"])]
    strict = strict_accepted(steps, frames["commands"], frames["decisions"])
    summary = metrics.summary(frames).iloc[0]
    out = {"tau": tau, "steps": len(steps), "accepted_per_step": steps.n_accepted.mean(),
           "strict_per_step": strict.mean(), "gain": steps.n_accepted.mean() / strict.mean() - 1,
           "relaxed_share": summary.relaxed_share, "tokens_per_s": summary.tokens_per_s}  # fmt: skip
    if projected is not None:
        sc, platform = projected
        rounds = frames["rounds"].sort_values(["request_id", "round"])
        decode_s = sum(closed_form.decode_s(sc, platform, sc.workload.prompt_tokens, group.n_emitted.tolist())
                       for _, group in rounds.groupby("request_id"))  # fmt: skip
        out["projected_tokens_per_s"] = rounds.n_emitted.sum() / decode_s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--project", type=Path, default=Path("scenarios/dsd.yaml"),
                    help="scenario whose costs price the runs' round outcomes ('' : none)")  # fmt: skip
    args = ap.parse_args()
    projected = None
    if str(args.project):
        sc = with_policy(load_scenario(args.project), Policy.DSD)
        projected = (sc, build_platform(sc))
    frame = pd.DataFrame([row(folder, projected) for folder in args.runs]).sort_values("tau")
    import report  # matplotlib, lazily

    print(report.format_table(frame))


if __name__ == "__main__":
    main()
