"""Official-format checkpoints: round trip, strict loading, class-head mismatch, bad files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from deformable_detr import build_model
from deformable_detr.checkpoint import (
    CheckpointError,
    load_checkpoint,
    make_checkpoint,
    read_checkpoint,
    save_checkpoint,
    stored_configs,
)
from deformable_detr.config import DataConfig, RunConfigs, TrainConfig, model_config
from deformable_detr.model.build import build_from_config

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


def _format_1_args(**changes) -> argparse.Namespace:
    """The training flags deformable-detr 0.1 stored in every checkpoint of ddetr train."""
    recorded = json.loads((Path(__file__).parent / "data" / "format1_train_args.json").read_text())["args"]
    return argparse.Namespace(**{**recorded, **changes})


def test_a_checkpoint_of_deformable_detr_0_1_still_loads(tmp_path, monkeypatch):
    """Format 1 kept the flags as a Namespace holding the CLI handler by reference (GLOBAL
    deformable_detr.cli._train), which plain safe loading refuses; it is read, and its model is rebuilt as 0.1 built
    it: the variant preset won over --num_feature_levels."""
    from deformable_detr import cli
    from deformable_detr.checkpoint_config import config_from_checkpoint

    def _train(args):  # what 0.1's cli._train was to the pickle: a module-level function, stored by reference
        raise AssertionError("never called")

    _train.__module__, _train.__qualname__ = "deformable_detr.cli", "_train"
    monkeypatch.setattr(cli, "_train", _train, raising=False)
    old_model, _, _ = build_model("single_scale", num_classes=6, **SMALL)
    args = _format_1_args(variant="single_scale", num_feature_levels=4, backbone="resnet18", hidden_dim=64, nheads=4,
                          enc_layers=1, dec_layers=2, dim_feedforward=128, num_queries=10, val_size=64, max_size=96,
                          crop_sizes=[64, 48, 64], train_images="t", train_json="t.json", val_images="v",
                          val_json="v.json", handler=_train)
    path = tmp_path / "old.pth"
    torch.save({"model": old_model.state_dict(), "args": args, "epoch": 3, "categories": {1: "a"}}, path)
    monkeypatch.undo()
    with torch.serialization.safe_globals([argparse.Namespace]), pytest.raises(
            Exception, match="GLOBAL deformable_detr.cli._train"):
        torch.load(path, weights_only=True)  # what broke every command after ddetr train

    checkpoint = read_checkpoint(path)
    configs = stored_configs(checkpoint, str(path))
    assert configs.model == model_config("single_scale", num_classes=6, **SMALL)
    assert (configs.data.val_size, configs.data.crop_resize_sizes, configs.data.crop_size) == (64, (64,), (48, 64))
    assert configs.data.train_json == "t.json" and configs.train.epochs == 50
    assert config_from_checkpoint(checkpoint, str(path)) == configs.model
    fresh, _, _ = build_from_config(configs.model)
    load_checkpoint(fresh, path)  # strict


def test_a_checkpoint_of_a_newer_format_says_so(tmp_path):
    model, _, _ = build_model("single_scale", num_classes=5, **SMALL)
    path = tmp_path / "newer.pth"
    save_checkpoint(path, {"model": model.state_dict(), "format": "deformable-detr", "format_version": 3})
    with pytest.raises(CheckpointError, match="format version 3, this version of deformable-detr reads 2"):
        read_checkpoint(path)


def test_our_checkpoint_holds_plain_data_only(tmp_path):
    model, _, _ = build_model("single_scale", num_classes=5, **SMALL)
    configs = RunConfigs(model_config("single_scale", num_classes=5, **SMALL), TrainConfig(lr_drop_epochs=(3, 7)),
                         DataConfig(coco_path="coco"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [3, 7])
    path = tmp_path / "ours.pth"
    save_checkpoint(path, make_checkpoint(model.state_dict(), configs, {1: "cat"}, optimizer=optimizer.state_dict(),
                                          lr_scheduler=scheduler.state_dict(), epoch=2))
    loaded = torch.load(path, weights_only=True)  # nothing allowed beyond tensors and plain data
    assert stored_configs(loaded, "ours.pth") == configs and loaded["categories"] == {1: "cat"}
