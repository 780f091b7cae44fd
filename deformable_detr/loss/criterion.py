"""Set-prediction loss of Deformable DETR: sigmoid focal classification, L1 and GIoU box losses, per decoder layer
and (two-stage) for the encoder proposals."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from deformable_detr.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from deformable_detr.loss.matcher import HungarianMatcher

LOSSES = ("labels", "boxes", "cardinality")


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25,
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
    return loss.mean(1).sum() / num_boxes


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

    def loss_labels(self, outputs, targets, indices, num_boxes: float, log: bool = True) -> dict[str, Tensor]:
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
    def loss_cardinality(self, outputs, targets, indices, num_boxes: float) -> dict[str, Tensor]:
        """Logging only: |#predictions whose argmax is not the last class - #targets|, averaged over images.
        (A convention inherited from DETR's "no object" class; with sigmoid classes it is about |Q - n_b|.)"""
        logits = outputs["pred_logits"]
        target_lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        predicted_count = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(predicted_count.float(), target_lengths.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes: float) -> dict[str, Tensor]:
        index = self._prediction_index(indices)
        predicted = outputs["pred_boxes"][index]
        target_boxes = torch.cat([t["boxes"][target] for t, (_, target) in zip(targets, indices)], dim=0)
        target_boxes = target_boxes.to(predicted)
        loss_bbox = F.l1_loss(predicted, target_boxes, reduction="none")
        loss_giou = 1 - elementwise_generalized_box_iou(box_cxcywh_to_xyxy(predicted), box_cxcywh_to_xyxy(target_boxes))
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    def _losses_for(self, outputs, targets, indices, num_boxes: float, log_class_error: bool) -> dict[str, Tensor]:
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
    def average_num_boxes(targets: list[dict[str, Tensor]], device: torch.device) -> float:
        """Number of target boxes per process, averaged over all processes, at least 1 (the loss normaliser)."""
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            world_size = dist.get_world_size()
        return torch.clamp(num_boxes / world_size, min=1).item()

    def forward(self, outputs, targets: list[dict[str, Tensor]], return_indices: bool = False):
        """
        Args:
            outputs: the detector's output (``pred_logits``, ``pred_boxes``, ``aux_outputs``, ``enc_outputs``).
            targets: per image ``labels`` (n_b,) int64 in [0, num_classes) and ``boxes`` (n_b, 4) normalised cxcywh.
            return_indices: also return the matcher's indices, {"final": ..., "aux": [...], "enc": ...}.

        Returns:
            dict name -> scalar tensor (and the indices when asked).
        """
        for b, target in enumerate(targets):
            labels, boxes = target["labels"], target["boxes"]
            if boxes.dim() != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
                raise ValueError(f"targets[{b}]: expected boxes (n, 4) and labels (n,), got "
                                 f"{tuple(boxes.shape)} and {tuple(labels.shape)}")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"targets[{b}]['labels'] must be in [0, {self.num_classes}), "
                                 f"got values in [{int(labels.min())}, {int(labels.max())}]")
        main_outputs = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
        device = main_outputs["pred_logits"].device
        num_boxes = self.average_num_boxes(targets, device)

        all_indices: dict = {}
        indices = self.matcher(main_outputs, targets)
        all_indices["final"] = indices
        losses = self._losses_for(main_outputs, targets, indices, num_boxes, log_class_error=True)

        all_indices["aux"] = []
        for layer, aux_outputs in enumerate(outputs["aux_outputs"] if "aux_outputs" in outputs else []):
            indices = self.matcher(aux_outputs, targets)
            all_indices["aux"].append(indices)
            layer_losses = self._losses_for(aux_outputs, targets, indices, num_boxes, log_class_error=False)
            losses.update({f"{k}_{layer}": v for k, v in layer_losses.items()})

        if "enc_outputs" in outputs and outputs["enc_outputs"] is not None:
            # The proposals are trained class-agnostically: every target becomes class 0.
            binary_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            indices = self.matcher(outputs["enc_outputs"], binary_targets)
            all_indices["enc"] = indices
            enc_losses = self._losses_for(outputs["enc_outputs"], binary_targets, indices, num_boxes,
                                          log_class_error=False)
            losses.update({f"{k}_enc": v for k, v in enc_losses.items()})
        if return_indices:
            return losses, all_indices
        return losses

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
