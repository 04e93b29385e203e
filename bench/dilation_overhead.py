"""What time dilation cannot emulate: the runtime's work outside the padded computes.

An emulated run's time is T(k) = T_model + O / k: the padded computes and paced links scale with k
and come out exact once divided by it, while the real work between them (wire encoding, the poll
loop, a message's real loopback time) does not dilate and shrinks by k. Running one scenario at
several dilations measures O: between k1 and k2, O = (T(k1) - T(k2)) / (1/k1 - 1/k2). Prints, per
dilation, the emulated seconds per request, tokens/s and the share of the emulated time that is
unpadded work, and writes a CSV.

Usage (a quiet machine; each run loads the model once):
    python bench/dilation_overhead.py scenarios/emulated-edge.yaml --policy ar-pp --dilation 16 --dilation 32 \
        --set workload.n_requests=1 --set decoding.max_new_tokens=16
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from flowspec import metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", type=Path)
    p.add_argument("--policy", default="ar-pp")
    p.add_argument("--dilation", type=float, action="append", required=True, help="repeatable, at least two")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=Path("runs/dilation-overhead.csv"))
    args = p.parse_args(argv)
    if len(args.dilation) < 2:
        p.error("give at least two --dilation values")
    rows = []
    for k in args.dilation:
        with tempfile.TemporaryDirectory(prefix="flowspec-dilation-") as tmp:
            cmd = [sys.executable, "-m", "cli", "run", str(args.scenario), "--policy", args.policy, "--out", tmp,
                   "--no-stream", "--no-plots", "--set", f"emulate.dilation={k}",
                   *sum((["--set", o] for o in args.overrides), [])]  # fmt: skip
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            folder = Path(tmp) / args.policy
            frames = {name: pd.read_parquet(folder / f"{name}.parquet") for name in ("requests", "steps", "computes")}
        s = metrics.summary(frames).iloc[0]
        req = frames["requests"]
        served_s = float((req.t_finish_s - req.t_start_s).sum() / len(req))
        over = metrics.overruns(frames["computes"], 1.0)
        rows.append({"dilation": k, "emulated_s_per_request": served_s, "tokens_per_s": float(s.tokens_per_s),
                     "n_overruns": int(over.n_overruns.sum())})  # fmt: skip
    frame = pd.DataFrame(rows).sort_values("dilation", ignore_index=True)
    inv, t = 1 / frame.dilation.to_numpy(), frame.emulated_s_per_request.to_numpy()
    slope, intercept = np.polyfit(inv, t, 1)  # T(k) = T_model + O / k
    frame["unpadded_share"] = (slope / frame.dilation) / frame.emulated_s_per_request
    frame.attrs.update(unpadded_real_s_per_request=slope, model_s_per_request=intercept)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    with pd.option_context("display.width", 200, "display.precision", 4):
        print(frame.to_string(index=False))
    print(f"\nunpadded real work O = {slope:.3f} s per request; emulated time at infinite dilation {intercept:.3f} s;"
          f" wrote {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
