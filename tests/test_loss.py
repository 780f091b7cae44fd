"""Matcher and criterion on hand-built cases with known answers, including images without targets."""

from __future__ import annotations

import math

import pytest
import torch

from deformable_detr.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from deformable_detr.loss.criterion import SetCriterion, build_weight_dict, sigmoid_focal_loss
from deformable_detr.loss.matcher import HungarianMatcher


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_generalized_box_iou_known_values():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[0.5, 0.0, 1.5, 1.0], [2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    giou = generalized_box_iou(a, b)
    # Overlap 0.5, union 1.5, hull 1.5 -> 1/3; disjoint with a gap of 1: iou 0, hull 3, union 2 -> -1/3; identical 1.
    assert torch.allclose(giou, torch.tensor([[1 / 3, -1 / 3, 1.0]]))
    with pytest.raises(ValueError, match="x1 < x0"):
        generalized_box_iou(a, torch.tensor([[1.0, 0.0, 0.0, 1.0]]))


def test_matcher_assigns_the_obvious_pairs():
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]]])
    logits = torch.full((1, 3, 4), -5.0)
    logits[0, 0, 1] = 3.0  # query 0 says class 1
    logits[0, 1, 2] = 3.0  # query 1 says class 2
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    # Target 0 is query 1's box and class, target 1 is query 0's.
    targets = [{"labels": torch.tensor([2, 1]), "boxes": torch.tensor([[0.7, 0.7, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]])}]
    (rows, cols), = HungarianMatcher()(outputs, targets)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]


def test_matcher_cost_is_the_weighted_sum_of_its_terms():
    logits = torch.tensor([[[_logit(0.3), _logit(0.6)]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4]]])
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.2]])}
    cost, = HungarianMatcher(2, 5, 2).cost_matrices({"pred_logits": logits, "pred_boxes": boxes}, [target])
    p = 0.6
    focal = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)
    l1 = 0.1 + 0.0 + 0.0 + 0.2
    # pred xyxy (0.4, 0.3, 0.6, 0.7), target (0.3, 0.4, 0.5, 0.6): inter 0.1*0.2, union 0.08+0.04-0.02, hull 0.3*0.4
    giou = 0.02 / 0.10 - (0.12 - 0.10) / 0.12
    assert cost.item() == pytest.approx(2 * focal + 5 * l1 - 2 * giou, rel=1e-5)


def test_focal_loss_matches_its_formula():
    logits = torch.tensor([[[_logit(0.9), _logit(0.2)]]], dtype=torch.float64)
    targets = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    expected = 0.25 * 0.1**2 * -math.log(0.9) + 0.75 * 0.2**2 * -math.log(0.8)
    # mean over the one query, sum, / num_boxes=2
    assert sigmoid_focal_loss(logits, targets, 2.0).item() == pytest.approx(expected / 2)


def _criterion(num_classes=3):
    return SetCriterion(num_classes, HungarianMatcher(), build_weight_dict(2, 5, 2, dec_layers=2))


def test_criterion_perfect_boxes_and_an_image_without_targets():
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.2, 0.4]], [[0.5, 0.5, 0.5, 0.5], [0.2, 0.8, 0.1, 0.1]]])
    logits = torch.full((2, 2, 3), -4.0)
    logits[0, 1, 2] = 4.0
    outputs = {"pred_logits": logits, "pred_boxes": boxes,
               "aux_outputs": [{"pred_logits": logits.clone(), "pred_boxes": boxes.clone()}]}
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.6, 0.6, 0.2, 0.4]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    criterion = _criterion()
    losses, indices = criterion(outputs, targets, return_indices=True)
    assert indices["final"][0][0].tolist() == [1] and indices["final"][1][0].numel() == 0
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-7)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["class_error"].item() == 0.0
    assert losses["loss_bbox_0"].item() == pytest.approx(0.0, abs=1e-7)
    # Focal loss: every logit is at +-4 on the right side; sum over the 12 logits, mean over 2 queries * 2, / 1 box.
    p = torch.sigmoid(torch.tensor(4.0, dtype=torch.float64)).item()
    per_logit = 0.75 * (1 - p) ** 2 * -math.log(p)  # negatives at -4 (weight 1 - alpha)
    positive = 0.25 * (1 - p) ** 2 * -math.log(p)
    expected = (11 * per_logit + positive) / 2 * 2
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-5)
    assert set(criterion.weight_dict) >= {"loss_ce_0", "loss_bbox_0", "loss_giou_0", "loss_ce_enc"}
    total = criterion.total_loss(losses)
    assert total.item() == pytest.approx(2 * (losses["loss_ce"] + losses["loss_ce_0"]).item(), rel=1e-5, abs=1e-6)


def test_criterion_with_no_target_at_all_is_finite_and_backpropagates():
    logits = torch.randn(2, 4, 3, requires_grad=True)
    boxes = torch.rand(2, 4, 4).mul(0.5).add(0.25).requires_grad_(True)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    criterion = _criterion()
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    assert losses["class_error"].item() == 100.0  # the official accuracy() returns 0 with no targets
    criterion.total_loss(losses).backward()
    assert torch.isfinite(logits.grad).all()


def test_criterion_rejects_labels_outside_num_classes():
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": torch.full((1, 2, 4), 0.5)}
    targets = [{"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}]
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must be in \[0, 3\)"):
        _criterion()(outputs, targets)


def test_official_weight_dict():
    weights = build_weight_dict(2, 5, 2, dec_layers=6)
    assert list(weights)[:6] == ["loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"]
    assert len(weights) == 21 and weights["loss_giou_enc"] == 2 and weights["loss_bbox_4"] == 5


def test_box_conversion_round_trip():
    boxes = torch.tensor([[0.5, 0.4, 0.2, 0.6]])
    assert torch.allclose(box_cxcywh_to_xyxy(boxes), torch.tensor([[0.4, 0.1, 0.6, 0.7]]))
