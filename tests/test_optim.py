"""Optimizer groups of the official recipe, collected from module references."""

from __future__ import annotations

import pytest

from deformable_detr import build_model
from deformable_detr.training.optimizer import build_optimizer

SMALL = dict(backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=128,
             num_queries=10)


@pytest.mark.parametrize("variant", ["deformable_detr", "two_stage"])
def test_groups_match_the_official_name_rules(variant):
    model, _, _ = build_model(variant, num_classes=5, **SMALL)
    optimizer = build_optimizer(model, lr=2e-4, lr_backbone=2e-5, lr_linear_proj_mult=0.1)
    by_group = {g["name"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"transformer_and_heads": 2e-4, "backbone": 2e-5,
                                 "sampling_offsets_and_reference_points": 2e-5})
    # The official main.py selects by name substrings; the module-reference groups must agree with it.
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if "backbone.0" in name:
            expected = "backbone"
        elif "reference_points" in name or "sampling_offsets" in name:
            expected = "sampling_offsets_and_reference_points"
        else:
            expected = "transformer_and_heads"
        assert id(parameter) in by_group[expected], name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(
        {id(p) for p in model.parameters() if p.requires_grad})
