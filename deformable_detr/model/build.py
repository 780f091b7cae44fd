"""Build the detector, its criterion and its post-processor from a :class:`ModelConfig` (the only config reader)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor, nn

from deformable_detr.config import ModelConfig, model_config
from deformable_detr.loss.criterion import SetCriterion, build_weight_dict
from deformable_detr.loss.detr_criterion import DETRCriterion
from deformable_detr.loss.matcher import HungarianMatcher, SoftmaxClassCost
from deformable_detr.model.backbone import Backbone, Joiner
from deformable_detr.model.deformable_detr import DeformableDETR, make_prediction_heads
from deformable_detr.model.detr import DETR, DETRPostProcess, decode_detr_detections
from deformable_detr.model.detr_transformer import DETRTransformer
from deformable_detr.model.position_encoding import PositionEmbeddingSine
from deformable_detr.model.postprocess import PostProcess, decode_detections
from deformable_detr.model.transformer import DeformableTransformer

# What the inference paths (Detector, ONNX export) call on the raw outputs: (pred_logits, pred_boxes, target_sizes)
# -> scores, labels, boxes (pixels), query indices, by decreasing score.
Decode = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


def build_from_config(config: ModelConfig) -> tuple[DeformableDETR | DETR, SetCriterion, dict[str, nn.Module]]:
    """Returns (model, criterion, {"bbox": PostProcess}) for ``config`` (its ``architecture``'s modules)."""
    if config.architecture == "detr":
        return build_detr(config)
    backbone = Joiner(
        Backbone(config.backbone, train_backbone=config.train_backbone, multi_scale=config.num_feature_levels > 1,
                 dilation=config.dilation, checkpoint_blocks="backbone" in config.checkpoint_activations),
        PositionEmbeddingSine(config.hidden_dim // 2, normalize=True, scale=config.position_embedding_scale),
    )
    # Two-stage adds one head pair for the encoder proposals.
    num_heads = config.dec_layers + (1 if config.two_stage else 0)
    class_embed, bbox_embed = make_prediction_heads(config.hidden_dim, config.num_classes, num_heads,
                                                    share=not config.with_box_refine, two_stage=config.two_stage)
    transformer = DeformableTransformer(
        d_model=config.hidden_dim, nhead=config.nheads, num_encoder_layers=config.enc_layers,
        num_decoder_layers=config.dec_layers, dim_feedforward=config.dim_feedforward, dropout=config.dropout,
        activation="relu", num_feature_levels=config.num_feature_levels, dec_n_points=config.dec_n_points,
        enc_n_points=config.enc_n_points, two_stage=config.two_stage, two_stage_num_proposals=config.num_queries,
        decoder_bbox_embed=bbox_embed if config.with_box_refine else None,
        decoder_class_embed=class_embed if config.two_stage else None,
        msda_backend=config.msda_backend,
        checkpoint_encoder="encoder" in config.checkpoint_activations,
        checkpoint_decoder="decoder" in config.checkpoint_activations,
    )
    model = DeformableDETR(backbone, transformer, class_embed, bbox_embed, num_queries=config.num_queries,
                           num_feature_levels=config.num_feature_levels, aux_loss=config.aux_loss,
                           with_box_refine=config.with_box_refine, two_stage=config.two_stage)
    matcher = HungarianMatcher(config.set_cost_class, config.set_cost_bbox, config.set_cost_giou)
    weight_dict = build_weight_dict(config.cls_loss_coef, config.bbox_loss_coef, config.giou_loss_coef,
                                    config.dec_layers, aux_loss=config.aux_loss)
    criterion = SetCriterion(config.num_classes, matcher, weight_dict, focal_alpha=config.focal_alpha)
    return model, criterion, {"bbox": PostProcess(config.num_detections)}


def build_detr(config: ModelConfig) -> tuple[DETR, DETRCriterion, dict[str, nn.Module]]:
    """DETR (facebookresearch/detr ``models/detr.py`` ``build``): the shared backbone with DETR's position encoding
    (no half-pixel shift), its transformer, criterion and post-processing."""
    backbone = Joiner(
        Backbone(config.backbone, train_backbone=config.train_backbone, multi_scale=False, dilation=config.dilation,
                 checkpoint_blocks="backbone" in config.checkpoint_activations),
        PositionEmbeddingSine(config.hidden_dim // 2, normalize=True, scale=config.position_embedding_scale,
                              offset=0.0),
    )
    transformer = DETRTransformer(d_model=config.hidden_dim, nhead=config.nheads, num_encoder_layers=config.enc_layers,
                                  num_decoder_layers=config.dec_layers, dim_feedforward=config.dim_feedforward,
                                  dropout=config.dropout)
    model = DETR(backbone, transformer, config.num_classes, num_queries=config.num_queries, aux_loss=config.aux_loss)
    matcher = HungarianMatcher(config.set_cost_class, config.set_cost_bbox, config.set_cost_giou,
                               class_cost=SoftmaxClassCost())
    weight_dict = build_weight_dict(config.cls_loss_coef, config.bbox_loss_coef, config.giou_loss_coef,
                                    config.dec_layers, aux_loss=config.aux_loss)
    criterion = DETRCriterion(config.num_classes, matcher, weight_dict, eos_coef=config.eos_coef)
    return model, criterion, {"bbox": DETRPostProcess()}


def build_decode(config: ModelConfig) -> Decode:
    """The inference decode of ``config``'s architecture: DETR's one detection per query, or Deformable DETR's top
    ``num_detections`` (query, class) pairs."""
    if config.architecture == "detr":
        return decode_detr_detections
    return functools.partial(decode_detections, num_detections=config.num_detections)


def build_model(variant: str = "deformable_detr", num_classes: int = 91, **overrides: object
                ) -> tuple[DeformableDETR, SetCriterion, dict[str, nn.Module]]:
    """Build one of the official variants (``config.VARIANTS``) with any hyper-parameter overridden.

    >>> model, criterion, postprocessors = build_model("box_refine", num_classes=91)
    """
    return build_from_config(model_config(variant, num_classes=num_classes, **overrides))
