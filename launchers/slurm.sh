#!/bin/bash
# SLURM: one task per node; each task runs torchrun, which starts NPROC_PER_NODE ranks (default:
# the GPUs SLURM gave the node; 1 on an allocation without GPUs) and meets the other nodes at the
# first node of the allocation (c10d rendezvous). Submit from the repo root:
#   sbatch launchers/slurm.sh --config ds_configs/amt_gpt2.yaml --data /data/lakh-amt
# Extra arguments go to launchers/train.py (run config overrides). DS_CONFIG picks the engine JSON.
# Command-line options override the #SBATCH lines below, e.g. on CPU-only nodes:
#   NPROC_PER_NODE=4 sbatch --gpus-per-node=0 --cpus-per-task=16 launchers/slurm.sh ...
# (OMP_NUM_THREADS defaults to the task's CPUs / NPROC_PER_NODE.)
#SBATCH --job-name=amtrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
# (the log lands in the submit folder: SLURM does not create folders, and a job whose --output
# folder is missing fails without a word)
set -euo pipefail

DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
# Rendezvous at the first node, by the address SLURM itself uses for it (NodeAddr; the node name
# unless the cluster's slurm.conf gives another).
MASTER_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$MASTER_NODE" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
MASTER_ADDR=${MASTER_ADDR:-$MASTER_NODE}
MASTER_PORT=${MASTER_PORT:-29500}
threads=$(( ${SLURM_CPUS_PER_TASK:-$NPROC_PER_NODE} / NPROC_PER_NODE ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
echo "slurm.sh: job $SLURM_JOB_ID: $SLURM_NNODES node(s) x $NPROC_PER_NODE rank(s), rendezvous at $MASTER_ADDR:$MASTER_PORT ($MASTER_NODE)"

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
    launchers/train.py --ds_config "$DS_CONFIG" "$@"
