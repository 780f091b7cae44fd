"""Hungarian matching of predictions to ground-truth boxes (Carion et al. 2020), with the class cost of the detector:
Deformable DETR's focal cost (:class:`FocalClassCost`, the default) or DETR's softmax cost (:class:`SoftmaxClassCost`).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from deformable_detr.box_ops import box_cxcywh_to_xyxy, unchecked_generalized_box_iou

Indices = list[tuple[Tensor, Tensor]]


class FocalClassCost:
    """Deformable DETR's class cost: the focal loss of "positive" minus that of "negative" for the target class on
    independent sigmoid classes, alpha = 0.25 and gamma = 2 fixed (as in the official code, whatever the criterion's
    focal_alpha). The logits have one column per class."""

    extra_logits = 0

    def __call__(self, logits: Tensor, target_labels: Tensor) -> Tensor:
        """logits: (N, C), target_labels: (T,) in [0, C) -> (N, T)."""
        probabilities = logits.sigmoid()
        alpha, gamma = 0.25, 2.0
        negative_cost = (1 - alpha) * (probabilities**gamma) * (-(1 - probabilities + 1e-8).log())
        positive_cost = alpha * ((1 - probabilities) ** gamma) * (-(probabilities + 1e-8).log())
        return positive_cost[:, target_labels] - negative_cost[:, target_labels]


class SoftmaxClassCost:
    """DETR's class cost: minus the softmax probability of the target class (facebookresearch/detr
    ``models/matcher.py``: no log, no ``1 -``). The logits have C + 1 columns, the last one no-object, which no
    target may name."""

    extra_logits = 1

    def __call__(self, logits: Tensor, target_labels: Tensor) -> Tensor:
        """logits: (N, C + 1), target_labels: (T,) in [0, C) -> (N, T)."""
        return -logits.softmax(-1)[:, target_labels]


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising cost_class * C_class + cost_bbox * L1 + cost_giou * (-GIoU).

    ``class_cost`` computes C_class from the logits: :class:`FocalClassCost` (Deformable DETR, the default) or
    :class:`SoftmaxClassCost` (DETR).

    The assignment runs on the host (scipy). :meth:`match_layers` matches several prediction sets (the decoder
    layers, the encoder proposals) with ONE device-to-host transfer of all their cost matrices, the only point where
    a training step waits for the device before the loss is read.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 class_cost: FocalClassCost | SoftmaxClassCost | None = None) -> None:
        super().__init__()
        self.class_cost = class_cost if class_cost is not None else FocalClassCost()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0; at least one of cost_class/bbox/giou must be > 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def cost_matrix(self, outputs, targets: list[dict[str, Tensor]]) -> Tensor:
        """The costs of every (query, target) pair of the batch, on the outputs' device (no transfer).

        Args:
            outputs: ``pred_logits`` (batch, Q, C + class_cost.extra_logits) and ``pred_boxes`` (batch, Q, 4) cxcywh.
            targets: per image ``labels`` (n_b,) int64 in [0, C) and ``boxes`` (n_b, 4) normalised cxcywh.

        Returns:
            (batch, Q, sum n_b): image b's (Q, n_b) matrix is its columns ``sum n_<b`` to ``sum n_<=b``.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        batch, num_queries, num_logits = logits.shape
        num_classes = num_logits - self.class_cost.extra_logits
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
        out_boxes = boxes.flatten(0, 1)  # (batch*Q, 4)
        # Clamped so that a label out of range cannot fail the gather on the device (an asynchronous error that
        # ends the process) before the host sees the range check of :meth:`match_layers`; valid labels are unchanged.
        target_labels = torch.cat([t["labels"] for t in targets]).clamp(0, num_classes - 1)
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(out_boxes.dtype)

        cost_class = self.class_cost(logits.flatten(0, 1), target_labels)  # (batch*Q, sum n_b)
        cost_bbox = torch.cdist(out_boxes, target_boxes, p=1)
        cost_giou = -unchecked_generalized_box_iou(box_cxcywh_to_xyxy(out_boxes), box_cxcywh_to_xyxy(target_boxes))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return cost.view(batch, num_queries, -1)

    @torch.no_grad()
    def host_cost_matrices(self, layers: list[tuple[object, list[dict[str, Tensor]]]]) -> list[list[Tensor]]:
        """The cost matrices of several (outputs, targets) pairs, moved to the host in one transfer.

        Also checks, on the host copy, that every target label is in [0, C) and every target box has sides >= 0
        (ValueError naming the image) and that the costs are finite (FloatingPointError: the predictions are not).

        Returns:
            per pair, per image the (Q, n_b) cost matrix on the CPU, in the dtype the device computed it in.
        """
        device_costs, label_flags = [], []
        for outputs, targets in layers:
            cost = self.cost_matrix(outputs, targets)
            num_classes = outputs["pred_logits"].shape[-1] - self.class_cost.extra_logits
            # Per image: is a label outside [0, C), is a box side negative (or nan)? Read with the costs: no extra wait.
            label_flags += [torch.stack([((t["labels"] < 0) | (t["labels"] >= num_classes)).any(),
                                         ~(t["boxes"][:, 2:] >= 0).all()]).to(cost.dtype) for t in targets]
            device_costs.append(cost)
        flags = torch.stack(label_flags)  # (images of all pairs, 2)
        host = torch.cat([c.flatten() for c in device_costs] + [flags.flatten()]).cpu()  # the one transfer
        host_costs = host[:-flags.numel()].split([c.numel() for c in device_costs])
        flags = host[-flags.numel():].view(flags.shape)
        flag_index = 0
        per_layer = []
        for (outputs, targets), device_cost, host_cost in zip(layers, device_costs, host_costs):
            num_classes = outputs["pred_logits"].shape[-1] - self.class_cost.extra_logits
            for b, target in enumerate(targets):
                bad_label, bad_box = flags[flag_index + b].tolist()  # the host copy: no device wait
                if bad_label:
                    labels = target["labels"]
                    raise ValueError(f"targets[{b}]['labels'] must be in [0, {num_classes}), got values in "
                                     f"[{int(labels.min())}, {int(labels.max())}]")
                if bad_box:
                    raise ValueError(f"targets[{b}]['boxes'] has a box with a negative (or nan) width or height "
                                     "(expected normalised cxcywh boxes)")
            flag_index += len(targets)
            if not torch.isfinite(host_cost).all():
                raise FloatingPointError("matching costs are nan or inf: the predictions are not finite")
            sizes = [len(t["boxes"]) for t in targets]
            host_cost = host_cost.to(device_cost.dtype).view(device_cost.shape)  # (batch, Q, sum n_b)
            per_layer.append([c[b] for b, c in enumerate(host_cost.split(sizes, -1))])
        return per_layer

    @torch.no_grad()
    def cost_matrices(self, outputs, targets: list[dict[str, Tensor]]) -> list[Tensor]:
        """
        Args:
            outputs: ``pred_logits`` (batch, Q, C) and ``pred_boxes`` (batch, Q, 4) cxcywh.
            targets: per image ``labels`` (n_b,) int64 and ``boxes`` (n_b, 4) normalised cxcywh.

        Returns:
            per image the (Q, n_b) cost matrix, on the CPU.
        """
        return self.host_cost_matrices([(outputs, targets)])[0]

    @torch.no_grad()
    def match_layers(self, layers: list[tuple[object, list[dict[str, Tensor]]]]) -> list[Indices]:
        """:meth:`forward` for several (outputs, targets) pairs with one device -> host transfer for all of them.
        Returns, per pair, what :meth:`forward` returns (host tensors)."""
        indices = []
        for costs in self.host_cost_matrices(layers):
            pairs = []
            for cost in costs:
                rows, cols = linear_sum_assignment(cost.numpy())
                pairs.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
            indices.append(pairs)
        return indices

    @torch.no_grad()
    def forward(self, outputs, targets: list[dict[str, Tensor]]) -> Indices:
        """Per image (query indices, target indices), int64 on the CPU, each of length min(Q, n_b), sorted by
        query."""
        return self.match_layers([(outputs, targets)])[0]
