#!/usr/bin/env bash
# Runs COMMAND as GPUS SLURM tasks, one per GPU, GPUS_PER_NODE per node: the arguments and environment variables of
# the official tools/run_dist_slurm.sh. Each task gets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and SLURM_NODELIST,
# from which `ddetr train` finds its rank and the first node's address.
#   GPUS_PER_NODE=8 ./tools/run_dist_slurm.sh <partition> <job name> 16 configs/r50_deformable_detr.sh --coco_path data/coco
# CPUS_PER_TASK (default 4) and SRUN_ARGS (extra srun options) as in the official script; DRY_RUN=1 prints the srun
# command line instead of running it.
set -eu
if [ $# -lt 4 ]; then
    echo "usage: [GPUS_PER_NODE=N] [CPUS_PER_TASK=N] [SRUN_ARGS=...] $0 PARTITION JOB_NAME GPUS COMMAND [ARGS...]" >&2
    exit 2
fi
PARTITION=$1
JOB_NAME=$2
GPUS=$3
shift 3
if [ "$GPUS" -lt 8 ]; then
    GPUS_PER_NODE=${GPUS_PER_NODE:-$GPUS}
else
    GPUS_PER_NODE=${GPUS_PER_NODE:-8}
fi
CPUS_PER_TASK=${CPUS_PER_TASK:-4}
# SRUN_ARGS holds several options, split on spaces as in the official script.
read -r -a EXTRA <<< "${SRUN_ARGS:-}"
COMMAND=(srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS"
         --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1
         ${EXTRA[@]+"${EXTRA[@]}"} "$@")
if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${COMMAND[@]}"
    echo
    exit 0
fi
set -x
exec "${COMMAND[@]}"
