"""`flowspec bench runtime`: real tokens/s per policy next to single-process HF `generate`, one run.

Every policy serves the same requests on the same stage processes, right after `generate` has
produced the reference outputs in this process, so the ratios compare like with like on a shared,
noisy machine. Each row also says whether the policy's tokens equal `generate`'s (they must, at
T = 0), how much of `generate`'s output it reproduced (`agreement`; at half precision the
reference runs in that precision too), and the draft node's median time per bookkeeping step,
drafting call and verification. Caveat, printed with the table: on a 2-core machine at most two
processes compute at once, so a 4-stage pipeline on loopback measures CPU contention as much as
scheduling.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from flowspec import metrics
from flowspec.config import Policy, Scenario
from runtime.launcher import Target, make_drafter, run_policies
from runtime.models import torch_device
from runtime.prompts import requests_for

CAVEAT = ("On 2 cores at most two of the processes (D0 + stages) compute at once: these figures measure "
          "contention as much as policy. Use the simulator, or an emulated testbed, for policy comparisons.")  # fmt: skip


def agreement(outputs: dict[int, list[int]], reference: dict[int, list[int]]) -> float:
    """Share of the reference's tokens a run reproduced before its first difference, over all
    requests: 1.0 at T = 0 in fp32; at half precision, where rounding may tip a near-tie, how far
    the runs stay together.

    >>> agreement({0: [1, 2, 3, 4], 1: [5, 6]}, {0: [1, 2, 9, 4], 1: [5, 6]})  # 2 of 4, then 2 of 2
    0.6666666666666666
    """
    same = 0
    for rid, ref in reference.items():
        got, n = outputs.get(rid, []), 0
        while n < min(len(got), len(ref)) and got[n] == ref[n]:
            n += 1
        same += n
    total = sum(len(r) for r in reference.values())
    return same / total if total else 1.0


def bench_runtime(scenario: Scenario, policies: Sequence[Policy], *, base_dir: Path | None,
                  echo: Callable[[str], None], outputs_dir: Path | None = None) -> pd.DataFrame:  # fmt: skip
    """The table above; with `outputs_dir`, each policy's generations in <outputs_dir>/<policy>/outputs.jsonl."""
    import torch

    from runtime.outputs import write_outputs

    target = Target.load(scenario, base_dir=base_dir, echo=echo)
    scenario = target.scenario
    requests = requests_for(scenario, target.tokenizer, base_dir=base_dir)
    eos = scenario.decoding.eos_token_id
    # The reference runs on the stages' device, in their precision (fp32 is the lossless one).
    dtype, device = scenario.runtime.dtype, torch_device(scenario.runtime.device, "runtime.device")
    echo(f"{len(requests)} request(s) x {scenario.decoding.max_new_tokens} new tokens; HF generate ({dtype}, {device}) first")
    model = target.model.to(device=device, dtype=getattr(torch, dtype))  # in place: nothing else reads it
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    reference: dict[int, list[int]] = {}
    t0 = time.perf_counter()
    for req in requests:
        with torch.inference_mode():
            out = model.generate(torch.tensor([req.prompt], device=device), max_new_tokens=scenario.decoding.max_new_tokens,
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
             "same_as_generate": True, "agreement": 1.0}]  # fmt: skip
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
                     "same_as_generate": result.outputs == reference, "agreement": agreement(result.outputs, reference),
                     **metrics.d0_span_ms(frames["stage_spans"])})  # fmt: skip
        echo(f"  {policy}: {n} tokens in {result.elapsed_s:.1f} s")
    return pd.DataFrame(rows)
