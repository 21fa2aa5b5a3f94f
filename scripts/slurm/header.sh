#!/bin/bash
# Header of the per-run jobs that `clipadapt sweep --jobs DIR --job-header scripts/slurm/header.sh` writes:
# each job is this header + `srun clipadapt fit ...` for one (dataset, shots, seed). Submit them with
#   for f in DIR/*.sh; do sbatch "$f"; done
# One GPU per run is the papers' setting; for more, raise both counts below and pass
# `--trainer.devices N --trainer.strategy ddp` to `clipadapt sweep` (it forwards them to every run).
#SBATCH --job-name=clipadapt-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
