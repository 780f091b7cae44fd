"""Data: COCO-format datasets, the official detection transforms, batching, image files, and a synthetic dataset.

The COCO dataset code (which needs pycocotools) and the synthetic generator load on first use of one of their names
(module ``__getattr__``), so that inference, which imports ``deformable_detr.data.images`` / ``.transforms`` /
``.collate``, does not need pycocotools.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from deformable_detr.data.collate import batch_images, collate_fn
from deformable_detr.data.images import UnreadableImageError, load_rgb_image, to_rgb
from deformable_detr.data.transforms import EvalTransform, make_coco_transforms

if TYPE_CHECKING:
    from deformable_detr.data.coco import (
        AnnotationFileError,
        CocoDetection,
        DatasetLayoutError,
        build_coco_dataset,
        category_info,
        load_coco_annotations,
        num_classes,
        prepare_coco_target,
    )
    from deformable_detr.data.synthetic import CATEGORIES as SYNTHETIC_CATEGORIES
    from deformable_detr.data.synthetic import SyntheticDataset, make_synthetic_dataset

# name -> (module, attribute), loaded on first access.
_LAZY = {
    **{name: ("deformable_detr.data.coco", name)
       for name in ("AnnotationFileError", "CocoDetection", "DatasetLayoutError", "build_coco_dataset",
                    "category_info", "load_coco_annotations", "num_classes", "prepare_coco_target")},
    "SYNTHETIC_CATEGORIES": ("deformable_detr.data.synthetic", "CATEGORIES"),
    "SyntheticDataset": ("deformable_detr.data.synthetic", "SyntheticDataset"),
    "make_synthetic_dataset": ("deformable_detr.data.synthetic", "make_synthetic_dataset"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["AnnotationFileError", "CocoDetection", "DatasetLayoutError", "EvalTransform", "SYNTHETIC_CATEGORIES",
           "SyntheticDataset", "UnreadableImageError", "batch_images", "build_coco_dataset", "category_info",
           "collate_fn", "load_coco_annotations", "load_rgb_image", "make_coco_transforms", "make_synthetic_dataset",
           "num_classes", "prepare_coco_target", "to_rgb"]
