#!/usr/bin/env bash
# GPU check, at most 5 minutes on one GPU: per method ViT-B/16 bf16 training and evaluation images/s, MFU and
# peak memory, plain open_clip's forward as the reference line (one JSON); the image tower's evaluation
# compiled vs eager (`compile`, its own process: compiling ViT-B/16 takes about a minute); then RAda EFT's
# chunked frozen features against the tower's own throughput. The timeouts add up to 300 s.
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # writes OUT_DIR/gpu_check.json, compile_check.json, *.log, rada_eft.txt
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia_smi.csv" || true
timeout 160 python benchmarks/gpu_check.py --out "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log" || true
timeout 80 python benchmarks/gpu_check.py --compile default --methods --out "$out/compile_check.json" 2>&1 \
  | tee "$out/compile_check.log" || true
timeout 60 python benchmarks/rada_eft.py --arch ViT-B-16 --device cuda --images 512 --chunk 128 2>&1 \
  | tee "$out/rada_eft.txt"
