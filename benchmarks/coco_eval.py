"""COCO bbox evaluation time: pycocotools against faster-coco-eval, side by side in one process, on random ground
truth and detections (jittered copies of the ground truth, some with the wrong class, plus random boxes). Each run
is what ``ddetr eval`` does after inference: load the results, evaluate, accumulate, summarize. Prints the median
seconds of each, the ratio, and the largest difference of their 12 numbers and per-class AP.

    python benchmarks/coco_eval.py                                   # 200 images x 20 detections, 80 classes
    python benchmarks/coco_eval.py --images 500 --detections_per_image 100 --runs 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deformable_detr.config import EVALUATORS  # noqa: E402
from deformable_detr.training.evaluation import evaluate_coco_results, per_class_ap  # noqa: E402


def random_coco(rng: np.random.Generator, images: int, categories: int) -> COCO:
    """Ground truth: 0 to 10 boxes per 640 x 480 image, of all three COCO area ranges, a few crowd boxes."""
    image_list, annotations = [], []
    for image_id in range(1, images + 1):
        image_list.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"})
        for _ in range(int(rng.integers(0, 11))):
            w, h = rng.uniform(4, 320), rng.uniform(4, 240)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": int(rng.random() < 0.02),
                                "category_id": int(rng.integers(1, categories + 1))})
    coco = COCO()
    coco.dataset = {"images": image_list, "annotations": annotations,
                    "categories": [{"id": i, "name": f"class{i}"} for i in range(1, categories + 1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def random_results(rng: np.random.Generator, coco: COCO, per_image: int, categories: int) -> list[dict]:
    """``per_image`` detections per image: a jittered copy of each ground-truth box (a fifth with a random class),
    then random boxes with low scores, as a DETR's top-k holds."""
    results = []
    for image_id in coco.imgs:
        found = []
        for annotation in coco.imgToAnns[image_id][:per_image]:
            x, y, w, h = annotation["bbox"]
            jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
            label = annotation["category_id"] if rng.random() < 0.8 else int(rng.integers(1, categories + 1))
            found.append(([x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]], rng.uniform(0.3, 1), label))
        while len(found) < per_image:
            w, h = rng.uniform(4, 200), rng.uniform(4, 200)
            found.append(([rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h], rng.uniform(0, 0.5),
                          int(rng.integers(1, categories + 1))))
        results += [{"image_id": image_id, "category_id": label, "bbox": [float(v) for v in box],
                     "score": float(score)} for box, score, label in found]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="images")
    parser.add_argument("--detections_per_image", type=int, default=20, help="detections per image")
    parser.add_argument("--categories", type=int, default=80, help="categories")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each evaluator (the median is shown)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    coco = random_coco(rng, args.images, args.categories)
    results = random_results(rng, coco, args.detections_per_image, args.categories)
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    image_ids = sorted(coco.imgs)

    seconds: dict[str, list[float]] = {name: [] for name in EVALUATORS}
    stats, per_class = {}, {}
    for _ in range(args.runs):
        for name in EVALUATORS:  # interleaved, so that a busy moment of the machine hits both
            copies = [dict(r) for r in results]  # loadRes adds keys to the dicts it gets
            start = time.perf_counter()
            coco_eval, _ = evaluate_coco_results(coco, copies, image_ids, name)
            seconds[name].append(time.perf_counter() - start)
            stats[name] = np.asarray(coco_eval.stats[:12], dtype=np.float64)
            per_class[name] = [value for row in per_class_ap(coco_eval.eval, names)
                               for value in (row.AP, row.AP50) if value is not None]
    median = {name: statistics.median(times) for name, times in seconds.items()}
    slow, fast = EVALUATORS
    stats_difference = float(np.abs(stats[slow] - stats[fast]).max())
    class_difference = float(np.abs(np.subtract(per_class[slow], per_class[fast])).max())
    print(f"{args.images} images, {len(coco.dataset['annotations'])} ground-truth boxes, {len(results)} detections, "
          f"{args.categories} categories; median of {args.runs} runs")
    print(f"  {'evaluator':<18} {'seconds':>8}")
    for name in EVALUATORS:
        print(f"  {name:<18} {median[name]:8.3f}")
    print(f"  {slow} / {fast}: {median[slow] / median[fast]:.1f}x")
    print(f"  largest difference: 12 numbers {stats_difference:.1e}, per-class AP and AP50 {class_difference:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "images": args.images, "detections": len(results), "categories": args.categories, "runs": args.runs,
            "median_seconds": median, "ratio": median[slow] / median[fast], "stats": stats[slow].tolist(),
            "max_stats_difference": stats_difference, "max_per_class_difference": class_difference}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
