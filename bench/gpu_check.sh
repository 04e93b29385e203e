#!/usr/bin/env bash
# GPU check for the runtime (issue 14): on a machine with CUDA, the SmolLM2 lossless test on CUDA
# stages, then `flowspec bench runtime` on loopback in fp32 and bf16 (agreement with `generate` in
# the same precision is a column of the table). CI has no GPU: the tests skip CUDA there.
#   bash bench/gpu_check.sh [OUT_DIR]      (default runs/gpu-check)
set -euo pipefail
out="${1:-runs/gpu-check}"
mkdir -p "$out"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.csv"
FLOWSPEC_TEST_DEVICE=cuda python -m pytest -q tests/runtime/test_smollm2.py 2>&1 | tee "$out/lossless.txt"
for dtype in float32 bfloat16; do
  flowspec bench runtime scenarios/loopback.yaml --set runtime.device=cuda --set "runtime.dtype=$dtype" \
    --policy ar-pp --policy chunk-pp --policy serial --policy flowspec --out "$out/bench-runtime-$dtype.csv"
done
echo "wrote $out/"
