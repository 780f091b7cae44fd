"""Training and evaluation through their Python API, ``train(model_cfg, train_cfg, data_cfg)`` and
``evaluate_checkpoint``: learning, the log format, checkpoints any command reads, resume equality, settings that
travel with the checkpoint, bad input before any work."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from deformable_detr.checkpoint import CheckpointError, read_checkpoint, stored_configs
from deformable_detr.config import ConfigError, DataConfig, ModelConfig, TrainConfig, model_config
from deformable_detr.data import make_synthetic_dataset
from deformable_detr.loss.criterion import SetCriterion
from deformable_detr.training.engine import NonFiniteLossError
from deformable_detr.training.train import evaluate_checkpoint, run_configs_from_settings, train

TINY_MODEL = model_config("deformable_detr", backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1,
                          dec_layers=2, dim_feedforward=64, num_queries=10)
TINY_TRAIN = TrainConfig(pretrained_backbone="none", device="cpu", progress=False, print_freq=0, lr_backbone=2e-4)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=8, num_val=4, image_size=64,
                                  seed=0)


def _data(synthetic) -> DataConfig:
    return DataConfig(train_images=str(synthetic.train_images), train_json=str(synthetic.train_json),
                      val_images=str(synthetic.val_images), val_json=str(synthetic.val_json), train_scales=(64,),
                      crop_resize_sizes=(64,), crop_size=(48, 64), val_size=64, max_size=80, num_workers=0)


def _train(synthetic, output_dir, model: ModelConfig = TINY_MODEL, **train_settings) -> dict:
    return train(model, dataclasses.replace(TINY_TRAIN, output_dir=str(output_dir), **train_settings),
                 _data(synthetic))


def test_training_learns_and_logs_the_official_keys(synthetic, tmp_path):
    # 48 steps at a high learning rate without dropout: enough for this tiny model's loss to fall clearly.
    _train(synthetic, tmp_path, dataclasses.replace(TINY_MODEL, dropout=0.0), epochs=12, eval_every=6, lr=1e-3,
           lr_backbone=1e-3)
    entries = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in entries] == list(range(12))
    assert entries[-1]["train_loss"] < 0.8 * entries[0]["train_loss"], [e["train_loss"] for e in entries]
    assert len(entries[-1]["test_coco_eval_bbox"]) == 12 and "test_coco_eval_bbox" in entries[5]
    for key in ("train_loss", "train_loss_ce", "train_loss_bbox_0", "train_loss_giou_unscaled", "train_class_error",
                "train_lr", "train_grad_norm", "test_loss", "test_class_error", "n_parameters"):
        assert key in entries[-1], key
    assert (tmp_path / "checkpoint0009.pth").is_file()  # every 5 epochs, as the official main.py


def test_checkpoints_hold_plain_data_and_the_configs(synthetic, tmp_path):
    _train(synthetic, tmp_path, epochs=1, eval_every=100)
    # The official layout, readable with nothing allowed beyond tensors and plain data.
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "epoch"} <= set(checkpoint) and checkpoint["epoch"] == 0
    assert checkpoint["format_version"] == 2 and "args" not in checkpoint
    assert checkpoint["categories"] == {1: "rectangle", 2: "ellipse", 3: "triangle", 4: "cross", 5: "star"}
    configs = stored_configs(checkpoint, "checkpoint.pth")
    # num_classes None was resolved from the data (largest category id 5 + 1) before it was stored.
    assert configs.model == dataclasses.replace(TINY_MODEL, num_classes=6)
    assert configs.train == dataclasses.replace(TINY_TRAIN, output_dir=str(tmp_path), epochs=1, eval_every=100)
    assert configs.data == _data(synthetic)


def test_resume_equals_an_uninterrupted_run(synthetic, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    _train(synthetic, straight, epochs=2, eval_every=100)
    _train(synthetic, interrupted, epochs=1, eval_every=100)
    # The settings come back from the checkpoint: only the new epoch count is given.
    configs = run_configs_from_settings({"model": {}, "train": {"resume": str(interrupted / "checkpoint.pth"),
                                                              "epochs": 2}, "data": {}})
    assert configs.model == dataclasses.replace(TINY_MODEL, num_classes=6)
    assert configs.data == _data(synthetic) and configs.train.output_dir == str(interrupted)
    train(configs.model, configs.train, configs.data)
    a = read_checkpoint(straight / "checkpoint.pth")
    b = read_checkpoint(interrupted / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 1
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert a["lr_scheduler"] == b["lr_scheduler"]


def test_evaluating_a_checkpoint_gives_the_training_log_numbers(synthetic, tmp_path):
    log = _train(synthetic, tmp_path, epochs=1)
    # No model settings: the model, the data and the sizes come from the checkpoint.
    stats = evaluate_checkpoint(tmp_path / "checkpoint.pth", train_cfg=dataclasses.replace(
        TINY_TRAIN, output_dir=str(tmp_path / "eval")))
    assert stats["test_coco_eval_bbox"] == log["test_coco_eval_bbox"]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == stats
    with pytest.raises(ConfigError, match=r"enc_layers 3 here, 1 in the checkpoint"):
        evaluate_checkpoint(tmp_path / "checkpoint.pth", model_overrides={"enc_layers": 3})
    # Data with a category the model has no logit for: the message names both and the fix.
    ground_truth = json.loads(synthetic.val_json.read_text())
    ground_truth["categories"].append({"id": 9, "name": "new"})
    ground_truth["annotations"][0]["category_id"] = 9
    other = tmp_path / "other.json"
    other.write_text(json.dumps(ground_truth))
    with pytest.raises(ConfigError, match=r"category id 9, but the model in .* has 6 classes.*--drop_class_heads"):
        evaluate_checkpoint(tmp_path / "checkpoint.pth", dataclasses.replace(_data(synthetic), val_json=str(other)))


def test_finetune_rebuilds_the_model_from_the_checkpoint_with_new_class_heads(synthetic, tmp_path):
    _train(synthetic, tmp_path / "base", epochs=1, eval_every=100)
    source = str(tmp_path / "base" / "checkpoint.pth")
    # No model flags: the architecture is the checkpoint's; with new class heads, the class count is the data's.
    configs = run_configs_from_settings({"model": {"num_classes": 9}, "train": {
        "finetune": source, "drop_class_heads": True, "output_dir": str(tmp_path / "ft"), "epochs": 1,
        "eval_every": 100, "device": "cpu", "progress": False}, "data": dataclasses.asdict(_data(synthetic))})
    assert configs.model == dataclasses.replace(TINY_MODEL, num_classes=9)
    train(configs.model, configs.train, configs.data)
    before, after = read_checkpoint(source)["model"], read_checkpoint(tmp_path / "ft" / "checkpoint.pth")["model"]
    assert after["class_embed.0.weight"].shape == (9, 32)
    # Without new class heads, another class count is an error that names both values and the fix.
    with pytest.raises(ConfigError, match=r"num_classes 9 here, 6 in the checkpoint.*--drop_class_heads"):
        run_configs_from_settings({"model": {"num_classes": 9}, "train": {"finetune": source}, "data": {}})
    assert before["class_embed.0.weight"].shape == (6, 32)


def test_bad_input_is_reported_before_any_work(synthetic, tmp_path):
    with pytest.raises(ConfigError, match="num_classes 3 does not fit the data: category id 5"):
        _train(synthetic, tmp_path, dataclasses.replace(TINY_MODEL, num_classes=3))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        _train(synthetic, tmp_path / "out", resume=str(truncated))
    text = tmp_path / "notes.txt"
    text.write_text("a text file")
    with pytest.raises(CheckpointError, match="notes.txt: unreadable, not a PyTorch checkpoint file"):
        _train(synthetic, tmp_path / "out", resume=str(text))
    assert not (tmp_path / "out").exists()  # a failed start writes nothing
    with pytest.raises(ConfigError, match="training needs data"):
        train(TINY_MODEL, TINY_TRAIN, DataConfig())


def test_a_resumed_model_that_contradicts_the_checkpoint_names_both_values(synthetic, tmp_path):
    _train(synthetic, tmp_path, epochs=1, eval_every=100)
    before = (tmp_path / "checkpoint.pth").read_bytes()
    resume = {"resume": str(tmp_path / "checkpoint.pth")}
    with pytest.raises(ConfigError, match=r"dec_layers 3 here, 2 in the checkpoint"):
        run_configs_from_settings({"model": {"dec_layers": 3}, "train": resume, "data": {}})
    with pytest.raises(ConfigError, match=r"two_stage True here, False in the checkpoint"):
        run_configs_from_settings({"model": {}, "train": resume, "data": {}}, variant="two_stage")
    with pytest.raises(ConfigError, match=r"hidden_dim 64 here, 32 in the checkpoint"):
        _train(synthetic, tmp_path, dataclasses.replace(TINY_MODEL, hidden_dim=64, num_classes=6), **resume)
    assert (tmp_path / "checkpoint.pth").read_bytes() == before


def test_a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(synthetic, tmp_path, monkeypatch):
    _train(synthetic, tmp_path, epochs=1, eval_every=100)
    before = (tmp_path / "checkpoint.pth").read_bytes()
    # From now on the box loss is nan, as after a divergence.
    loss_boxes = SetCriterion.loss_boxes
    monkeypatch.setattr(SetCriterion, "loss_boxes", lambda self, *args: {
        k: v * float("nan") for k, v in loss_boxes(self, *args).items()})
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 1, iteration 0: the model diverged"):
        _train(synthetic, tmp_path, epochs=3, eval_every=100, resume=str(tmp_path / "checkpoint.pth"))
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
