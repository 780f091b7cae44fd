"""COCO bbox evaluation of post-processed detections with pycocotools, gathered across processes."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from deformable_detr.training.distributed import all_gather_objects

STAT_NAMES = (
    "AP@[.50:.95] all", "AP@.50 all", "AP@.75 all", "AP small", "AP medium", "AP large",
    "AR@1", "AR@10", "AR@100", "AR@100 small", "AR@100 medium", "AR@100 large",
)


class CocoEvaluator:
    """Collects detections per image, then computes the 12 standard COCO bbox numbers.

    Detections come as the post-processor gives them: per image ``scores`` (k,), ``labels`` (k,) (the COCO
    category ids) and ``boxes`` (k, 4) xyxy in pixels of the original image.
    """

    def __init__(self, coco_gt: COCO) -> None:
        self.coco_gt = copy.deepcopy(coco_gt)
        self.results: list[dict] = []
        self.image_ids: list[int] = []
        self.stats: np.ndarray | None = None
        self.summary = ""

    def update(self, predictions: dict[int, dict[str, torch.Tensor]]) -> None:
        """predictions: image_id -> post-processed detections of that image."""
        for image_id, prediction in predictions.items():
            self.image_ids.append(int(image_id))
            boxes = prediction["boxes"].detach().float().cpu()
            # xyxy -> COCO xywh
            boxes = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
            scores = prediction["scores"].detach().float().cpu().tolist()
            labels = prediction["labels"].detach().cpu().tolist()
            self.results += [{"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": score}
                             for box, score, label in zip(boxes, scores, labels)]

    def synchronize_between_processes(self) -> None:
        """Gathers every process's detections into each process (the evaluation itself runs on the main one)."""
        gathered = all_gather_objects((self.image_ids, self.results))
        self.image_ids = sorted({i for ids, _ in gathered for i in ids})
        # A padded distributed sampler may feed an image to two processes: keep one copy of its detections.
        seen: set[int] = set()
        results = []
        for ids, rank_results in gathered:
            duplicate = set(ids) & seen
            results += [r for r in rank_results if r["image_id"] not in duplicate]
            seen |= set(ids)
        self.results = results

    def summarize(self) -> np.ndarray:
        """Runs COCOeval (bbox) over the collected images; returns and keeps the 12 stats."""
        coco_eval, self.summary = evaluate_coco_results(self.coco_gt, self.results, self.image_ids)
        self.stats = coco_eval.stats.copy()
        return self.stats


def evaluate_coco_results(coco_gt: COCO, results: list[dict], image_ids: list[int]) -> tuple[COCOeval, str]:
    """pycocotools' bbox evaluation of ``results`` (COCO result dicts) on ``image_ids``; returns the evaluator
    (``.stats`` holds the 12 numbers) and the summary pycocotools prints."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        coco_dt = coco_gt.loadRes(results) if results else COCO()
        if not results:
            # pycocotools cannot load an empty result list; an empty detection set scores 0 (or -1 without GT).
            coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                               "annotations": []}
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = sorted(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval, buffer.getvalue().split("Accumulating evaluation results...")[-1].split("DONE", 1)[-1].strip()


def format_stats(stats: np.ndarray) -> str:
    """The 12 COCO numbers as a two-column table."""
    return "\n".join(f"  {name:<16} {value:6.3f}" for name, value in zip(STAT_NAMES, stats))
