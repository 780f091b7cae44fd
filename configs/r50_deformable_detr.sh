#!/usr/bin/env bash
# Deformable DETR, multi-scale (4 feature levels).
# As the official configs/r50_deformable_detr.sh, with `ddetr train` in place of `python -u main.py`: the
# arguments after the script name go to ddetr train (after this recipe's flags, so they win). EXP_DIR sets the output
# folder, DDETR the command (default: ddetr on the PATH).
#   ./configs/r50_deformable_detr.sh --coco_path data/coco
#   GPUS_PER_NODE=8 ./tools/run_dist_launch.sh 8 ./configs/r50_deformable_detr.sh --coco_path data/coco
#   ./configs/r50_deformable_detr.sh --coco_path data/coco --resume CHECKPOINT --eval
set -eu
EXP_DIR=${EXP_DIR:-exps/r50_deformable_detr}
set -x
exec ${DDETR:-ddetr} train --output_dir "$EXP_DIR" "$@"
