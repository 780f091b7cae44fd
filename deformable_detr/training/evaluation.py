"""COCO bbox evaluation of post-processed detections: pycocotools' COCOeval (or faster-coco-eval's, the same numbers),
run once, on the main process, over the detections of every process; per-class AP and the official ``eval.pth``.

The precision array COCOeval accumulates is indexed ``[T, R, K, A, M]``: IoU thresholds (.50:.05:.95), recall
thresholds (0:.01:1), categories (sorted ids), area ranges (all, small, medium, large), maxDets (1, 10, 100); -1 where a
category has no ground truth.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

from deformable_detr.config import EVALUATORS
from deformable_detr.training.distributed import get_rank, get_world_size, is_dist

STAT_NAMES = (
    "AP@[.50:.95] all", "AP@.50 all", "AP@.75 all", "AP small", "AP medium", "AP large",
    "AR@1", "AR@10", "AR@100", "AR@100 small", "AR@100 medium", "AR@100 large",
)
# The official eval.pth: COCOeval.eval as accumulate() leaves it (faster-coco-eval adds keys of its own).
_EVAL_KEYS = ("params", "counts", "date", "precision", "recall", "scores")
_PARAM_NAMES = ("iouType", "imgIds", "catIds", "iouThrs", "recThrs", "maxDets", "areaRng", "areaRngLbl", "useCats")


def require_evaluator(name: str) -> None:
    """Raises an error that says what to do when evaluator ``name`` is unknown or its package is not installed:
    called before any work, not after the first training epoch."""
    if name not in EVALUATORS:
        raise ValueError(f"--evaluator {name!r}: expected one of {', '.join(EVALUATORS)}")
    if name == "faster-coco-eval":
        try:
            importlib.import_module("faster_coco_eval")
        except ImportError as error:
            raise ImportError("--evaluator faster-coco-eval needs the faster-coco-eval package: pip install "
                              "faster-coco-eval (or pip install 'deformable-detr[faster-eval]')") from error


@dataclass(frozen=True)
class ClassAP:
    """AP@[.50:.95] and AP@.50 of one category (area all, maxDets 100); None: no ground truth in the evaluated
    images (pycocotools' -1)."""

    id: int
    name: str
    AP: float | None
    AP50: float | None


def _mean_valid(values: np.ndarray) -> float | None:
    # pycocotools' summarize: the mean over the entries that are not -1, or -1 when there is none.
    valid = values[values > -1]
    return float(np.mean(valid)) if len(valid) else None


def per_class_ap(coco_eval_result: dict[str, Any], names: dict[int, str]) -> list[ClassAP]:
    """Per-category AP@[.50:.95] and AP@.50 from COCOeval's accumulated ``eval`` dict, averaged over recall
    thresholds (and IoU thresholds) exactly as pycocotools' ``summarize`` averages all categories together, so each
    equals ``stats[0]``/``stats[1]`` of a COCOeval run with ``params.catIds = [that id]``. Sorted by category id."""
    params = coco_eval_result["params"]
    precision = coco_eval_result["precision"]  # (T, R, K, A, M)
    area, max_dets = list(params.areaRngLbl).index("all"), list(params.maxDets).index(100)
    iou50 = np.where(params.iouThrs == 0.5)[0]
    rows = []
    for k, cat_id in enumerate(params.catIds):
        rows.append(ClassAP(int(cat_id), names.get(int(cat_id), str(cat_id)),
                            _mean_valid(precision[:, :, k, area, max_dets]),
                            _mean_valid(precision[iou50][:, :, k, area, max_dets])))
    return sorted(rows, key=lambda row: row.id)


def format_per_class(rows: list[ClassAP]) -> str:
    """The per-class table: id, name, AP, AP50 ('-' for a category without ground truth)."""
    width = max([len("category"), *(len(row.name) for row in rows)])

    def number(value: float | None) -> str:
        return f"{value:6.3f}" if value is not None else f"{'-':>6}"

    lines = [f"  {'id':>4}  {'category':<{width}}  {'AP':>6}  {'AP50':>6}"]
    lines += [f"  {row.id:>4}  {row.name:<{width}}  {number(row.AP)}  {number(row.AP50)}" for row in rows]
    return "\n".join(lines)


def format_stats(stats: np.ndarray | list[float]) -> str:
    """The 12 COCO numbers as a two-column table."""
    return "\n".join(f"  {name:<16} {value:6.3f}" for name, value in zip(STAT_NAMES, stats))


def evaluate_coco_results(coco_gt: COCO, results: list[dict], image_ids: list[int],
                          evaluator: str = "pycocotools") -> tuple[Any, str]:
    """COCO bbox evaluation of ``results`` (COCO result dicts) on ``image_ids`` with pycocotools' COCOeval or
    faster-coco-eval's; returns the evaluator after evaluate/accumulate/summarize (``.stats``: the 12 numbers,
    ``.eval``: the accumulated arrays) and the summary lines it prints."""
    require_evaluator(evaluator)
    lines: list[str] = []
    if evaluator == "faster-coco-eval":
        import faster_coco_eval

        def keep(*args: Any, **_: Any) -> None:
            lines.append(" ".join(map(str, args)))

        # Its own COCO class, from our copy of the ground truth (it reads the dicts as they are).
        truth = faster_coco_eval.COCO(coco_gt.dataset, print_function=keep)
        coco_eval = faster_coco_eval.COCOeval_faster(truth, truth.loadRes(results), iouType="bbox",
                                                     print_function=keep)
        coco_eval.params.imgIds = sorted(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    else:
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
        lines = buffer.getvalue().splitlines()
    # pycocotools' 12 lines (faster-coco-eval prints two more: AR at IoU .50 and .75).
    return coco_eval, "\n".join([line for line in lines if line.lstrip().startswith("Average ")][:12])


def official_eval_dict(coco_eval: Any) -> dict[str, Any]:
    """COCOeval's accumulated ``eval`` as the official code saves it to ``eval.pth`` (params, counts, date,
    precision, recall, scores), with pycocotools' ``Params`` whichever evaluator ran, so that the file reads the
    same either way."""
    params = Params(iouType="bbox")
    source = coco_eval.eval["params"]
    for name in _PARAM_NAMES:
        value = getattr(source, name)
        setattr(params, name, [int(v) for v in value] if name in ("imgIds", "catIds") else copy.deepcopy(value))
    return {"params": params, **{key: coco_eval.eval[key] for key in _EVAL_KEYS[1:]}}


def _gather_to_main(data: Any) -> list[Any] | None:
    """Every process's ``data``, in rank order, on the main process; None on the others."""
    if not is_dist():
        return [data]
    gathered: list[Any] | None = [None] * get_world_size() if get_rank() == 0 else None
    dist.gather_object(data, gathered, dst=0)
    return gathered


def _broadcast_from_main(data: Any) -> Any:
    """The main process's ``data`` on every process."""
    if not is_dist():
        return data
    box = [data]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class CocoEvaluator:
    """Collects detections per image, then computes the 12 standard COCO bbox numbers and per-class AP.

    Detections come as the post-processor gives them: per image ``scores`` (k,), ``labels`` (k,) (the COCO
    category ids) and ``boxes`` (k, 4) xyxy in pixels of the original image. In a distributed run the detections
    go to the main process, which alone runs COCOeval; the others receive its numbers (``stats``, ``per_class``,
    ``summary``), so every process logs the same. ``coco_eval`` (the COCOeval object) exists on the main process.
    """

    def __init__(self, coco_gt: COCO, evaluator: str = "pycocotools") -> None:
        require_evaluator(evaluator)
        self.coco_gt = copy.deepcopy(coco_gt)
        self.evaluator = evaluator
        self.results: list[dict] = []
        self.image_ids: list[int] = []
        self.stats: np.ndarray | None = None
        self.per_class: list[ClassAP] = []
        self.summary = ""
        self.coco_eval: Any = None
        self.num_images = self.num_detections = 0

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
        """Gathers every process's detections on the main process (the others are left with none: they take the
        numbers from the main process in :meth:`summarize`)."""
        gathered = _gather_to_main((self.image_ids, self.results))
        if gathered is None:
            self.image_ids, self.results = [], []
            return
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
        """Runs COCOeval (bbox) over the collected images on the main process and shares its numbers with the
        others; returns and keeps the 12 stats (``per_class``, ``summary`` too). Call it on every process."""
        outcome: dict[str, Any] | str | None = None
        if get_rank() == 0:
            try:
                self.coco_eval, summary = evaluate_coco_results(self.coco_gt, self.results, self.image_ids,
                                                                self.evaluator)
                names = {int(c["id"]): str(c.get("name", c["id"])) for c in self.coco_gt.dataset["categories"]}
                outcome = {"stats": np.asarray(self.coco_eval.stats[:12], dtype=np.float64).copy(),
                           "per_class": per_class_ap(self.coco_eval.eval, names), "summary": summary,
                           "num_images": len(self.image_ids), "num_detections": len(self.results)}
            except Exception as error:
                # The other processes wait for the numbers: tell them, then fail here with the real error.
                _broadcast_from_main(f"{type(error).__name__}: {error}")
                raise
        outcome = _broadcast_from_main(outcome)
        if isinstance(outcome, str):
            raise RuntimeError(f"the COCO evaluation on the main process failed ({outcome})")
        self.stats, self.per_class, self.summary = outcome["stats"], outcome["per_class"], outcome["summary"]
        self.num_images, self.num_detections = outcome["num_images"], outcome["num_detections"]
        return self.stats

    def report(self) -> dict[str, Any]:
        """What ``eval.json`` holds besides the loss entries: the 12 numbers by name, per-class AP and AP50, the
        number of images and detections, the evaluator."""
        if self.stats is None:
            raise RuntimeError("summarize() first")
        return {"bbox": dict(zip(STAT_NAMES, self.stats.tolist())),
                "per_class": [asdict(row) for row in self.per_class],
                "num_images": self.num_images, "num_detections": self.num_detections, "evaluator": self.evaluator}

    def save(self, json_path: Path | None, pth_paths: list[Path], entries: dict[str, Any] | None = None) -> None:
        """Main process: writes :meth:`report` (after ``entries``, e.g. the official ``test_*`` log entries) to
        ``json_path`` and COCOeval's accumulated arrays, as the official ``eval.pth``, to each of ``pth_paths``."""
        if self.coco_eval is None:
            raise RuntimeError("only the main process, after summarize(), holds the evaluation to save")
        if json_path is not None:
            json_path.write_text(json.dumps({**(entries or {}), **self.report()}, indent=1))
        if pth_paths:
            arrays = official_eval_dict(self.coco_eval)
            for path in pth_paths:
                torch.save(arrays, path)
