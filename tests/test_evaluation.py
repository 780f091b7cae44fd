"""The COCO evaluator against pycocotools on random ground truth and detections, split over two 'processes'."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from deformable_detr.training.evaluation import CocoEvaluator


def _random_coco(rng: np.random.Generator, num_images: int = 12, categories=(1, 3, 7)) -> COCO:
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width, height = int(rng.integers(200, 400)), int(rng.integers(150, 300))
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id}.jpg"})
        for _ in range(int(rng.integers(0, 6))):  # some images have no object
            w, h = rng.uniform(5, width / 2), rng.uniform(5, height / 2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": int(rng.random() < 0.05),
                                "category_id": int(rng.choice(categories))})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": c, "name": f"c{c}"} for c in categories]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _random_detections(rng: np.random.Generator, coco: COCO) -> dict[int, dict[str, torch.Tensor]]:
    """Jittered copies of the ground truth (some with the wrong class) plus random boxes."""
    detections = {}
    for image_id, image in coco.imgs.items():
        boxes, scores, labels = [], [], []
        for annotation in coco.imgToAnns[image_id]:
            x, y, w, h = annotation["bbox"]
            jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
            boxes.append([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]])
            scores.append(rng.uniform(0.3, 1.0))
            labels.append(annotation["category_id"] if rng.random() < 0.8 else 7)
        for _ in range(int(rng.integers(0, 8))):
            x0, y0 = rng.uniform(0, image["width"] * 0.8), rng.uniform(0, image["height"] * 0.8)
            boxes.append([x0, y0, x0 + rng.uniform(3, 80), y0 + rng.uniform(3, 80)])
            scores.append(rng.uniform(0, 0.6))
            labels.append(int(rng.choice([1, 3, 7])))
        detections[image_id] = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                "scores": torch.tensor(scores, dtype=torch.float32),
                                "labels": torch.tensor(labels, dtype=torch.int64)}
    return detections


def test_evaluator_equals_pycocotools():
    rng = np.random.default_rng(0)
    coco = _random_coco(rng)
    detections = _random_detections(rng, coco)
    # Our evaluator, fed in two halves as two processes would be after gathering.
    first, second = CocoEvaluator(coco), CocoEvaluator(coco)
    ids = sorted(detections)
    first.update({i: detections[i] for i in ids[::2]})
    second.update({i: detections[i] for i in ids[1::2]})
    first.results += second.results
    first.image_ids += second.image_ids
    stats = first.summarize()

    # pycocotools directly, on the same detections converted by hand.
    results = []
    for image_id, d in detections.items():
        for (x0, y0, x1, y1), score, label in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco, coco.loadRes(results), iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    np.testing.assert_array_equal(stats, coco_eval.stats)
    assert len(stats) == 12 and 0.2 < stats[1] < 1.0  # AP50: the jittered copies are mostly found
    assert "Average Precision" in first.summary


def test_evaluator_with_no_detection_scores_zero():
    coco = _random_coco(np.random.default_rng(1))
    evaluator = CocoEvaluator(coco)
    evaluator.update({i: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0).long()}
                      for i in coco.imgs})
    stats = evaluator.summarize()
    assert stats[0] == 0.0 and stats[1] == 0.0
