"""Estimate a Jetson AGX Orin 64GB / Llama-2-7B fp16 profile with a per-operator roofline.

No such device is available to the project, so this profile is ESTIMATED from public specs and
written in the same schema as a measured one (`profiles/README.md`), so the simulator can run the
paper's edge scenario. Every input is a named constant below with its source; rerunning the script
reproduces the CSV exactly.

Model, per operator o (one GEMM, the attention core, or an elementwise pass):
    t_o = max(bytes_o / (BW_PEAK * BW_FRAC), flops_o / (FP16_PEAK * COMPUTE_FRAC)) + KERNEL_MS
A component's latency is the sum over its operators. bytes_o counts fp16 weights read once, the
KV cache read, and activations in and out; flops_o counts 2 per multiply-add.

Usage:
    python bench/estimate_roofline.py --out profiles/jetson-orin-agx-64gb/llama-2-7b-fp16
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import sys

# --- device: NVIDIA Jetson AGX Orin 64GB (Jetson AGX Orin Series Technical Brief v1.2; module data sheet)
BW_PEAK = 204.8e9          # B/s: 256-bit LPDDR5 at 6400 MT/s
BW_FRAC = 0.70             # achievable share of peak for GPU streaming reads (assumption, see METHOD)
FP16_PEAK = 42.5e12        # FLOP/s dense fp16 tensor: 170 sparse INT8 TOPS / 2 (sparsity) / 2 (fp16 vs int8)
COMPUTE_FRAC = 0.50        # achievable share for skinny GEMMs (n <= 128 rows) (assumption)
KERNEL_MS = 0.005          # per-kernel launch + sync overhead, eager PyTorch/CUDA on Tegra (assumption)

# --- model: Llama-2-7B (Touvron et al. 2023, arXiv:2307.09288; HF config of meta-llama/Llama-2-7b-hf)
N_LAYERS, H, I, N_HEADS, VOCAB = 32, 4096, 11008, 32, 32000
BYTES = 2                  # fp16

N_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128]
LAYER_KV = [0, 128, 512, 1024, 2048]
DRAFT_KV = [0, 512, 2048]
COLUMNS = ["component", "n_tokens", "kv_len", "dtype", "latency_ms_median",
           "latency_ms_p10", "latency_ms_p90", "n_samples"]


def op_ms(nbytes: float, flops: float) -> float:
    """Roofline time of one kernel in ms: bandwidth- or compute-bound, plus launch overhead."""
    return 1e3 * max(nbytes / (BW_PEAK * BW_FRAC), flops / (FP16_PEAK * COMPUTE_FRAC)) + KERNEL_MS


def gemm_ms(n: int, d_in: int, d_out: int) -> float:
    """[n, d_in] x [d_in, d_out]: weights dominate bytes at small n, which is why small trees are cheap."""
    return op_ms(BYTES * (d_in * d_out + n * d_in + n * d_out), 2.0 * n * d_in * d_out)


def elementwise_ms(n: int, width: int, passes: int = 2) -> float:
    """Norms, RoPE, SiLU*mul, residual adds: read and write `width` values per row."""
    return op_ms(BYTES * passes * n * width, 0.0)


def attention_ms(n: int, kv: int) -> float:
    """n new queries over kv cached + n new keys (MHA, 32 heads of 128): read K and V, QK^T and PV."""
    ctx = kv + n
    nbytes = BYTES * (2 * ctx * H + 2 * n * H)          # K,V read; Q read, output written
    flops = 2.0 * 2 * n * ctx * H                        # QK^T and PV
    return op_ms(nbytes, flops) + op_ms(BYTES * 2 * n * H, 0.0)  # + KV append (write new K,V)


def decoder_layer_ms(n: int, kv: int) -> float:
    qkvo = 4 * gemm_ms(n, H, H)
    mlp = 2 * gemm_ms(n, H, I) + gemm_ms(n, I, H)
    elem = 2 * elementwise_ms(n, H) + elementwise_ms(n, 2 * H) + elementwise_ms(n, 3 * I, 1) + 2 * elementwise_ms(n, H)
    return qkvo + attention_ms(n, kv) + mlp + elem        # (2 RMSNorms, RoPE on q,k, SiLU*mul, 2 residuals)


def embed_ms(n: int) -> float:
    return op_ms(BYTES * 2 * n * H, 0.0)                  # gather n rows, write them


def head_ms(n: int) -> float:
    return elementwise_ms(n, H) + gemm_ms(n, H, VOCAB)    # final RMSNorm + LM head (logits for n rows)


def draft_ms(n: int, kv: int) -> float:
    """EAGLE-1 draft head (Li et al. 2024, arXiv:2401.15077): embed the sampled token, fc([emb; f]) 2H->H,
    one Llama-7B-shaped decoder layer with its own kv cache, then the target's LM head over n rows."""
    return embed_ms(n) + gemm_ms(n, 2 * H, H) + decoder_layer_ms(n, kv) + head_ms(n)


def rows() -> list[dict]:
    out = []

    def add(component, n, kv, ms):
        # An estimate has no spread: p10 = p90 = median, n_samples = 0 marks "not sampled".
        v = round(ms, 4)
        out.append({"component": component, "n_tokens": n, "kv_len": kv, "dtype": "float16",
                    "latency_ms_median": v, "latency_ms_p10": v, "latency_ms_p90": v, "n_samples": 0})
    for kv in LAYER_KV:
        for n in N_TOKENS:
            add("layer", n, kv, decoder_layer_ms(n, kv))
    for n in N_TOKENS:
        add("embed", n, 0, embed_ms(n))
    for n in N_TOKENS:
        add("head", n, 0, head_ms(n))
    for kv in DRAFT_KV:
        for n in N_TOKENS:
            add("draft", n, kv, draft_ms(n, kv))
    return out


METHOD = (
    "python bench/estimate_roofline.py ; per-operator roofline t_op = max(bytes/(BW*f_bw), flops/(P*f_c)) "
    "+ k_ms, summed over the operators of each component. BW = 204.8 GB/s (256-bit LPDDR5-6400, "
    "Jetson AGX Orin Series Technical Brief v1.2 and Jetson AGX Orin 64GB module data sheet); f_bw = 0.70: "
    "unified LPDDR5 shared with the CPU and display engines typically sustains 65-80 % of peak in streaming "
    "reads, and weight-streaming LLM decode on Orin-class boards reaches roughly that share; 0.70 is the "
    "middle-low end so decode is not optimistic. P = 42.5 TFLOPS dense fp16 tensor (brief: 64 third-gen tensor "
    "cores, 170 sparse INT8 TOPS at 1.3 GHz; dense = half, fp16 = half of int8); f_c = 0.50 for GEMMs with "
    "<= 128 rows. k_ms = 0.005 ms per kernel (launch + sync on Tegra, eager). Llama-2-7B (arXiv:2307.09288): "
    "32 layers, hidden 4096, intermediate 11008, 32 heads (MHA, head_dim 128), vocab 32000, fp16. "
    "layer = q,k,v,o GEMMs (H x H) + gate, up (H x I) + down (I x H) + attention reading kv_len+n cached K/V "
    "+ norms/RoPE/SiLU/residual passes; embed = row gather; head = final RMSNorm + LM head GEMM (H x V) over "
    "n rows; draft = EAGLE-1 (arXiv:2401.15077): embed + fc (2H -> H) + one decoder layer of the target's shape "
    "with kv_len draft context + LM head."
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="profile folder to write")
    args = p.parse_args(argv)
    data = rows()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "stage_forward.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader(); w.writerows(data)
    meta = {
        "device": "jetson-orin-agx-64gb", "model": "llama-2-7b-fp16", "dtype": "float16",
        "source": "estimated", "method": METHOD,
        "date": dt.date.today().isoformat(), "git_sha": None,
        "n_layers": N_LAYERS, "hidden_size": H, "vocab_size": VOCAB,
        "constants": {"bw_peak_Bps": BW_PEAK, "bw_frac": BW_FRAC, "fp16_peak_flops": FP16_PEAK,
                      "compute_frac": COMPUTE_FRAC, "kernel_ms": KERNEL_MS, "intermediate_size": I,
                      "n_heads": N_HEADS},
        "notes": ("ESTIMATE, not a measurement. p10 = p90 = median and n_samples = 0 because nothing was "
                  "sampled. With these constants the ridge point is about 148 rows, so every grid point up to "
                  "n=128 is bandwidth-bound and the layer cost grows only through activation and KV bytes: "
                  "real kernels typically add 10-30 % at n >= 32 that a roofline misses. Costs scale as 1/f_bw; "
                  "rerun with other constants to test sensitivity. A 32-layer fp16 decode step comes to about "
                  "32*layer(1) + head(1) ms, i.e. ~11 tokens/s, which is the order reported for unquantised "
                  "7B models on this board."),
    }
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2); f.write("\n")
    for comp in ("layer", "head", "draft"):
        pts = [r for r in data if r["component"] == comp and r["kv_len"] in (0, 512)]
        print(comp, " ".join(f"n={r['n_tokens']}/kv={r['kv_len']}:{r['latency_ms_median']}" for r in pts))
    print(f"wrote {len(data)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
