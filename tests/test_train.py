"""Training end to end on synthetic data: learning, the log format, resume equality, bad input."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from deformable_detr.checkpoint import CheckpointError, read_checkpoint
from deformable_detr.data import make_synthetic_dataset
from deformable_detr.loss.criterion import SetCriterion
from deformable_detr.training.engine import NonFiniteLossError
from deformable_detr.training.train import add_train_arguments, run

TINY = ["--backbone", "resnet18", "--pretrained_backbone", "none", "--hidden_dim", "32", "--nheads", "4",
        "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64", "--num_queries", "10",
        "--train_scales", "64", "--crop_sizes", "64", "48", "64", "--val_size", "64", "--max_size", "80",
        "--device", "cpu", "--num_workers", "0", "--no_progress", "--lr_backbone", "2e-4"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=8, num_val=4, image_size=64,
                                  seed=0)


def _args(synthetic, output_dir, *extra: str) -> argparse.Namespace:
    flags = TINY + ["--train_images", str(synthetic.train_images), "--train_json", str(synthetic.train_json),
                    "--val_images", str(synthetic.val_images), "--val_json", str(synthetic.val_json),
                    "--output_dir", str(output_dir), *extra]
    return add_train_arguments(argparse.ArgumentParser()).parse_args(flags)


def test_training_learns_and_logs_the_official_keys(synthetic, tmp_path):
    # 48 steps at a high learning rate without dropout: enough for this tiny model's loss to fall clearly.
    run(_args(synthetic, tmp_path, "--epochs", "12", "--batch_size", "2", "--eval_every", "6", "--lr", "1e-3",
              "--lr_backbone", "1e-3", "--dropout", "0"))
    entries = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in entries] == list(range(12))
    assert entries[-1]["train_loss"] < 0.8 * entries[0]["train_loss"], [e["train_loss"] for e in entries]
    assert len(entries[-1]["test_coco_eval_bbox"]) == 12 and "test_coco_eval_bbox" in entries[5]
    for key in ("train_loss", "train_loss_ce", "train_loss_bbox_0", "train_loss_giou_unscaled", "train_class_error",
                "train_lr", "train_grad_norm", "test_loss", "test_class_error", "n_parameters"):
        assert key in entries[-1], key
    checkpoint = read_checkpoint(tmp_path / "checkpoint.pth")
    assert checkpoint["epoch"] == 11 and set(checkpoint) >= {"model", "optimizer", "lr_scheduler", "args"}
    assert (tmp_path / "checkpoint0009.pth").is_file()  # every 5 epochs, as the official main.py


def test_resume_equals_an_uninterrupted_run(synthetic, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run(_args(synthetic, straight, "--epochs", "2", "--eval_every", "100"))
    run(_args(synthetic, interrupted, "--epochs", "1", "--eval_every", "100"))
    run(_args(synthetic, interrupted, "--epochs", "2", "--eval_every", "100", "--resume",
              str(interrupted / "checkpoint.pth")))
    a = read_checkpoint(straight / "checkpoint.pth")
    b = read_checkpoint(interrupted / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 1
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert a["lr_scheduler"] == b["lr_scheduler"]


def test_eval_only_reports_the_coco_numbers(synthetic, tmp_path):
    run(_args(synthetic, tmp_path, "--epochs", "1", "--eval_every", "100"))
    stats = run(_args(synthetic, tmp_path / "eval", "--eval", "--resume", str(tmp_path / "checkpoint.pth")))
    assert len(stats["test_coco_eval_bbox"]) == 12


def test_bad_input_is_reported_before_training(synthetic, tmp_path):
    with pytest.raises(ValueError, match="--num_classes 3 does not fit the data: category id 5"):
        run(_args(synthetic, tmp_path, "--num_classes", "3"))
    with pytest.raises(ValueError, match="--position_embedding 'learned' is not supported"):
        run(_args(synthetic, tmp_path, "--position_embedding", "learned"))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        run(_args(synthetic, tmp_path, "--resume", str(truncated)))
    with pytest.raises(ValueError, match="--eval evaluates the weights of --resume"):
        run(_args(synthetic, tmp_path, "--eval"))


def test_a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(synthetic, tmp_path, monkeypatch):
    run(_args(synthetic, tmp_path, "--epochs", "1", "--eval_every", "100"))
    before = (tmp_path / "checkpoint.pth").read_bytes()
    # From now on the box loss is nan, as after a divergence.
    loss_boxes = SetCriterion.loss_boxes
    monkeypatch.setattr(SetCriterion, "loss_boxes", lambda self, *args: {
        k: v * float("nan") for k, v in loss_boxes(self, *args).items()})
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 1, iteration 0; training stopped"):
        run(_args(synthetic, tmp_path, "--epochs", "3", "--eval_every", "100", "--resume",
                  str(tmp_path / "checkpoint.pth")))
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
