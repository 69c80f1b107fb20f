#!/bin/bash
# SLURM: one task per node; each task runs torchrun, which starts one rank per GPU and meets the
# other nodes at the first node of the allocation (c10d rendezvous). Submit from the repo root:
#   sbatch launchers/slurm.sh --config ds_configs/amt_gpt2.yaml --data /data/lakh-amt
# Extra arguments go to launchers/train.py (run config overrides). DS_CONFIG picks the engine JSON.
#SBATCH --job-name=amtrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=runs/slurm-%j.out
set -euo pipefail

DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
    launchers/train.py --ds_config "$DS_CONFIG" "$@"
