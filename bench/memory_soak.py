"""Resident memory of every runtime process over a long run: does anything grow with requests?

A testbed run serves requests for hours; a process whose memory grows with every request ends it.
This serves `--requests` requests one after another in ONE run of one policy on the scenario's
cluster (loopback), reads the resident set of D0 (this process) and of every stage every `--every`
requests, and reports each process's last reading against its reading after the first `--every`
requests (the warm-up: caches, allocator pools, the first long prompt), and each process's peak
(VmHWM) over the run. The last in-run reading is taken as the last request starts; the one after
the run also holds D0's assembled result (its records sorted and framed once, the run's output,
not growth), so it is shown but not judged. Prints a table, writes a CSV and a PNG of the curves.

Usage:
    python bench/memory_soak.py scenarios/loopback.yaml [--requests 500] [--tokens 8] [--policy flowspec]
        [--every 50] [--set KEY=VALUE ...] [--out runs/memory-soak.csv]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd

from flowspec.config import Policy, load_scenario
from runtime.launcher import Cluster, Target, make_drafter, stage_scenario
from runtime.prompts import requests_for


def resident_bytes(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (or VmHWM, the peak so far) of process `pid` (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", type=Path)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--tokens", type=int, default=8, help="new tokens per request")
    p.add_argument("--policy", default="flowspec")
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=Path("runs/memory-soak.csv"))
    args = p.parse_args(argv)
    overrides = [*args.overrides, f"workload.n_requests={args.requests}", f"decoding.max_new_tokens={args.tokens}",
                 "workload.arrivals=single"]  # fmt: skip
    scenario = load_scenario(args.scenario, overrides)
    target = Target.load(scenario, base_dir=args.scenario.parent)
    sc = stage_scenario(target.scenario, Policy(args.policy))
    requests = requests_for(sc, target.tokenizer, base_dir=args.scenario.parent)
    drafter = make_drafter(sc, target, base_dir=args.scenario.parent)
    rows: list[dict] = []
    t0 = time.monotonic()
    with Cluster(sc, target) as cluster:
        processes = {"D0": os.getpid(), **{f"V{r}": proc.pid for r, proc in cluster.procs.items()}}
        seen = {"last": -1}

        def sample(n_done: int) -> None:
            for name, pid in processes.items():
                rows.append({"requests_done": n_done, "process": name, "rss_mb": resident_bytes(pid) / 2**20,
                             "peak_mb": resident_bytes(pid, "VmHWM") / 2**20})  # fmt: skip
            print(f"{n_done:5d} requests, {time.monotonic() - t0:6.0f} s: "
                  + ", ".join(f"{r['process']} {r['rss_mb']:.0f} MB" for r in rows[-len(processes):]), flush=True)  # fmt: skip

        def on_tokens(request_id: int, tokens: tuple[int, ...]) -> None:
            if request_id != seen["last"]:  # one after another: request_id requests are done
                seen["last"] = request_id
                if request_id and (request_id % args.every == 0 or request_id == len(requests) - 1):
                    sample(request_id)

        result = cluster.serve(sc, drafter, requests, on_tokens=on_tokens)
        sample(len(requests))  # with the result assembled
        del result
    frame = pd.DataFrame(rows)
    wide = frame.pivot(index="requests_done", columns="process", values="rss_mb")
    base = wide.loc[args.every] if args.every in wide.index else wide.iloc[0]
    in_run = wide[wide.index < len(requests)]
    peak = frame.groupby("process").peak_mb.max()  # a spike between two readings shows here, not in max_mb
    summary = pd.DataFrame({"after_first_mb": base, "last_mb": in_run.iloc[-1], "max_mb": in_run.max(),
                            "with_result_mb": wide.iloc[-1], "peak_mb": peak})  # fmt: skip
    summary["last_vs_first"] = summary.last_mb / summary.after_first_mb
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    import report  # matplotlib, lazily: plots live in report

    report.plot_sweep(frame, x="requests_done", y="rss_mb", hue="process", path=args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0 if (summary.last_vs_first <= 1.10).all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
