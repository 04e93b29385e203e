"""Peak resident memory of every runtime process against one process that holds the whole model.

An edge board holds one slice of the target, so a stage's memory must be its share of the weights
plus the framework, not the model. This starts the scenario's cluster (one process per stage on
loopback), serves one short request so every stage has computed, and reads each process's peak
resident set (VmHWM) — the stages', and D0's growth while it loaded its part — and, in a separate
process, the peak of loading the whole model as `transformers` does and running one forward (an
untouched memory-mapped weight is not resident, and every stage has read all of its own). Prints
a table and writes a CSV.

Usage:
    python bench/stage_memory.py scenarios/loopback.yaml [--set KEY=VALUE ...] [--out runs/stage-memory.csv]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from flowspec.config import Policy, load_scenario
from flowspec.workload import one_after_another
from runtime.launcher import Cluster, Target, stage_scenario

# Peaks are read from VmHWM, which starts afresh at exec; ru_maxrss would carry this process's over.
PEAK = "import re; print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024)"
WHOLE = f"""
import sys, torch
from pathlib import Path
from runtime.models import load_model
torch.set_num_threads(1)
model = load_model(Path(sys.argv[1]))
with torch.inference_mode():  # one forward, as every stage has run: weights not yet read may not be resident
    model(torch.arange(8)[None])
{PEAK}
"""
BARE = f"""
import runtime.stage  # everything a stage process imports, before it loads anything
{PEAK}
"""
TORCH = f"""
import torch  # the floor: a stage cannot import less
{PEAK}
"""


def peak_bytes(pid: int) -> int:
    """VmHWM: the most resident memory the process ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", type=Path)
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=Path("runs/stage-memory.csv"))
    args = p.parse_args(argv)
    scenario = load_scenario(args.scenario, args.overrides)
    import transformers.models.llama.modeling_llama  # noqa: F401 (D0 imports it: not what it loads)

    d0_before = peak_bytes(_self())
    target = Target.load(scenario)
    d0_loaded = peak_bytes(_self())
    sc = stage_scenario(target.scenario, Policy.AR_PP)
    rows = []
    with Cluster(sc, target) as cluster:
        cluster.serve(sc, _no_drafter(target), one_after_another([[1, 2, 3, 4, 5, 6, 7, 8]]))
        for rank, proc in sorted(cluster.procs.items()):
            first, last = cluster.ranges[rank - 1]
            rows.append({"process": f"V{rank}", "layers": last - first, "peak_mb": peak_bytes(proc.pid) / 2**20})
    whole = int(subprocess.run([sys.executable, "-c", WHOLE, str(target.model_dir)], capture_output=True, text=True,
                               check=True).stdout.split()[-1])  # fmt: skip
    bare, floor = (int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])
                   for code in (BARE, TORCH))  # fmt: skip
    rows.append({"process": "D0 (growth while loading its part)", "layers": 0, "peak_mb": (d0_loaded - d0_before) / 2**20})
    rows.append({"process": "whole model, one process", "layers": target.scenario.model.n_layers, "peak_mb": whole / 2**20})
    rows.append({"process": "a stage's imports alone, nothing loaded", "layers": 0, "peak_mb": bare / 2**20})
    rows.append({"process": "import torch alone", "layers": 0, "peak_mb": floor / 2**20})
    frame = pd.DataFrame(rows)
    frame["share_of_whole"] = frame.peak_mb / (whole / 2**20)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    print(f"wrote {args.out}")
    return 0


def _self() -> int:
    return os.getpid()


def _no_drafter(target: Target):
    from flowspec.lookup import PromptLookupDrafter

    return PromptLookupDrafter(target.scenario.model.vocab_size)


if __name__ == "__main__":
    sys.exit(main())
