"""The moving average of the weights (``ddetr train --ema``): the averaged weights against a float64 hand computation
of the formula, the warm-up against mmdetection's expression and hand-computed values, no update on a step the fp16
scaler skipped, exact resumption through ``ddetr train``, a resumed checkpoint without an average, the EMA weights
used by ``ddetr eval`` and ``Detector``, the digest and the size estimate of the checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers.tiny import TINY_MODEL_FLAGS, TINY_RUN_FLAGS, data_flags

from deformable_detr import build_model
from deformable_detr.checkpoint import (
    CheckpointError,
    checkpoint_size_estimate,
    make_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from deformable_detr.cli import main
from deformable_detr.config import ConfigError, DataConfig, RunConfigs, TrainConfig, model_config
from deformable_detr.data import make_synthetic_dataset
from deformable_detr.inference.detector import Detector
from deformable_detr.training.ema import ModelEMA, ema_decay
from deformable_detr.training.engine import train_one_epoch
from deformable_detr.training.optimizer import build_optimizer

TINY = dict(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
            num_queries=10)
# A short warm-up and a low decay, so that a few steps move the average far from the weights (and a wrong step
# count or formula shows).
EMA_FLAGS = ["--ema", "--ema_decay", "0.6", "--ema_tau", "2"]


def _tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("single_scale", num_classes=3, **TINY)


def _batch(seed: int = 0):
    """One batch of (images, mask, targets) of 2 random 64 x 64 images with a box each."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 64, 64, generator=generator)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.3, 0.6, 0.2, 0.2]])}]
    return images, mask, targets


def test_the_warm_up_is_mmdetections_and_yoloxs_formula():
    # Hand-computed: 0.9998 * (1 - e^(-n/2000)) for n = 1, 2000, 10000, and the limit.
    assert ema_decay(1, 0.9998, 2000) == pytest.approx(4.99775e-4, rel=1e-5)
    assert ema_decay(2000, 0.9998, 2000) == pytest.approx(0.631994, rel=1e-6)
    assert ema_decay(10000, 0.9998, 2000) == pytest.approx(0.993063, rel=1e-6)
    assert ema_decay(10**7, 0.9998, 2000) == 0.9998
    # mmdet ExpMomentumEMA.avg_func: averaged.lerp_(source, momentum), momentum = (1 - m) exp(-(1 + steps) / gamma)
    # + m, with steps updates done before; ours lerps with 1 - d_n, n = steps + 1.
    momentum, gamma = 0.0002, 2000
    for steps in (0, 1, 7, 1999, 5000, 123456):
        mmdet = (1 - momentum) * math.exp(-float(1 + steps) / gamma) + momentum
        assert 1 - ema_decay(steps + 1, 1 - momentum, gamma) == pytest.approx(mmdet, rel=1e-12, abs=1e-15)
    # tau 0: detrex's constant decay.
    assert [ema_decay(n, 0.999, 0) for n in (1, 10, 10**6)] == [0.999] * 3


def test_the_average_equals_a_float64_hand_computation_over_optimizer_steps():
    """Five AdamW steps of the tiny detector: every trained parameter of the average equals the formula run in
    float64 by a plain loop over the weights after each step; what is not trained (frozen ResNet parameters, the
    frozen batch norms' buffers) is the model's, copied, even when it changes."""
    model, criterion, _ = _tiny_model()
    model.train()
    optimizer = build_optimizer(model, lr=1e-2, lr_backbone=1e-2)
    decay, tau = 0.7, 3.0
    ema = ModelEMA(model, decay, tau)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen and trained  # the ResNet stem and layer1 stay frozen, as in the official code
    expected = {name: p.detach().double().clone() for name, p in model.named_parameters()}
    images, mask, targets = _batch()
    for n in range(1, 6):
        loss = criterion.total_loss(criterion(model(images, mask), targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        # A buffer that changes (the frozen batch norms' never do): the average copies it.
        model.backbone[0].body.bn1.running_mean.add_(1.0)
        ema.update(model)
        d = decay * (1 - math.exp(-n / tau))
        current = dict(model.named_parameters())
        for name in trained:
            expected[name] = d * expected[name] + (1 - d) * current[name].detach().double()
    assert ema.updates == 5
    averaged = dict(ema.module.named_parameters())
    moved = 0.0
    for name in trained:
        torch.testing.assert_close(averaged[name].double(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, float((averaged[name] - dict(model.named_parameters())[name]).detach().abs().max()))
    assert moved > 1e-3  # the average is not the weights
    for name in frozen:
        assert torch.equal(averaged[name], dict(model.named_parameters())[name]), name
    for (name, buffer), (_, own) in zip(model.named_buffers(), ema.module.named_buffers()):
        assert torch.equal(own, buffer), name  # bn1.running_mean too: copied (+5 in all), not averaged


def test_a_step_the_fp16_scaler_skips_is_no_update():
    """Through train_one_epoch: a gradient scaler whose scale overflows the loss to inf skips every step (the
    optimizer does not step, the average does not move); a sane scale steps and updates after every batch."""
    model, criterion, _ = _tiny_model()
    optimizer = build_optimizer(model, lr=1e-2, lr_backbone=1e-2)
    ema = ModelEMA(model, 0.5, 0.0)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [_batch(0), _batch(1)]
    overflowing = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    train_one_epoch(model, criterion, batches, optimizer, torch.device("cpu"), 0, scaler=overflowing,
                    progress=False, print_freq=0, ema=ema)
    assert overflowing.get_scale() == 2.0**125  # halved at each of the two skipped steps
    assert ema.updates == 0
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in ema.module.state_dict().items())
    train_one_epoch(model, criterion, batches, optimizer, torch.device("cpu"), 1,
                    scaler=torch.amp.GradScaler("cpu", init_scale=1.0), progress=False, print_freq=0, ema=ema)
    assert ema.updates == 2
    assert not all(torch.equal(v, before[k]) for k, v in ema.module.state_dict().items())


def test_the_ema_settings_are_checked():
    with pytest.raises(ConfigError, match=r"^ema_decay must be a number in \[0, 1\), got 1.0$"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ConfigError, match=r"^ema_tau must be a finite number of steps >= 0, got -1.0$"):
        TrainConfig(ema_tau=-1.0)
    with pytest.raises(ConfigError, match="ema_tau"):
        TrainConfig(ema_tau=math.inf)


def test_the_checkpoint_size_estimate_counts_the_ema_weights(tmp_path):
    model = _tiny_model()[0]
    ema = ModelEMA(model)
    configs = RunConfigs(model_config("single_scale", num_classes=3, **TINY), TrainConfig(ema=True),
                         DataConfig(coco_path="c"))
    with_ema, without = tmp_path / "with.pth", tmp_path / "without.pth"
    save_checkpoint(with_ema, make_checkpoint(model.state_dict(), configs, {1: "a"}, ema=ema.state_dict()))
    save_checkpoint(without, make_checkpoint(model.state_dict(), configs, {1: "a"}))
    size, added = with_ema.stat().st_size, with_ema.stat().st_size - without.stat().st_size
    assert added > 0.9 * without.stat().st_size
    assert abs(checkpoint_size_estimate(model, ema=True) - size) <= 0.1 * size
    estimated_added = checkpoint_size_estimate(model, ema=True) - checkpoint_size_estimate(model)
    assert abs(estimated_added - added) <= 0.1 * added, (estimated_added, added)


def test_corrupted_ema_weights_are_detected(tmp_path):
    model = _tiny_model()[0]
    configs = RunConfigs(model_config("single_scale", num_classes=3, **TINY), TrainConfig(ema=True),
                         DataConfig(coco_path="c"))
    checkpoint = make_checkpoint(model.state_dict(), configs, {1: "a"}, ema=ModelEMA(model).state_dict())
    name = next(iter(checkpoint["ema"]["model"]))
    checkpoint["ema"]["model"][name] = checkpoint["ema"]["model"][name].clone().add_(1.0)
    save_checkpoint(tmp_path / "c.pth", checkpoint)
    with pytest.raises(CheckpointError, match=f"the weights are corrupted: tensor '{name}'"):
        read_checkpoint(tmp_path / "c.pth")


# ------------------------------------------------------------------------------------------- through ddetr train


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=8, num_val=2, image_size=64, seed=0)


def _train(data, out: Path, *flags: str) -> int:
    return main(["train", *TINY_MODEL_FLAGS, *TINY_RUN_FLAGS, *data_flags(data), "--no_progress", "--print_freq", "0",
                 "--eval_every", "100", "--output_dir", str(out), *flags])


@pytest.fixture(scope="module")
def runs(synthetic, tmp_path_factory):
    """Two epochs with --ema in one run, and the same run interrupted after its first epoch and resumed."""
    root = tmp_path_factory.mktemp("runs")
    assert _train(synthetic, root / "whole", "--epochs", "2", *EMA_FLAGS) == 0
    assert _train(synthetic, root / "resumed", "--epochs", "1", *EMA_FLAGS) == 0
    assert _train(synthetic, root / "resumed", "--resume", str(root / "resumed" / "checkpoint.pth"),
                  "--epochs", "2") == 0
    return root


def test_a_resumed_run_has_the_bit_identical_average_of_an_uninterrupted_one(runs):
    whole = read_checkpoint(runs / "whole" / "checkpoint.pth")
    resumed = read_checkpoint(runs / "resumed" / "checkpoint.pth")
    assert whole["ema"]["updates"] == resumed["ema"]["updates"] == 8  # 8 images, batches of 2, 2 epochs
    assert whole["ema"].keys() == resumed["ema"].keys()
    for name, tensor in whole["ema"]["model"].items():
        assert torch.equal(tensor, resumed["ema"]["model"][name]), name
    # The average is its own: not the trained weights.
    assert any(not torch.equal(tensor, whole["model"][name]) for name, tensor in whole["ema"]["model"].items())
    log = [json.loads(line) for line in (runs / "whole" / "log.txt").read_text().splitlines()]
    assert "test_weights" not in log[0] and log[1]["test_weights"] == "ema"  # evaluated after the last epoch only


def test_resuming_a_checkpoint_without_an_average_starts_it_from_the_weights_and_says_so(synthetic, tmp_path, capsys):
    assert _train(synthetic, tmp_path, "--epochs", "1") == 0
    assert "ema" not in read_checkpoint(tmp_path / "checkpoint.pth")
    capsys.readouterr()
    assert _train(synthetic, tmp_path, "--resume", str(tmp_path / "checkpoint.pth"), "--epochs", "2",
                  *EMA_FLAGS) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--ema")]
    assert lines == [f"--ema: {tmp_path / 'checkpoint.pth'} holds no EMA weights (trained without --ema): the "
                     "average starts from its model weights, with the warm-up of a new average"]
    assert read_checkpoint(tmp_path / "checkpoint.pth")["ema"]["updates"] == 4  # the resumed epoch's steps


def test_eval_and_the_detector_use_the_ema_weights_unless_asked_for_the_raw_ones(runs, tmp_path, capsys):
    path = runs / "whole" / "checkpoint.pth"
    checkpoint = read_checkpoint(path)
    for ema, key in ((True, "ema"), (False, "model")):
        detector = Detector.from_checkpoint(path, optimize=False, ema=ema)
        weights = checkpoint["ema"]["model"] if key == "ema" else checkpoint["model"]
        assert all(torch.equal(v, weights[k]) for k, v in detector.model.state_dict().items()), key
    capsys.readouterr()
    assert main(["eval", str(path), "--device", "cpu", "--num_workers", "0", "--no_progress", "--print_freq", "0",
                 "--output_dir", str(tmp_path / "ema")]) == 0
    assert f"evaluating the EMA weights of {path} (8 updates; --raw_weights: the trained weights)" in (
        capsys.readouterr().out)
    assert json.loads((tmp_path / "ema" / "eval.json").read_text())["test_weights"] == "ema"
    assert main(["eval", str(path), "--raw_weights", "--device", "cpu", "--num_workers", "0", "--no_progress",
                 "--print_freq", "0", "--output_dir", str(tmp_path / "raw")]) == 0
    assert "EMA" not in capsys.readouterr().out
    assert "test_weights" not in json.loads((tmp_path / "raw" / "eval.json").read_text())
    # The evaluation after the last epoch of training was of the EMA weights: ddetr eval gives its loss.
    log = json.loads((runs / "whole" / "log.txt").read_text().splitlines()[-1])
    evaluated = json.loads((tmp_path / "ema" / "eval.json").read_text())
    assert evaluated["test_loss"] == pytest.approx(log["test_loss"], rel=1e-5)
    raw = json.loads((tmp_path / "raw" / "eval.json").read_text())
    assert raw["test_loss"] != pytest.approx(log["test_loss"], rel=1e-3)  # which weights are evaluated shows


def test_the_average_of_a_ddp_model_is_of_the_unwrapped_model(tmp_path):
    """One process of gloo: the average holds the module's names (no ``module.`` prefix) and follows its weights."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        inner = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        model = torch.nn.parallel.DistributedDataParallel(inner)
        ema = ModelEMA(model, decay=0.5, tau=0.0)
        assert list(ema.module.state_dict()) == list(inner.state_dict())
        start = {k: v.clone() for k, v in inner.state_dict().items()}
        model(torch.randn(8, 4)).square().sum().backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        ema.update(model)
        for name, value in inner.state_dict().items():
            if name in dict(inner.named_parameters()):  # averaged: halfway, with decay 0.5
                torch.testing.assert_close(ema.module.state_dict()[name], (start[name] + value) / 2)
            else:  # the batch norm's running statistics, updated by the forward: copied
                assert torch.equal(ema.module.state_dict()[name], value), name
    finally:
        torch.distributed.destroy_process_group()
