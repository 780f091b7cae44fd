#!/usr/bin/env bash
# Runs COMMAND in GPUS processes: GPUS_PER_NODE on this node, on GPUS / GPUS_PER_NODE nodes in all. The arguments and
# environment variables of the official tools/run_dist_launch.sh, on torchrun: each process gets RANK, WORLD_SIZE,
# LOCAL_RANK, MASTER_ADDR and MASTER_PORT, which `ddetr train` reads. COMMAND is usually a configs/*.sh script.
#   GPUS_PER_NODE=8 ./tools/run_dist_launch.sh 8 ./configs/r50_deformable_detr.sh --coco_path data/coco
#   two nodes, on each: MASTER_ADDR=<node 0> NODE_RANK=<0 or 1> GPUS_PER_NODE=8 \
#       ./tools/run_dist_launch.sh 16 ./configs/r50_deformable_detr.sh --coco_path data/coco
# TORCHRUN sets the launcher (default: torchrun on the PATH, installed with torch).
set -eu
if [ $# -lt 2 ]; then
    echo "usage: [GPUS_PER_NODE=N] [MASTER_ADDR=host] [MASTER_PORT=port] [NODE_RANK=r] $0 GPUS COMMAND [ARGS...]" >&2
    exit 2
fi
GPUS=$1
shift
if [ "$GPUS" -lt 8 ]; then
    GPUS_PER_NODE=${GPUS_PER_NODE:-$GPUS}
else
    GPUS_PER_NODE=${GPUS_PER_NODE:-8}
fi
if [ $((GPUS % GPUS_PER_NODE)) -ne 0 ]; then
    echo "$0: GPUS ($GPUS) must be a multiple of GPUS_PER_NODE ($GPUS_PER_NODE)" >&2
    exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NODE_RANK=${NODE_RANK:-0}
NNODES=$((GPUS / GPUS_PER_NODE))
set -x
# --no-python: COMMAND is a program (the config script), started once per process with the rank variables set.
exec "${TORCHRUN:-torchrun}" --nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" --nproc_per_node "$GPUS_PER_NODE" --no-python "$@"
