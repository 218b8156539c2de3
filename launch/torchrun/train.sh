#!/bin/bash
# DDP with torchrun (torch.distributed.run): torchrun starts NPROC_PER_NODE processes on each node and sets
# RANK/LOCAL_RANK/WORLD_SIZE; Lightning detects TorchElasticEnvironment and checks that WORLD_SIZE equals
# --trainer.devices x --trainer.num_nodes (passed below from the same variables).
#
# One node, 4 GPUs:
#   NPROC_PER_NODE=4 bash launch/torchrun/train.sh
# Two nodes, 8 GPUs each: run the same line on both nodes (any node can host the rendezvous):
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0.example:29400 RDZV_ID=imdb-1 bash launch/torchrun/train.sh
# Other configs and options: CONFIG="configs/imdb.yaml configs/strategies/fsdp.yaml" ... train.sh --trainer.max_epochs 3
# Print the command only: DRY_RUN=1 bash launch/torchrun/train.sh
#
# Restarts: with MAX_RESTARTS > 0 torchrun restarts every worker after a failure; the command resumes from
# checkpoints/last.ckpt in RUN_DIR (`--ckpt_path last`), refreshed every CKPT_EVERY steps and at each epoch end.
# Rerunning the same command after a crash resumes the same way.
# A CPU-only smoke test: NPROC_PER_NODE=2 ... train.sh --trainer.accelerator cpu (DDP over gloo).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."          # the repository root: configs and data paths are relative to it

CONFIG=${CONFIG:-configs/imdb.yaml}                 # space-separated; later files override earlier ones
NNODES=${NNODES:-1}
if [[ -z ${NPROC_PER_NODE:-} ]]; then               # default: one process per visible GPU, or one without GPUs
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    (( NPROC_PER_NODE >= 1 )) || NPROC_PER_NODE=1
fi
RDZV_ENDPOINT=${RDZV_ENDPOINT:-localhost:29400}     # host:port of one node, reachable from all of them
RDZV_ID=${RDZV_ID:-taskhead}                        # same on every node of one job, new for the next job
MAX_RESTARTS=${MAX_RESTARTS:-0}
CKPT_EVERY=${CKPT_EVERY:-500}                       # optimiser steps between last.ckpt refreshes: the most a restart loses
RUN_DIR=${RUN_DIR:-runs/torchrun-$RDZV_ID}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export TOKENIZERS_PARALLELISM=false
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# export NCCL_SOCKET_IFNAME=eth0                    # the inter-node interface, if NCCL picks the wrong one

configs=()
for c in $CONFIG; do configs+=(--config "$c"); done

cmd=(
    torchrun
    --nnodes "$NNODES"
    --nproc_per_node "$NPROC_PER_NODE"
    --rdzv_backend c10d
    --rdzv_endpoint "$RDZV_ENDPOINT"
    --rdzv_id "$RDZV_ID"
    --max_restarts "$MAX_RESTARTS"
    -m taskhead.cli fit "${configs[@]}"
    --trainer.num_nodes "$NNODES"
    --trainer.devices "$NPROC_PER_NODE"
    --trainer.strategy ddp
    --trainer.default_root_dir "$RUN_DIR"
    --checkpoint.dirpath "$RUN_DIR/checkpoints"
    --last_checkpoint.every_n_steps "$CKPT_EVERY"
    --ckpt_path last                                # first run: nothing there yet, training starts fresh
    "$@"
)

if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
exec "${cmd[@]}"
