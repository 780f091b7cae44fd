"""Optimizer groups of the official recipe, collected from module references."""

from __future__ import annotations

import copy

import pytest
import torch

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


@pytest.mark.parametrize("sgd", [False, True])
def test_the_fused_update_follows_torchs_reference_loop_and_shares_its_state_layout(sgd):
    """build_optimizer picks torch's fused kernel on the CPU; after a few steps (and a state handed over from the
    for-loop implementation half-way, as a checkpoint written before the switch would be) the parameters equal those
    of torch's per-tensor for-loop optimizer to float32 rounding."""
    torch.manual_seed(0)
    model, _, _ = build_model("deformable_detr", num_classes=5, **SMALL)
    reference_model = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters()]
    fused = build_optimizer(model, sgd=sgd)
    assert all(group["fused"] for group in fused.param_groups)
    # The deep copy keeps the parameter order: the same groups over the copy's parameters, same hyper-parameters.
    position = {id(p): i for i, p in enumerate(model.parameters())}
    reference_params = list(reference_model.parameters())
    groups = [{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")}
              | {"params": [reference_params[position[id(p)]] for p in g["params"]]} for g in fused.param_groups]
    loop = (torch.optim.SGD(groups, foreach=False) if sgd else torch.optim.AdamW(groups, foreach=False))
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        for p, q in zip(model.parameters(), reference_model.parameters()):
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=generator)
                q.grad = p.grad.clone()
        fused.step()
        loop.step()
        if step == 1:
            fused.load_state_dict(copy.deepcopy(loop.state_dict()))  # as read from a checkpoint: own tensors
            for p, q in zip(model.parameters(), reference_model.parameters()):
                p.data.copy_(q.data)
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    assert all(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), initial) if p.requires_grad)
