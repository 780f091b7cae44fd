"""Data: COCO-format datasets, the official detection transforms, batching, and a synthetic dataset."""

from deformable_detr.data.coco import (
    AnnotationFileError,
    CocoDetection,
    DatasetLayoutError,
    UnreadableImageError,
    build_coco_dataset,
    category_info,
    load_coco_annotations,
    load_rgb_image,
    num_classes,
    prepare_coco_target,
    to_rgb,
)
from deformable_detr.data.collate import batch_images, collate_fn
from deformable_detr.data.synthetic import CATEGORIES as SYNTHETIC_CATEGORIES
from deformable_detr.data.synthetic import SyntheticDataset, make_synthetic_dataset
from deformable_detr.data.transforms import make_coco_transforms

__all__ = ["AnnotationFileError", "CocoDetection", "DatasetLayoutError", "SYNTHETIC_CATEGORIES", "SyntheticDataset",
           "UnreadableImageError", "batch_images", "build_coco_dataset", "category_info", "collate_fn",
           "load_coco_annotations", "load_rgb_image", "make_coco_transforms", "make_synthetic_dataset",
           "num_classes", "prepare_coco_target", "to_rgb"]
