"""Deformable DETR (Zhu et al. 2020) in plain PyTorch, numerically equal to the official implementation."""

from deformable_detr.config import VARIANTS, ModelConfig, model_config
from deformable_detr.inference.detector import Detector
from deformable_detr.model.build import build_from_config, build_model
from deformable_detr.model.deformable_detr import DeformableDETR, DetectorOutput
from deformable_detr.ops import ms_deform_attn

__version__ = "0.1.0"

__all__ = ["VARIANTS", "DeformableDETR", "Detector", "DetectorOutput", "ModelConfig", "build_from_config",
           "build_model",
           "model_config", "ms_deform_attn", "__version__"]
