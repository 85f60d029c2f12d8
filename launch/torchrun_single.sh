#!/usr/bin/env bash
# rltrain under torchrun with one process (multi-process sharding comes with distributed=zero2|zero3).
# Usage: bash launch/torchrun_single.sh [hydra overrides...]
set -euo pipefail
exec torchrun --standalone --nproc_per_node 1 -m rltrain.train "$@"
