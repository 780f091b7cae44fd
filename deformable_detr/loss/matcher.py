"""Hungarian matching of predictions to ground-truth boxes (Carion et al. 2020, with a focal class cost)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from deformable_detr.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising cost_class * C_focal + cost_bbox * L1 + cost_giou * (-GIoU).

    The class cost is the focal loss of "positive" minus that of "negative" for the target class, with
    alpha = 0.25 and gamma = 2 fixed (as in the official code, whatever the criterion's focal_alpha).
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0; at least one of cost_class/bbox/giou must be > 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def cost_matrices(self, outputs, targets: list[dict[str, Tensor]]) -> list[Tensor]:
        """
        Args:
            outputs: ``pred_logits`` (batch, Q, C) and ``pred_boxes`` (batch, Q, 4) cxcywh.
            targets: per image ``labels`` (n_b,) int64 and ``boxes`` (n_b, 4) normalised cxcywh.

        Returns:
            per image the (Q, n_b) cost matrix, on the CPU.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        batch, num_queries = logits.shape[:2]
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
        # (batch*Q, C), (batch*Q, 4)
        probabilities = logits.flatten(0, 1).sigmoid()
        out_boxes = boxes.flatten(0, 1)
        target_labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(out_boxes.dtype)

        alpha, gamma = 0.25, 2.0
        negative_cost = (1 - alpha) * (probabilities**gamma) * (-(1 - probabilities + 1e-8).log())
        positive_cost = alpha * ((1 - probabilities) ** gamma) * (-(probabilities + 1e-8).log())
        cost_class = positive_cost[:, target_labels] - negative_cost[:, target_labels]
        cost_bbox = torch.cdist(out_boxes, target_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_boxes), box_cxcywh_to_xyxy(target_boxes))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        # (batch, Q, sum n_b) -> per image (Q, n_b)
        cost = cost.view(batch, num_queries, -1).cpu()
        if not torch.isfinite(cost).all():  # on the CPU copy: no extra device synchronisation
            raise FloatingPointError("matching costs are nan or inf: the predictions are not finite")
        sizes = [len(t["boxes"]) for t in targets]
        return [c[b] for b, c in enumerate(cost.split(sizes, -1))]

    @torch.no_grad()
    def forward(self, outputs, targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Per image (query indices, target indices), int64, each of length min(Q, n_b), sorted by query."""
        indices = []
        for cost in self.cost_matrices(outputs, targets):
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
