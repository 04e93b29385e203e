"""Where FlowSpec overtakes PipeDec and SpecPipe as the drafter gets better (simulator only).

On the emulated testbed (scenarios/emulated-edge.yaml: Orin boards, a 7B model's costs) the runtime
measures pipedec and specpipe ~5% ahead of flowspec, and the simulator predicts the same; on
sparse-edge.yaml, the same boards, flowspec leads pipedec by ~1.2x. The difference between the two
scenarios that matters is the acceptance profile: the emulated testbed executes SmolLM2-135M, whose
EAGLE head finds the target's token among its children at depth 1 56% of the time; sparse-edge
uses the estimate for EAGLE-2 on a 7B chat model (93%). This sweeps the acceptance between them,
a mixture w of the two tables depth by depth (w = 0: SmolLM2's, w = 1: the 7B estimate), on the
emulated testbed's boards and links, and prints tokens/s per policy and flowspec's ratio to each.

A policy that verifies one tree layer per pipeline step (pipedec, specpipe) gains little from a
good drafter beyond never draining; flowspec's segments carry several accepted tokens per step
once the drafter is right more often than not.

Usage: PYTHONPATH=. python bench/acceptance_crossover.py [--scenario S] [--weights 0,0.25,...]
       [--out bench-acceptance-crossover]   (prints a table; writes OUT.csv and OUT.png)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

import report
from flowspec import metrics
from flowspec.config import Policy, load_scenario
from flowspec.costs import AcceptanceProfile
from flowspec.platform import PROFILES_DIR
from sim.experiment import rank_table, simulate, with_policy

WEAK = "acceptance/smollm2-135m-eagle-lookup-80x10x6.csv"
STRONG = "acceptance/eagle2-7b-chat-estimate.csv"
POLICIES = (Policy.FLOWSPEC, Policy.PIPEDEC, Policy.SPECPIPE, Policy.CHUNK_PP)


def mixture(weak: np.ndarray, strong: np.ndarray, w: float) -> np.ndarray:
    """(1 - w) weak + w strong per depth and rank; the shorter table repeats its last depth."""
    depths = max(len(weak), len(strong))
    pad = [np.vstack([t, np.repeat(t[-1:], depths - len(t), axis=0)]) for t in (weak, strong)]
    return (1 - w) * pad[0] + w * pad[1]


def write_profile(table: np.ndarray, path: Path, w: float) -> Path:
    rows = [(d + 1, r if r < table.shape[1] - 1 else -1, float(p)) for d in range(len(table))
            for r, p in enumerate(table[d])]  # fmt: skip
    pd.DataFrame(rows, columns=["depth", "rank", "probability"]).to_csv(path, index=False)
    card = {"source": "estimated", "method": f"bench/acceptance_crossover.py: {1 - w:g} x {WEAK} + {w:g} x {STRONG}",
            "assumes": {}, "citations": []}  # fmt: skip
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", type=Path, default=Path("scenarios/emulated-edge.yaml"))
    ap.add_argument("--weights", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench-acceptance-crossover"))
    args = ap.parse_args()
    weak, strong = (rank_table(AcceptanceProfile.load(PROFILES_DIR / p)) for p in (WEAK, STRONG))
    rows = []
    with tempfile.TemporaryDirectory(prefix="flowspec-crossover-") as tmp:
        for w in (float(x) for x in args.weights.split(",")):
            table = mixture(weak, strong, w)
            profile = write_profile(table, Path(tmp) / f"mix-{w:g}.csv", w)
            base = load_scenario(args.scenario, [f"acceptance.profile={profile}", f"workload.n_requests={args.requests}",
                                                 f"decoding.max_new_tokens={args.tokens}", "decoding.eos_token_id=null"])  # fmt: skip
            for policy in POLICIES:
                s = metrics.summary(simulate(with_policy(base, policy)).frames()).iloc[0]
                rows.append({"weight_strong": w, "p_hit_depth_1": round(float(1 - table[0, -1]), 3),
                             "policy": str(policy), "tokens_per_s": float(s.tokens_per_s),
                             "accepted_per_step": float(s.accepted_per_step)})  # fmt: skip
                print(f"  w={w:g} {policy}: {s.tokens_per_s:.1f} tok/s", flush=True)
    frame = pd.DataFrame(rows)
    wide = frame.pivot_table(index=["weight_strong", "p_hit_depth_1"], columns="policy", values="tokens_per_s",
                             sort=False).reset_index()  # fmt: skip
    for other in ("pipedec", "specpipe", "chunk-pp"):
        wide[f"flowspec_vs_{other}"] = wide["flowspec"] / wide[other]
    print(report.format_table(wide))
    frame.to_csv(args.out.with_suffix(".csv"), index=False)
    report.plot_sweep(frame, x="p_hit_depth_1", y="tokens_per_s", path=args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.csv')}, {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
