#!/usr/bin/env bash
# Single-scale Deformable DETR on a dilated layer4 (DC5).
# As the official configs/r50_deformable_detr_single_scale_dc5.sh, with `ddetr train` in place of `python -u main.py`: the
# arguments after the script name go to ddetr train (after this recipe's flags, so they win). EXP_DIR sets the output
# folder, DDETR the command (default: ddetr on the PATH).
#   ./configs/r50_deformable_detr_single_scale_dc5.sh --coco_path data/coco
#   GPUS_PER_NODE=8 ./tools/run_dist_launch.sh 8 ./configs/r50_deformable_detr_single_scale_dc5.sh --coco_path data/coco
#   ./configs/r50_deformable_detr_single_scale_dc5.sh --coco_path data/coco --resume CHECKPOINT --eval
set -eu
EXP_DIR=${EXP_DIR:-exps/r50_deformable_detr_single_scale_dc5}
set -x
exec ${DDETR:-ddetr} train --num_feature_levels 1 --dilation --output_dir "$EXP_DIR" "$@"
