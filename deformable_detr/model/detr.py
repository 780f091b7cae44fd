"""DETR (Carion et al. 2020, facebookresearch/detr ``models/detr.py``): ResNet layer4, a 1x1 input projection, the
post-norm transformer of :mod:`deformable_detr.model.detr_transformer`, learnt queries, a softmax class head with a
no-object class and a 3-layer box head applied to every decoder layer; and its post-processing.

The backbone, position encoding, box head, matcher skeleton and training engine are those of Deformable DETR.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deformable_detr.box_ops import box_cxcywh_to_xyxy
from deformable_detr.model.backbone import Joiner
from deformable_detr.model.deformable_detr import MLP, DetectorOutput, check_images_and_mask
from deformable_detr.model.detr_transformer import DETRTransformer
from deformable_detr.model.postprocess import check_prediction_shapes


class DETR(nn.Module):
    """DETR: ``class_embed`` gives ``num_classes + 1`` logits (the last one: no object), ``bbox_embed`` sigmoid
    (cx, cy, w, h) boxes; ONE head pair shared by all decoder layers (single modules, as in official checkpoints)."""

    def __init__(self, backbone: Joiner, transformer: DETRTransformer, num_classes: int, num_queries: int = 100,
                 aux_loss: bool = True) -> None:
        super().__init__()
        if len(backbone.num_channels) != 1:
            raise ValueError(f"DETR reads one feature map, the backbone returns {len(backbone.num_channels)}")
        if num_classes < 1 or num_queries < 1:
            raise ValueError(f"num_classes and num_queries must be >= 1, got {num_classes} and {num_queries}")
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.num_feature_levels = 1  # one feature map (read by size checks shared with Deformable DETR)
        self.aux_loss = aux_loss
        # Registration order = the official state_dict order.
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1)
        self.backbone = backbone

    def input_size_problem(self, height: int, width: int) -> str | None:
        """Any input size runs (down to a 1 x 1 feature map)."""
        return None

    def forward(self, images: Tensor, mask: Tensor | None = None) -> DetectorOutput:
        """
        Args:
            images: (batch, 3, H, W) normalised images, zero-padded to a common size.
            mask: (batch, H, W) bool, True on padding; None means no padding.

        Returns:
            ``pred_logits`` (batch, Q, num_classes + 1), ``pred_boxes`` (batch, Q, 4) normalised cxcywh of the last
            decoder layer, ``aux_outputs`` the same for layers 1..L-1.
        """
        mask = check_images_and_mask(images, mask)
        features, pos = self.backbone(images, mask)
        (feature_map, feature_mask), = features
        result = self.transformer(self.input_proj(feature_map), feature_mask, self.query_embed.weight, pos[-1])
        logits = self.class_embed(result.hs)  # (L, batch, Q, num_classes + 1)
        boxes = self.bbox_embed(result.hs).sigmoid()  # (L, batch, Q, 4)
        aux_outputs = []
        if self.aux_loss:
            aux_outputs = [{"pred_logits": layer_logits, "pred_boxes": layer_boxes}
                           for layer_logits, layer_boxes in zip(logits[:-1], boxes[:-1])]
        return DetectorOutput(logits[-1], boxes[-1], aux_outputs)


def detr_scores(pred_logits: Tensor, pred_boxes: Tensor, target_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The official DETR post-processing, one detection per query in query order: the softmax over all
    ``C + 1`` logits, the no-object column dropped AFTER it, the best remaining class.

    Args:
        pred_logits: (batch, Q, C + 1) logits, the last one no-object.
        pred_boxes: (batch, Q, 4) normalised (cx, cy, w, h).
        target_sizes: (batch, 2) (height, width) of each original image in pixels.

    Returns:
        scores (batch, Q), labels (batch, Q) int64 in [0, C), boxes (batch, Q, 4) (x0, y0, x1, y1) pixels.
    """
    check_prediction_shapes(pred_logits, pred_boxes, target_sizes)
    scores, labels = F.softmax(pred_logits, -1)[..., :-1].max(-1)
    image_height, image_width = target_sizes.unbind(1)
    scale = torch.stack([image_width, image_height, image_width, image_height], dim=1).to(pred_boxes.dtype)
    return scores, labels, box_cxcywh_to_xyxy(pred_boxes) * scale[:, None, :]


def decode_detr_detections(pred_logits: Tensor, pred_boxes: Tensor, target_sizes: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`detr_scores` in the inference format of
    :func:`~deformable_detr.model.postprocess.decode_detections`: scores, labels, boxes and the query of each
    detection, (batch, Q) each (boxes (batch, Q, 4)), by decreasing score."""
    scores, labels, boxes = detr_scores(pred_logits, pred_boxes, target_sizes)
    # topk over all Q rather than sort: ONNX has TopK, the dynamo exporter has no stable sort.
    scores, order = torch.topk(scores, scores.shape[1], dim=1)  # (batch, Q)
    return (scores, labels.gather(1, order),
            boxes.gather(1, order.unsqueeze(-1).expand(-1, -1, 4)), order)


class DETRPostProcess(nn.Module):
    """The official DETR ``PostProcess``: per image ``{"scores", "labels", "boxes"}`` with one entry per query, in
    query order (no top-k, no threshold)."""

    @torch.no_grad()
    def forward(self, outputs, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """outputs: ``pred_logits`` (batch, Q, C + 1), ``pred_boxes`` (batch, Q, 4); target_sizes: (batch, 2)
        (height, width) -> per image scores (Q,), labels (Q,) int64, boxes (Q, 4) xyxy pixels."""
        scores, labels, boxes = detr_scores(outputs["pred_logits"], outputs["pred_boxes"], target_sizes)
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]
