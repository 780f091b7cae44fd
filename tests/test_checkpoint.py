"""Official-format checkpoints: round trip, strict loading, class-head mismatch, bad files."""

from __future__ import annotations

import argparse

import pytest
import torch

from deformable_detr import build_model
from deformable_detr.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint

SMALL = dict(backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=128,
             num_queries=10)


def _official_style_checkpoint(model) -> dict:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 40)
    args = argparse.Namespace(lr=2e-4, with_box_refine=True, two_stage=False, num_feature_levels=4)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(), "epoch": 12, "args": args}


def test_round_trip_loads_strictly_and_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model, _, _ = build_model("box_refine", num_classes=5, **SMALL)
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, _official_style_checkpoint(model))
    torch.manual_seed(1)
    fresh, _, _ = build_model("box_refine", num_classes=5, **SMALL)
    checkpoint = load_checkpoint(fresh, path)
    assert checkpoint["epoch"] == 12 and checkpoint["args"].with_box_refine
    images = torch.randn(1, 3, 64, 64)
    model.eval(), fresh.eval()
    assert torch.equal(model(images).pred_logits, fresh(images).pred_logits)
    assert fresh.transformer.decoder.bbox_embed is fresh.bbox_embed  # tying survives loading
    assert not list(tmp_path.glob(".*.tmp")), "the atomic write left its temporary file behind"


def test_other_num_classes_names_key_and_shapes_and_can_drop_heads(tmp_path):
    model, _, _ = build_model("deformable_detr", num_classes=91, **SMALL)
    path = tmp_path / "coco.pth"
    save_checkpoint(path, {"model": model.state_dict()})
    target, _, _ = build_model("deformable_detr", num_classes=4, **SMALL)
    with pytest.raises(CheckpointError, match=r"'class_embed.0.weight' has shape \(91, 64\), the model expects "
                                              r"\(4, 64\).*drop_class_heads=True"):
        load_checkpoint(target, path)
    before = target.class_embed[0].weight.clone()
    load_checkpoint(target, path, drop_class_heads=True)
    assert torch.equal(target.class_embed[0].weight, before)
    assert torch.equal(target.bbox_embed[0].layers[0].weight, model.bbox_embed[0].layers[0].weight)


def test_another_variant_is_refused_with_the_keys(tmp_path):
    model, _, _ = build_model("two_stage", num_classes=5, **SMALL)
    path = tmp_path / "two_stage.pth"
    save_checkpoint(path, {"model": model.state_dict()})
    other, _, _ = build_model("deformable_detr", num_classes=5, **SMALL)
    with pytest.raises(CheckpointError, match="missing key.*query_embed.weight"):
        load_checkpoint(other, path)


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "absent.pth")
    model, _, _ = build_model("single_scale", num_classes=5, **SMALL)
    good = tmp_path / "good.pth"
    save_checkpoint(good, {"model": model.state_dict()})
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        read_checkpoint(truncated)
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": [1, 2, 3]}, foreign)
    with pytest.raises(CheckpointError, match="not a Deformable DETR checkpoint.*'weights'"):
        read_checkpoint(foreign)
