#!/usr/bin/env bash
# GPU check, at most 5 minutes on one GPU: per method ViT-B/16 bf16 training and evaluation images/s, MFU and
# peak memory, plain open_clip's forward as the reference line (one JSON); the image tower's evaluation
# compiled vs eager (`compile`, its own process: compiling ViT-B/16 takes about a minute); then RAda EFT's
# chunked frozen features against the tower's own throughput; the text side's peak memory at 1000 classes, batch 32,
# bf16, with and without `text_chunk` (CoOp, CLIP-AST). The timeouts add up to 300 s.
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # writes OUT_DIR/gpu_check.json, compile_check.json, *.log, rada_eft.txt, text_memory.txt
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia_smi.csv" || true
timeout 145 python benchmarks/gpu_check.py --out "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log" || true
timeout 80 python benchmarks/gpu_check.py --compile default --methods --out "$out/compile_check.json" 2>&1 \
  | tee "$out/compile_check.log" || true
timeout 45 python benchmarks/rada_eft.py --arch ViT-B-16 --device cuda --images 512 --chunk 128 2>&1 \
  | tee "$out/rada_eft.txt" || true
timeout 30 python benchmarks/text_memory.py --arch ViT-B-16 --device cuda --classes 1000 --batch 32 --precision bf16 \
  --chunk 200 2>&1 | tee "$out/text_memory.txt"
