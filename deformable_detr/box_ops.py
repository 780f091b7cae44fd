"""Box conversions, IoU and generalised IoU (Rezatofighi et al. 2019)."""

from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) (center x, center y, width, height) -> (..., 4) (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) (x0, y0, x1, y1) -> (..., 4) (center x, center y, width, height)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...,)"""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union of (N, 4) and (M, 4) xyxy boxes, each (N, M)."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    intersection = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2 - intersection
    return intersection / union, union


def _check_xyxy(boxes: Tensor, name: str) -> None:
    if not (boxes[:, 2:] >= boxes[:, :2]).all():  # also False for nan
        if not torch.isfinite(boxes).all():
            raise FloatingPointError(f"generalized_box_iou: {name} has non-finite coordinates (nan or inf)")
        raise ValueError(f"generalized_box_iou: {name} has a box with x1 < x0 or y1 < y0 (expected xyxy boxes)")


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalised IoU of (N, 4) and (M, 4) xyxy boxes, (N, M), in [-1, 1].

    Degenerate boxes (x1 < x0 or y1 < y0) give meaningless values (inf/nan), so they are rejected: ValueError, or
    FloatingPointError when the coordinates are nan/inf (a diverged model's predictions, not badly formed boxes).
    """
    _check_xyxy(boxes1, "boxes1")
    _check_xyxy(boxes2, "boxes2")
    return unchecked_generalized_box_iou(boxes1, boxes2)


def unchecked_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """:func:`generalized_box_iou` without its box checks, which read device values (a host-device
    synchronisation): for callers that check elsewhere, as the matcher does on its host copy of the costs."""
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[:, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing_area = wh[..., 0] * wh[..., 1]
    return iou - (enclosing_area - union) / enclosing_area


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of matching rows of (N, 4) and (N, 4) xyxy boxes -> (N,): the diagonal of the pairwise matrix without
    computing the rest."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    top_left = torch.max(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    intersection = wh[:, 0] * wh[:, 1]
    union = area1 + area2 - intersection
    iou = intersection / union
    top_left = torch.min(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.max(boxes1[:, 2:], boxes2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing_area = wh[:, 0] * wh[:, 1]
    return iou - (enclosing_area - union) / enclosing_area
