"""Typed model configuration with the official defaults, and the five official variants as presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from deformable_detr.model.backbone import RESNETS


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter of the official ``main.py`` that shapes the model, the loss or post-processing.

    Names are the official command-line flags, so that ``--hidden_dim 128`` and ``hidden_dim=128`` mean the same.
    """

    num_classes: int = 91
    """Number of sigmoid class logits. COCO: 91 (the largest category id + 1, as the official code)."""
    backbone: str = "resnet50"
    dilation: bool = False
    """Replace layer4's stride by a dilation (the DC5 variants)."""
    train_backbone: bool = True
    """Train layer2..layer4 (the official ``lr_backbone > 0``); the stem and layer1 are always frozen."""
    position_embedding_scale: float = 2 * math.pi
    num_feature_levels: int = 4
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    hidden_dim: int = 256
    dropout: float = 0.1
    nheads: int = 8
    num_queries: int = 300
    dec_n_points: int = 4
    enc_n_points: int = 4
    with_box_refine: bool = False
    two_stage: bool = False
    aux_loss: bool = True
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    num_detections: int = 100
    """Detections kept per image by post-processing (top-k over queries x classes)."""
    msda_backend: str = "auto"
    """Multi-scale deformable attention backend (``deformable_detr.ops.BACKENDS`` or ``auto``)."""

    def __post_init__(self) -> None:
        positive = ("num_classes", "num_feature_levels", "enc_layers", "dec_layers", "dim_feedforward", "hidden_dim",
                    "nheads", "num_queries", "dec_n_points", "enc_n_points", "num_detections")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.backbone not in RESNETS:
            raise ValueError(f"backbone must be one of {RESNETS}, got {self.backbone!r}")
        if self.dilation and self.backbone in ("resnet18", "resnet34"):
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (resnet50, resnet101), got {self.backbone}")
        if self.hidden_dim % self.nheads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by nheads ({self.nheads})")
        if self.hidden_dim % 32:
            raise ValueError(f"hidden_dim must be a multiple of 32 (GroupNorm(32) on the input projections), "
                             f"got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (self.set_cost_class or self.set_cost_bbox or self.set_cost_giou):
            raise ValueError("set_cost_class, set_cost_bbox and set_cost_giou are all 0")

    @property
    def backbone_levels(self) -> int:
        """Feature maps taken from the backbone: layer2..4 when multi-scale, layer4 alone otherwise."""
        return 3 if self.num_feature_levels > 1 else 1


VARIANTS: dict[str, dict[str, object]] = {
    # configs/r50_deformable_detr.sh
    "deformable_detr": {},
    # configs/r50_deformable_detr_single_scale.sh
    "single_scale": {"num_feature_levels": 1},
    # configs/r50_deformable_detr_single_scale_dc5.sh
    "single_scale_dc5": {"num_feature_levels": 1, "dilation": True},
    # configs/r50_deformable_detr_plus_iterative_bbox_refinement.sh
    "box_refine": {"with_box_refine": True},
    # configs/r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.sh
    "two_stage": {"with_box_refine": True, "two_stage": True},
}


def model_config(variant: str, **overrides: object) -> ModelConfig:
    """The preset of ``variant`` with ``overrides`` applied (any field of :class:`ModelConfig`)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; valid options: {', '.join(sorted(fields))}")
    return ModelConfig(**{**VARIANTS[variant], **overrides})
