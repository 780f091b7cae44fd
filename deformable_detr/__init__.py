"""Deformable DETR (Zhu et al. 2020) in plain PyTorch, numerically equal to the official implementation.

Importing the package is light (no torch): the public names load their modules on first use, so that ``ddetr
--help`` answers at once and ``import deformable_detr`` costs nothing until something is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# public name -> the module that defines it
_EXPORTS = {
    "VARIANTS": "deformable_detr.config",
    "ModelConfig": "deformable_detr.config",
    "TrainConfig": "deformable_detr.config",
    "DataConfig": "deformable_detr.config",
    "model_config": "deformable_detr.config",
    "build_model": "deformable_detr.model.build",
    "build_from_config": "deformable_detr.model.build",
    "DeformableDETR": "deformable_detr.model.deformable_detr",
    "DetectorOutput": "deformable_detr.model.deformable_detr",
    "ms_deform_attn": "deformable_detr.ops",
    "Detector": "deformable_detr.inference.detector",
    "train": "deformable_detr.training.train",
    "evaluate_checkpoint": "deformable_detr.training.train",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deformable_detr' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
