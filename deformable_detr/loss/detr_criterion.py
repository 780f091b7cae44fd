"""DETR's set-prediction loss (facebookresearch/detr ``models/detr.py`` ``SetCriterion``): softmax cross-entropy
over ``num_classes + 1`` logits with a down-weighted no-object class, and the L1 and GIoU box losses of
:class:`~deformable_detr.loss.criterion.SetCriterion`, whose matching, layer loop and logging it shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from deformable_detr.loss.criterion import LOSSES, SetCriterion, top1_accuracy
from deformable_detr.loss.matcher import HungarianMatcher


class DETRCriterion(SetCriterion):
    """:class:`SetCriterion` with DETR's classification loss.

    ``loss_ce`` = ``F.cross_entropy`` over ALL batch x Q queries, the unmatched ones targeting the no-object class
    (index ``num_classes``), with class weights ``empty_weight`` (1, and ``eos_coef`` for no-object): PyTorch's
    weighted mean, so the weights' sum over the queries is the denominator (not num_boxes). ``cardinality_error``
    counts the queries whose argmax is not no-object: meaningful here, since the last logit IS no-object.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 eos_coef: float = 0.1, losses: tuple[str, ...] = LOSSES) -> None:
        super().__init__(num_classes, matcher, weight_dict, losses)
        if not 0.0 < eos_coef <= 1.0:
            raise ValueError(f"eos_coef must be in (0, 1], got {eos_coef}")
        if matcher.class_cost.extra_logits != 1:
            raise ValueError(f"DETR's matcher needs a class cost over num_classes + 1 logits (SoftmaxClassCost), got "
                             f"{type(matcher.class_cost).__name__}")
        self.eos_coef = eos_coef
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        # A buffer of the criterion, not of the model: it is in no model checkpoint, as in the official code.
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, outputs, targets, indices, num_boxes: float | Tensor, log: bool = True) -> dict[str, Tensor]:
        """outputs["pred_logits"]: (batch, Q, num_classes + 1) -> loss_ce (and class_error, logging)."""
        logits = outputs["pred_logits"]
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"pred_logits has {logits.shape[-1]} logits per query, DETR's criterion expects "
                             f"num_classes + 1 = {self.num_classes + 1}")
        index = self._prediction_index(indices)
        matched_labels = torch.cat([t["labels"][target] for t, (_, target) in zip(targets, indices)])
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[index] = matched_labels.to(logits.device)
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.dtype))
        losses = {"loss_ce": loss_ce}
        if log:
            losses["class_error"] = 100 - top1_accuracy(logits[index], matched_labels)
        return losses
