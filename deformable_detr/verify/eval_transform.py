"""The ``eval_transform.npz`` reference case: target preparation and the validation transform against the
official ``ConvertCocoPolysToMask`` + ``make_coco_transforms('val')``.

Each case ``c<i>`` regenerates its synthetic image from the reference README's integer formula, builds the COCO
annotations from ``c<i>.in.anno_*`` (iscrowd 0, image_id 1000 + i), and records every array the file holds under
the same names.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import numpy as np
import PIL.Image

from deformable_detr.data.coco import prepare_coco_target
from deformable_detr.data.transforms import make_coco_transforms
from deformable_detr.verify.comparison import Check, ReferenceFileError, exact, max_rel, require

STATISTIC_REL_TOL = 1e-6
FLOAT32_REL_TOL = 1e-6  # a few float32 ulps relative to the array's largest value

# Arrays compared bit for bit: sizes, counts, labels, checksums of integer pixels.
_EXACT = ("in.image_hw", "in.image_channel_sum", "in.image_sha256", "prep.labels", "prep.size", "resized.hw",
          "resized.channel_sum_uint8", "out.shape", "tgt.labels", "tgt.iscrowd", "tgt.size", "tgt.orig_size")
_STATISTICS = ("out.mean", "out.std", "out.sum", "out.channel_mean", "out.channel_std", "out.channel_sum")
_FLOAT_ARRAYS = ("prep.boxes_xyxy", "out.first8x8", "out.sub16", "tgt.boxes", "tgt.area")
_INPUTS = ("in.anno_bbox_xywh", "in.anno_category_id", "in.anno_area")


def reference_image(height: int, width: int) -> np.ndarray:
    """The README's synthetic test image, (H, W, 3) uint8: R = 255x/(W-1), G = 255y/(H-1) (floored),
    B = a 37x29 checkerboard of 0/160 plus (7x + 13y) mod 96."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    red = (x * 255) // (width - 1)
    green = (y * 255) // (height - 1)
    blue = ((x // 37 + y // 29) % 2) * 160 + (x * 7 + y * 13) % 96
    return np.ascontiguousarray(np.stack([red, green, blue], axis=-1).astype(np.uint8))


def _cases(reference: dict[str, np.ndarray]) -> Iterator[int]:
    case = 0
    while f"c{case}.in.image_hw" in reference:
        yield case
        case += 1


def run_eval_transform_case(reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every ``c<i>.*`` array of the file, computed by this package's pipeline."""
    cases = list(_cases(reference))
    if not cases:
        raise ReferenceFileError("eval-transform file: no case (expected c0.in.image_hw)")
    computed: dict[str, np.ndarray] = {}
    for case in cases:
        p = f"c{case}."
        require(reference, [p + k for k in _INPUTS], f"eval-transform case {case}")
        height, width = (int(v) for v in reference[p + "in.image_hw"])
        pixels = reference_image(height, width)
        computed[p + "in.image_hw"] = np.array([height, width], dtype=np.int64)
        computed[p + "in.image_channel_sum"] = pixels.sum(axis=(0, 1), dtype=np.int64)
        computed[p + "in.image_sha256"] = np.array(hashlib.sha256(pixels.tobytes()).hexdigest())

        image_id = 1000 + case
        annotations = [{"id": n, "image_id": image_id, "bbox": [float(v) for v in bbox], "category_id": int(label),
                        "area": float(area), "iscrowd": 0}
                       for n, (bbox, label, area) in enumerate(zip(reference[p + "in.anno_bbox_xywh"],
                                                                   reference[p + "in.anno_category_id"],
                                                                   reference[p + "in.anno_area"]))]
        image = PIL.Image.fromarray(pixels)
        target = prepare_coco_target(image.size, image_id, annotations)
        computed[p + "prep.boxes_xyxy"] = target["boxes"].numpy()
        computed[p + "prep.labels"] = target["labels"].numpy()
        computed[p + "prep.size"] = target["size"].numpy()

        # The val pipeline, its first stage (the resize) run alone to record the resized uint8 image.
        pipeline = make_coco_transforms("val")
        resized, target = pipeline.transforms[0](image, target)
        computed[p + "resized.hw"] = np.array([resized.height, resized.width], dtype=np.int64)
        computed[p + "resized.channel_sum_uint8"] = np.asarray(resized).sum(axis=(0, 1), dtype=np.int64)
        out = resized
        for stage in pipeline.transforms[1:]:
            out, target = stage(out, target)
        values = out.double()
        computed[p + "out.shape"] = np.array(out.shape, dtype=np.int64)
        computed[p + "out.mean"] = np.float64(values.mean().item())
        computed[p + "out.std"] = np.float64(values.std().item())
        computed[p + "out.sum"] = np.float64(values.sum().item())
        computed[p + "out.channel_mean"] = values.mean(dim=(1, 2)).numpy()
        computed[p + "out.channel_std"] = values.flatten(1).std(dim=1).numpy()
        computed[p + "out.channel_sum"] = values.sum(dim=(1, 2)).numpy()
        computed[p + "out.first8x8"] = out[:, :8, :8].numpy()
        computed[p + "out.sub16"] = out[:, ::16, ::16].numpy()
        for key in ("boxes", "labels", "area", "iscrowd", "size", "orig_size"):
            computed[p + "tgt." + key] = target[key].numpy()
    return computed


def _statistic_error(computed: np.ndarray, reference: np.ndarray) -> float:
    """max over entries of |a - b| / |b|."""
    computed = np.asarray(computed, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if computed.shape != reference.shape:
        return math.inf
    return float(np.max(np.abs(computed - reference) / np.maximum(np.abs(reference), 1e-30), initial=0.0))


def compare_eval_transform(computed: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> list[Check]:
    """One check per reference array (inputs excepted): integers and checksums exactly, statistics relative 1e-6,
    float arrays (pixels, boxes, areas) within float32 noise."""
    checks: list[Check] = []
    for key in reference:
        case, _, name = key.partition(".")
        if name in _INPUTS:
            continue
        if key not in computed:
            checks.append(Check(key, math.inf, 0.0, False, "missing"))
        elif name in _EXACT:
            error = exact(computed[key], reference[key])
            checks.append(Check(key, error, 0.0, error == 0.0, "exact"))
        elif name in _STATISTICS:
            error = _statistic_error(computed[key], reference[key])
            checks.append(Check(key, error, STATISTIC_REL_TOL, error <= STATISTIC_REL_TOL, "rel"))
        elif name in _FLOAT_ARRAYS:
            error = max_rel(computed[key], reference[key])
            checks.append(Check(key, error, FLOAT32_REL_TOL, error <= FLOAT32_REL_TOL, "rel-max"))
        else:
            checks.append(Check(key, math.inf, 0.0, False, "unknown"))
    return checks
