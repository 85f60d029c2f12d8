#!/usr/bin/env bash
# rltrain on the GPUs (or CPU cores) of one machine under torchrun.
#   NPROC=8 bash launch/torchrun.sh distributed=zero2 experiment=qwen_gsm8k
# NPROC defaults to the visible GPUs (1 without any). On CPU, gloo carries the collectives; on GPUs, NCCL.
# Rollouts split by prompt over the ranks, the update by group; rank 0 writes the run directory (set hydra.run.dir
# to name it; resume=auto continues it).
set -euo pipefail
gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
nproc="${NPROC:-$(( gpus > 0 ? gpus : 1 ))}"
exec torchrun --standalone --nproc_per_node "$nproc" -m rltrain.train "$@"
