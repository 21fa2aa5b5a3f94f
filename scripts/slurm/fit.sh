#!/bin/bash
# One `clipadapt fit` on M nodes x N GPUs through Lightning's SLURM support.
#   sbatch scripts/slurm/fit.sh configs/ast_fewshot.yaml --data.root /data --data.dataset imagenet --data.num_shots 16
# Lightning's contract: one task per GPU (--ntasks-per-node = --gpus-per-node = trainer.devices) and
# `srun` launching them; Lightning reads the rank and the master address from SLURM's variables, so
# nothing else (no torchrun, no MASTER_ADDR) is needed. trainer.num_nodes must equal --nodes.
# Effective batch size = data.batch_size x devices x nodes (data.batch_size is per GPU).
#SBATCH --job-name=clipadapt
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=SIGUSR1@90
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

config=${1:?usage: sbatch scripts/slurm/fit.sh CONFIG.yaml [clipadapt fit args...]}
shift
nodes=${SLURM_NNODES:-1}
devices=${SLURM_NTASKS_PER_NODE:-1}
run_dir=${RUN_DIR:-runs/slurm/${SLURM_JOB_ID:-local}}

# --signal=SIGUSR1@90: Lightning's SLURMEnvironment saves a checkpoint and requeues the job before the time limit.
# Your arguments come first; the allocation's shape comes last so that no config can contradict it.
srun clipadapt fit \
    --config "$config" \
    --trainer.precision bf16-mixed \
    --trainer.default_root_dir "$run_dir" \
    --data.num_workers "${SLURM_CPUS_PER_TASK:-8}" \
    "$@" \
    --trainer.accelerator gpu \
    --trainer.num_nodes "$nodes" \
    --trainer.devices "$devices" \
    --trainer.strategy ddp
