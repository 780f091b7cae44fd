#!/usr/bin/env bash
# Two-stage Deformable DETR with iterative bounding-box refinement.
# As the official configs/r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.sh, with `ddetr train` in place of `python -u main.py`: the
# arguments after the script name go to ddetr train (after this recipe's flags, so they win). EXP_DIR sets the output
# folder, DDETR the command (default: ddetr on the PATH).
#   ./configs/r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.sh --coco_path data/coco
#   GPUS_PER_NODE=8 ./tools/run_dist_launch.sh 8 ./configs/r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.sh --coco_path data/coco
#   ./configs/r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.sh --coco_path data/coco --resume CHECKPOINT --eval
set -eu
EXP_DIR=${EXP_DIR:-exps/r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage}
set -x
exec ${DDETR:-ddetr} train --with_box_refine --two_stage --output_dir "$EXP_DIR" "$@"
