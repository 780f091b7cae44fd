"""Turn the detector's normalised outputs into scored boxes in image pixels (COCO evaluation format)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deformable_detr.box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Top-``num_detections`` (query, class) pairs by sigmoid score, over all Q x C pairs.

    A query may therefore appear several times with different labels, as in the official code.
    """

    def __init__(self, num_detections: int = 100) -> None:
        super().__init__()
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
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if target_sizes.dim() != 2 or target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(
                f"target_sizes must have shape (batch, 2) = ({logits.shape[0]}, 2) as (height, width), "
                f"got {tuple(target_sizes.shape)}"
            )
        batch, num_queries, num_classes = logits.shape
        probabilities = logits.sigmoid().view(batch, -1)
        k = min(self.num_detections, num_queries * num_classes)
        scores, flat_indices = torch.topk(probabilities, k, dim=1)
        query_indices = flat_indices // num_classes
        labels = flat_indices % num_classes
        boxes = torch.gather(box_cxcywh_to_xyxy(boxes), 1, query_indices.unsqueeze(-1).repeat(1, 1, 4))
        image_height, image_width = target_sizes.unbind(1)
        scale = torch.stack([image_width, image_height, image_width, image_height], dim=1).to(boxes.dtype)
        boxes = boxes * scale[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]
