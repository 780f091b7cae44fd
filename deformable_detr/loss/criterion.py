"""Set-prediction loss of Deformable DETR: sigmoid focal classification, L1 and GIoU box losses, per decoder layer
and (two-stage) for the encoder proposals."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from deformable_detr.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from deformable_detr.device import upload
from deformable_detr.loss.matcher import HungarianMatcher

LOSSES = ("labels", "boxes", "cardinality")


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, num_boxes: float | Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al. 2017, eq. 5) on independent sigmoid classes.

    inputs, targets: (batch, Q, C) logits and {0, 1} labels. Returns mean over queries, summed, / num_boxes.
    """
    probabilities = inputs.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = probabilities * targets + (1 - probabilities) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return per_box(loss.mean(1).sum(), num_boxes)


def per_box(total: Tensor, num_boxes: float | Tensor) -> Tensor:
    """``total / num_boxes`` with the official rounding when ``num_boxes`` stays on the device (distributed runs).

    The official code divides by a host float, which CUDA computes as ``total * (1 / num_boxes)`` (its division by
    a host scalar multiplies by the reciprocal), the CPU as a true division: the same here for a device tensor.
    """
    if isinstance(num_boxes, Tensor) and total.device.type == "cuda":
        return total * num_boxes.reciprocal()
    return total / num_boxes


class SetCriterion(nn.Module):
    """Matches predictions to targets (Hungarian), then computes the losses on the matched pairs.

    Keys of the returned dict: ``loss_ce``, ``class_error`` (logging), ``loss_bbox``, ``loss_giou``,
    ``cardinality_error`` (logging); the same with suffix ``_i`` for auxiliary decoder layer i (without
    ``class_error``) and ``_enc`` for the two-stage encoder proposals. ``weight_dict`` says which keys enter the
    total loss and with which weight.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 losses: tuple[str, ...] = LOSSES, focal_alpha: float = 0.25) -> None:
        super().__init__()
        unknown = set(losses) - set(LOSSES)
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}; valid: {LOSSES}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.losses = tuple(losses)
        self.focal_alpha = focal_alpha

    @staticmethod
    def _prediction_index(indices: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """(batch index, query index) of every matched prediction."""
        batch_index = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        query_index = torch.cat([src for src, _ in indices])
        return batch_index, query_index

    def loss_labels(self, outputs, targets, indices, num_boxes: float | Tensor, log: bool = True) -> dict[str, Tensor]:
        logits = outputs["pred_logits"]
        index = self._prediction_index(indices)
        matched_labels = torch.cat([t["labels"][target] for t, (_, target) in zip(targets, indices)])
        # Unmatched queries get the extra index num_classes, dropped from the one-hot: all-zero targets.
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[index] = matched_labels.to(logits.device)
        one_hot = torch.zeros([logits.shape[0], logits.shape[1], logits.shape[2] + 1], dtype=logits.dtype,
                              device=logits.device)
        one_hot.scatter_(2, target_classes.unsqueeze(-1), 1)
        one_hot = one_hot[:, :, :-1]
        # The official loss multiplies the per-query mean back by Q: a sum over queries, normalised by num_boxes.
        loss_ce = sigmoid_focal_loss(logits, one_hot, num_boxes, alpha=self.focal_alpha, gamma=2) * logits.shape[1]
        losses = {"loss_ce": loss_ce}
        if log:
            losses["class_error"] = 100 - top1_accuracy(logits[index], matched_labels)
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes: float | Tensor) -> dict[str, Tensor]:
        """Logging only: |#predictions whose argmax is not the last class - #targets|, averaged over images.
        (A convention inherited from DETR's "no object" class; with sigmoid classes it is about |Q - n_b|.)"""
        logits = outputs["pred_logits"]
        # (batch,) written on the device, one fill each, rather than copied from a host list (which waits)
        target_lengths = torch.stack([torch.full((), len(t["labels"]), device=logits.device) for t in targets])
        predicted_count = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(predicted_count.float(), target_lengths.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes: float | Tensor) -> dict[str, Tensor]:
        index = self._prediction_index(indices)
        predicted = outputs["pred_boxes"][index]
        target_boxes = torch.cat([t["boxes"][target] for t, (_, target) in zip(targets, indices)], dim=0)
        target_boxes = target_boxes.to(predicted)
        loss_bbox = F.l1_loss(predicted, target_boxes, reduction="none")
        loss_giou = 1 - elementwise_generalized_box_iou(box_cxcywh_to_xyxy(predicted), box_cxcywh_to_xyxy(target_boxes))
        return {"loss_bbox": per_box(loss_bbox.sum(), num_boxes), "loss_giou": per_box(loss_giou.sum(), num_boxes)}

    def _losses_for(self, outputs, targets, indices, num_boxes: float | Tensor, log_class_error: bool
                    ) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        for name in self.losses:
            if name == "labels":
                losses.update(self.loss_labels(outputs, targets, indices, num_boxes, log=log_class_error))
            elif name == "boxes":
                losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
            else:
                losses.update(self.loss_cardinality(outputs, targets, indices, num_boxes))
        return losses

    @staticmethod
    def average_num_boxes(targets: list[dict[str, Tensor]], device: torch.device) -> float | Tensor:
        """Number of target boxes per process, averaged over all processes, at least 1 (the loss normaliser).

        A Python float in a single process (the count is known on the host). Distributed, the 0-dim float32 tensor
        that the all-reduce leaves on ``device``, not read back (the official code's ``.item()`` would wait for the
        device); :func:`per_box` divides by it as the official code divides by the value read.
        """
        count = float(sum(len(t["labels"]) for t in targets))
        if not (dist.is_available() and dist.is_initialized()):
            return max(count, 1.0)
        # torch.full writes the value on the device: no host -> device copy.
        num_boxes = torch.full((1,), count, dtype=torch.float32, device=device)
        dist.all_reduce(num_boxes)
        return torch.clamp(num_boxes / dist.get_world_size(), min=1)[0]

    def forward(self, outputs, targets: list[dict[str, Tensor]], return_indices: bool = False):
        """
        Args:
            outputs: the detector's output (``pred_logits``, ``pred_boxes``, ``aux_outputs``, ``enc_outputs``).
            targets: per image ``labels`` (n_b,) int64 in [0, num_classes) and ``boxes`` (n_b, 4) normalised cxcywh.
            return_indices: also return the matcher's indices, {"final": ..., "aux": [...], "enc": ...}.

        Returns:
            dict name -> scalar tensor (and the indices when asked, on the CPU).

        The host waits for the device once: the matcher reads the cost matrices of every decoder layer and of the
        encoder proposals in one transfer (it also checks the labels' range there); the assignments go back in one
        non-blocking copy.
        """
        for b, target in enumerate(targets):
            labels, boxes = target["labels"], target["boxes"]
            if boxes.dim() != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
                raise ValueError(f"targets[{b}]: expected boxes (n, 4) and labels (n,), got "
                                 f"{tuple(boxes.shape)} and {tuple(labels.shape)}")
        main_outputs = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
        device = main_outputs["pred_logits"].device
        num_boxes = self.average_num_boxes(targets, device)

        # (name, outputs, targets, log_class_error) in the official order of the loss dict
        layers = [("", main_outputs, targets, True)]
        for layer, aux_outputs in enumerate(outputs["aux_outputs"] if "aux_outputs" in outputs else []):
            layers.append((f"_{layer}", aux_outputs, targets, False))
        if "enc_outputs" in outputs and outputs["enc_outputs"] is not None:
            # The proposals are trained class-agnostically: every target becomes class 0.
            binary_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            layers.append(("_enc", outputs["enc_outputs"], binary_targets, False))
        host_indices = self.matcher.match_layers([(layer_outputs, layer_targets)
                                                  for _, layer_outputs, layer_targets, _ in layers])
        device_indices = self._upload_indices(host_indices, device)

        losses: dict[str, Tensor] = {}
        for (suffix, layer_outputs, layer_targets, log_class_error), indices in zip(layers, device_indices):
            layer_losses = self._losses_for(layer_outputs, layer_targets, indices, num_boxes, log_class_error)
            losses.update({f"{k}{suffix}": v for k, v in layer_losses.items()})
        if return_indices:
            all_indices = {"final": host_indices[0],
                           "aux": host_indices[1:len(layers) - (1 if layers[-1][0] == "_enc" else 0)]}
            if layers[-1][0] == "_enc":
                all_indices["enc"] = host_indices[-1]
            return losses, all_indices
        return losses

    @staticmethod
    def _upload_indices(host_indices: list[list[tuple[Tensor, Tensor]]], device: torch.device
                        ) -> list[list[tuple[Tensor, Tensor]]]:
        """The matcher's host indices (per layer, per image (queries, targets)) on ``device``, in one copy."""
        flat = [index for layer in host_indices for pair in layer for index in pair]
        on_device = upload(torch.cat(flat), device).split([len(index) for index in flat])
        per_layer, position = [], 0
        for layer in host_indices:
            per_layer.append([(on_device[position + 2 * b], on_device[position + 2 * b + 1])
                              for b in range(len(layer))])
            position += 2 * len(layer)
        return per_layer

    def total_loss(self, losses: dict[str, Tensor]) -> Tensor:
        """The weighted sum that training minimises, in the loss dict's order (as the official engine does)."""
        return sum(losses[k] * self.weight_dict[k] for k in losses if k in self.weight_dict)


@torch.no_grad()
def top1_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Percentage of rows whose argmax is the label; 0 when there are no rows (as the official ``accuracy``)."""
    if labels.numel() == 0:
        return torch.zeros([], device=logits.device)
    predicted = logits.topk(1, 1, True, True)[1].t()
    correct = predicted.eq(labels.view(1, -1).expand_as(predicted))
    return correct[:1].reshape(-1).float().sum(0) * 100.0 / labels.shape[0]


def build_weight_dict(cls_loss_coef: float, bbox_loss_coef: float, giou_loss_coef: float, dec_layers: int,
                      aux_loss: bool = True) -> dict[str, float]:
    """The official weight dict: main keys, ``_0.._{L-2}`` for the auxiliary layers, ``_enc`` (always present
    with aux_loss, used by two-stage only)."""
    weight_dict = {"loss_ce": cls_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    if aux_loss:
        base = dict(weight_dict)
        for layer in range(dec_layers - 1):
            weight_dict.update({f"{k}_{layer}": v for k, v in base.items()})
        weight_dict.update({f"{k}_enc": v for k, v in base.items()})
    return weight_dict
