"""`flowspec bench runtime`: real tokens/s per policy next to single-process HF `generate`, one run.

Every policy serves the same requests on the same stage processes, right after `generate` has
produced the reference outputs in this process, so the ratios compare like with like on a shared,
noisy machine. Each row also says whether the policy's tokens equal `generate`'s (they must, at
T = 0), and the draft node's median time per bookkeeping step, drafting call and verification. Caveat, printed with the table: on a 2-core machine at most two processes compute at once,
so a 4-stage pipeline on loopback measures CPU contention as much as scheduling.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from flowspec import metrics
from flowspec.config import Policy, Scenario
from runtime.launcher import Target, make_drafter, run_policies
from runtime.prompts import requests_for

CAVEAT = ("On 2 cores at most two of the processes (D0 + stages) compute at once: these figures measure "
          "contention as much as policy. Use the simulator, or an emulated testbed, for policy comparisons.")  # fmt: skip


def bench_runtime(scenario: Scenario, policies: Sequence[Policy], *, base_dir: Path | None,
                  echo: Callable[[str], None], outputs_dir: Path | None = None) -> pd.DataFrame:  # fmt: skip
    """The table above; with `outputs_dir`, each policy's generations in <outputs_dir>/<policy>/outputs.jsonl."""
    import torch

    from runtime.outputs import write_outputs

    target = Target.load(scenario, base_dir=base_dir, echo=echo)
    scenario = target.scenario
    requests = requests_for(scenario, target.tokenizer, base_dir=base_dir)
    eos = scenario.decoding.eos_token_id
    echo(f"{len(requests)} request(s) x {scenario.decoding.max_new_tokens} new tokens; HF generate first")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    reference: dict[int, list[int]] = {}
    t0 = time.perf_counter()
    for req in requests:
        with torch.inference_mode():
            out = target.model.generate(torch.tensor([req.prompt]), max_new_tokens=scenario.decoding.max_new_tokens,
                                        do_sample=False, eos_token_id=eos, pad_token_id=eos or 0)  # fmt: skip
        tokens = out[0, len(req.prompt) :].tolist()
        if eos is not None and eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]
        reference[req.request_id] = tokens
    generate_s = time.perf_counter() - t0
    torch.set_num_threads(threads)
    n_ref = sum(len(t) for t in reference.values())
    rows = [{"policy": "hf-generate (1 process, 2 threads)", "tokens": n_ref, "wall_s": generate_s,
             "tokens_per_s": n_ref / generate_s, "vs_generate": 1.0, "accepted_per_step": float("nan"),
             "same_as_generate": True}]  # fmt: skip
    echo(f"  hf-generate: {n_ref} tokens in {generate_s:.1f} s")
    for policy, result in run_policies(scenario, target, policies, requests, echo=echo,
                                       drafter=lambda sc: make_drafter(sc, target, base_dir=base_dir)):  # fmt: skip
        n = sum(len(v) for v in result.outputs.values())
        frames = result.frames()
        summary = metrics.summary(frames)
        if outputs_dir is not None:
            (outputs_dir / str(policy)).mkdir(parents=True, exist_ok=True)
            write_outputs(outputs_dir / str(policy) / "outputs.jsonl", requests, result, target.tokenizer)
        rows.append({"policy": str(policy), "tokens": n, "wall_s": result.elapsed_s, "tokens_per_s": n / result.elapsed_s,
                     "vs_generate": (n / result.elapsed_s) / (n_ref / generate_s),
                     "accepted_per_step": float(summary["accepted_per_step"].iloc[0]),
                     "same_as_generate": result.outputs == reference,
                     **metrics.d0_span_ms(frames["stage_spans"])})  # fmt: skip
        echo(f"  {policy}: {n} tokens in {result.elapsed_s:.1f} s")
    return pd.DataFrame(rows)
