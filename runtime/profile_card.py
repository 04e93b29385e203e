"""The provenance card (meta.json) and the CSV of a measured device profile.

Theory of operation
-------------------
A profile belongs to the board it was measured on (DESIGN.md section 8), so the card records
everything that decides the numbers: the CPU's model name and the GPU's, the torch device, dtype
and thread count, the torch and transformers versions, the commit and whether the checkout was
clean, the machine's load average around the run, the drafter timed, the grid and budget, and a
command line that repeats the measurement with every option spelled out. `COLUMNS` is the schema
`flowspec.costs` validates (profiles/README.md).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flowspec.config import Scenario
from flowspec.costs import STAGE_COLUMNS
from runtime.provenance import cpu_model, git_revision

if TYPE_CHECKING:
    from runtime.device_profile import Measurement, ProfileOptions

COLUMNS = STAGE_COLUMNS
METHOD = (
    "layer = (LayerSlice forward over every decoder layer - the same forward with no layers) / n_layers, "
    "one segment of n_tokens rows (explicit positions, additive mask from a [n, kv_len + n] visibility matrix, "
    "rotary) over a KV cache of kv_len random K/V per layer, cropped back after every call; "
    "stage_overhead = per forward besides the layers: wire.decode + to_segment + hidden_from_wire of the "
    "incoming segment, StageLedger.visibility, the no-layer LayerSlice forward, hidden_to_wire + "
    "wire.encode_segment of the result; embed = the input embedding of n ids; head = D0 on n returned rows: "
    "hidden_from_wire, final norm, h @ lm_head.T, argmax, the drafter's observe; draft = the drafter "
    "runtime.launcher.make_drafter builds, its propose over n frontier rows one level below an already-run "
    "root after a committed context of kv_len tokens (text-like Zipf ids, random features observed); "
    "d0_step = PipelineCore.handle of a returned segment that led to commands plus the DraftDone after it, "
    "minus the drafter's time, on flowspec.driver.InMemoryDriver (4 stages, hash target, oracle drafter; "
    "flowspec with tree and expansion of n_tokens - 1 nodes in the default tree's topk and depth, ar-pp for 1), "
    "binned by max(tree size before, after) to the nearest grid value (log scale). Samples per point "
    "= what the component's share of --budget-s allows (3 to 25), round-robin over the grid; median, "
    "p10 and p90 over them."
)


def card(opts: ProfileOptions, device: torch.device, target_dir: Path, scenario: Scenario, m: Measurement,
         load_start: tuple[float, ...], wall_s: float) -> dict:  # fmt: skip
    """meta.json: the schema's required keys, then everything that says which machine, stack,
    drafter, grid and command produced the numbers (profiles/README.md)."""
    import transformers

    from runtime.launcher import drafter_kind, merges_lookup

    cpu, load_end = cpu_model(), os.getloadavg()
    sha, dirty = git_revision()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    loads = [f"{x:.2f}" for x in load_start], [f"{x:.2f}" for x in load_end]
    vocab = getattr(getattr(m.drafter, "model", m.drafter), "vocab_ids", None)
    return {
        "device": opts.out.parent.name, "model": opts.out.name, "dtype": opts.dtype, "source": "measured",
        "method": f"{opts.command_line} ; {METHOD}",
        "command": opts.command_line, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "git_sha": sha, "git_dirty": dirty,
        "threads": opts.threads, "torch_device": str(device), "cpu_model": cpu, "gpu_name": gpu,
        "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in load_end]},
        "n_layers": scenario.model.n_layers, "hidden_size": scenario.model.hidden_size,
        "vocab_size": scenario.model.vocab_size, "target": opts.model, "target_dir": str(target_dir),
        "drafter": {"kind": str(drafter_kind(scenario)), "prompt_lookup": merges_lookup(scenario),
                    "draft_model": opts.draft_model, "draft_vocab": None if vocab is None else len(vocab),
                    "topk": m.k, "device": "cpu"},
        "budget_s": opts.budget_s, "wall_s": round(wall_s, 1), "grid": m.axes,
        "notes": (f"Measured on {cpu} ({os.cpu_count()} logical CPUs{', GPU ' + gpu if gpu else ''}), torch device "
                  f"{device}, {opts.threads} torch thread(s), {opts.dtype}. Load average (1/5/15 min) "
                  f"{'/'.join(loads[0])} at the start, {'/'.join(loads[1])} at the end: where other work shares "
                  "the machine, p90 sits well above the median and levels drift between runs. The drafter and "
                  "D0's bookkeeping run on the CPU, as the runtime runs them. " + " ".join(m.notes)).strip(),
    }  # fmt: skip


def write(out: Path, rows: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stage_forward.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
