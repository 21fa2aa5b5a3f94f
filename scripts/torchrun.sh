#!/bin/bash
# One `clipadapt fit` on N GPUs of this machine with torchrun (Lightning detects torchelastic and
# takes the ranks from it; it must not launch processes itself, so devices = nproc_per_node).
#   NPROC=4 scripts/torchrun.sh configs/ast_fewshot.yaml --data.root /data --data.dataset imagenet
# Several nodes: run this on every node with NNODES=M NODE_RANK=i MASTER_ADDR=host0 (trainer.num_nodes = M).
# Your arguments come before the launcher's shape (devices, nodes, strategy), which no config may contradict;
# ACCELERATOR=cpu PRECISION=32-true runs it without GPUs (the test suite does, on the tiny model).
# Effective batch size = data.batch_size x NPROC x NNODES (data.batch_size is per GPU).
set -euo pipefail

config=${1:?usage: scripts/torchrun.sh CONFIG.yaml [clipadapt fit args...]}
shift
nproc=${NPROC:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
nnodes=${NNODES:-1}

torchrun \
    --nproc_per_node "$nproc" \
    --nnodes "$nnodes" \
    --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" \
    --master_port "${MASTER_PORT:-29500}" \
    -m clipadapt.cli fit \
    --config "$config" \
    "$@" \
    --trainer.accelerator "${ACCELERATOR:-gpu}" \
    --trainer.precision "${PRECISION:-bf16-mixed}" \
    --trainer.num_nodes "$nnodes" \
    --trainer.devices "$nproc" \
    --trainer.strategy ddp
