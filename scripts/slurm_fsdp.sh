#!/usr/bin/env bash
# Flipped-VQA training with the frozen backbone sharded over every GPU of the job (--fsdp).
#   sbatch --nodes 2 scripts/slurm_fsdp.sh            (8 GPUs per node)
# A pre-empted or requeued job continues from checkpoint_last.pth (--resume auto).
#SBATCH --job-name=flipvqa-fsdp
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
set -euo pipefail
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS=${GPUS_PER_NODE:-8}
srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:29500" \
    -m flipvqa train --preset nextqa --fsdp \
    --llama_model_path ./pretrained/llama/ --model "${MODEL:-13B}" \
    --output_dir "${OUTPUT_DIR:-./checkpoint/nextqa-fsdp}" --resume auto
