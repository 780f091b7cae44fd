"""Turn the detector's normalised outputs into scored boxes in image pixels (COCO evaluation format).

:func:`decode_detections` is the one decode, used by :class:`PostProcess` (evaluation), the inference ``Detector``
and the ONNX export: tensors in, tensors out, only ONNX-expressible operations.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deformable_detr.box_ops import box_cxcywh_to_xyxy


def check_prediction_shapes(pred_logits: Tensor, pred_boxes: Tensor, target_sizes: Tensor) -> None:
    """pred_logits (batch, Q, classes), pred_boxes (batch, Q, 4) and target_sizes (batch, 2) must agree."""
    batch, num_queries, _ = pred_logits.shape
    if pred_boxes.shape != (batch, num_queries, 4):
        raise ValueError(f"pred_boxes must have shape (batch, Q, 4) = ({batch}, {num_queries}, 4) to match "
                         f"pred_logits {tuple(pred_logits.shape)}, got {tuple(pred_boxes.shape)}")
    if target_sizes.dim() != 2 or target_sizes.shape != (batch, 2):
        raise ValueError(f"target_sizes must have shape (batch, 2) = ({batch}, 2) as (height, width), "
                         f"got {tuple(target_sizes.shape)}")


def decode_detections(pred_logits: Tensor, pred_boxes: Tensor, target_sizes: Tensor, num_detections: int = 100
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The official post-processing: the top ``num_detections`` (query, class) pairs by sigmoid score over all
    Q x C pairs (a query may give several labels), with the query's box in pixels of the original image.

    Args:
        pred_logits: (batch, Q, C) class logits.
        pred_boxes: (batch, Q, 4) boxes (cx, cy, w, h) normalised to [0, 1] by the image size.
        target_sizes: (batch, 2) (height, width) of each original image, in pixels (any number dtype).
        num_detections: how many pairs to keep per image.

    Returns:
        scores (batch, k) sigmoid probabilities, by decreasing score; labels (batch, k) int64 class indices;
        boxes (batch, k, 4) (x0, y0, x1, y1) pixels, in ``pred_boxes``' dtype; query_indices (batch, k) int64, the
        query of each detection (``boxes[b, i]`` is query ``query_indices[b, i]``'s box). k = min(num_detections,
        Q * C).
    """
    check_prediction_shapes(pred_logits, pred_boxes, target_sizes)
    batch, num_queries, num_classes = pred_logits.shape
    if num_detections < 1:
        raise ValueError(f"num_detections must be >= 1, got {num_detections}")
    k = min(num_detections, num_queries * num_classes)
    scores, flat_indices = torch.topk(pred_logits.sigmoid().flatten(1), k, dim=1)  # (batch, k) over Q * C
    # Floor division spelled out: the ONNX exporters turn `//` on tensors into a float division + floor.
    query_indices = torch.div(flat_indices, num_classes, rounding_mode="floor")
    labels = flat_indices - query_indices * num_classes
    # (batch, k, 4): the box of each detection's query
    boxes = torch.gather(box_cxcywh_to_xyxy(pred_boxes), 1, query_indices.unsqueeze(-1).expand(-1, -1, 4))
    image_height, image_width = target_sizes.unbind(1)
    scale = torch.stack([image_width, image_height, image_width, image_height], dim=1).to(boxes.dtype)  # (batch, 4)
    return scores, labels, boxes * scale[:, None, :], query_indices


class PostProcess(nn.Module):
    """:func:`decode_detections` as the evaluation loop uses it: one dict per image.

    A query may therefore appear several times with different labels, as in the official code.
    """

    def __init__(self, num_detections: int = 100) -> None:
        super().__init__()
        if num_detections < 1:
            raise ValueError(f"num_detections must be >= 1, got {num_detections}")
        self.num_detections = num_detections

    @torch.no_grad()
    def forward(self, outputs, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """
        Args:
            outputs: the detector's output (``pred_logits`` (batch, Q, C), ``pred_boxes`` (batch, Q, 4) cxcywh).
            target_sizes: (batch, 2) (height, width) of each original image, in pixels.

        Returns:
            per image ``{"scores": (k,), "labels": (k,) int64, "boxes": (k, 4) xyxy pixels}``,
            k = min(num_detections, Q * C), by decreasing score.
        """
        scores, labels, boxes, _ = decode_detections(outputs["pred_logits"], outputs["pred_boxes"], target_sizes,
                                                     self.num_detections)
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]
