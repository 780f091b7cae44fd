"""Activation checkpointing (``ModelConfig.checkpoint_activations``, ``ddetr train --checkpoint_activations``): the
layers it names are run again in the backward, and the gradients, dropout included, equal the unchecked model's."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from helpers.tiny import TINY_MODEL_FLAGS, TINY_RUN_FLAGS, data_flags, user_environment

from deformable_detr.checkpoint import load_model_state, read_checkpoint, stored_configs
from deformable_detr.config import ConfigError, ModelConfig, model_config
from deformable_detr.data import make_synthetic_dataset
from deformable_detr.model.build import build_from_config

ALL_PARTS = ("backbone", "encoder", "decoder")


def _tiny(variant: str, parts: tuple[str, ...]) -> ModelConfig:
    # Dropout on (the official 0.1), so that equal gradients need equal random masks in the recomputation.
    return model_config(variant, num_classes=5, backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=2,
                        dec_layers=2, dim_feedforward=64, num_queries=8, dropout=0.1, checkpoint_activations=parts)


def _batch() -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 96, 128, generator=generator)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 100:] = True  # padding, so that masked positions take part
    images[1, :, :, 100:] = 0
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    return images, mask, targets


def _count_forwards(module: torch.nn.Module, calls: list[int]) -> None:
    """Appends to ``calls`` at each run of ``module.forward`` (module hooks do not fire in a recomputation)."""
    forward = module.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    module.forward = counted


def _gradients(config: ModelConfig, state: dict[str, torch.Tensor], seed: int
               ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every trainable parameter's gradient of the weighted loss in training mode, and how often the layers of
    each part ran (a checkpointed layer runs again in the backward)."""
    model, criterion, _ = build_from_config(config)
    model.load_state_dict(state)
    model.train()
    calls: dict[str, list[int]] = {part: [] for part in ALL_PARTS}
    watched = {"backbone": model.backbone[0].body.layer2[0], "encoder": model.transformer.encoder.layers[0],
               "decoder": model.transformer.decoder.layers[-1]}
    for part, module in watched.items():
        _count_forwards(module, calls[part])
    images, mask, targets = _batch()
    torch.manual_seed(seed)  # the dropout masks
    criterion.total_loss(criterion(model(images, mask), targets)).backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}, {
        part: len(runs) for part, runs in calls.items()}


@pytest.mark.parametrize("variant", ["deformable_detr", "box_refine", "two_stage"])
def test_checkpointed_gradients_equal_the_unchecked_models_with_dropout_on(variant):
    torch.manual_seed(0)
    plain_config = _tiny(variant, ())
    # The init zeroes some layers (box heads' last layers, sampling offsets), which would leave parameters upstream
    # of them without a gradient: perturbed, every parameter gets one.
    state = {name: value + 0.02 * torch.randn_like(value) if value.is_floating_point() else value
             for name, value in build_from_config(plain_config)[0].state_dict().items()}
    expected, plain_calls = _gradients(plain_config, state, seed=1)
    got, checked_calls = _gradients(_tiny(variant, ALL_PARTS), state, seed=1)

    assert plain_calls == dict.fromkeys(ALL_PARTS, 1)
    assert checked_calls == dict.fromkeys(ALL_PARTS, 2), "each checkpointed layer runs again in the backward"
    assert set(got) == set(expected)
    missing = sorted(name for name, grad in expected.items() if grad is None or not grad.abs().sum() > 0)
    assert not missing, f"parameters without a gradient: {missing[:5]}"
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    # Not trivially equal: other dropout masks move the gradients far beyond that tolerance.
    other, _ = _gradients(plain_config, state, seed=2)
    moved = max(float((other[n] - expected[n]).abs().max() / expected[n].abs().max().clamp_min(1e-12))
                for n in expected)
    assert moved > 1e-3


def test_checkpointing_is_off_in_evaluation_and_without_gradients():
    torch.manual_seed(0)
    model, _, _ = build_from_config(_tiny("deformable_detr", ALL_PARTS))
    calls: list[int] = []
    _count_forwards(model.transformer.encoder.layers[0], calls)
    images, mask, _ = _batch()
    model.eval()
    model(images, mask).pred_logits.sum().backward()
    model.train()
    with torch.no_grad():
        model(images, mask)
    assert len(calls) == 2  # once per forward: nothing to recompute


def test_bad_parts_name_the_setting():
    with pytest.raises(ConfigError, match=r"checkpoint_activations must be distinct parts of backbone, encoder, "
                                          r"decoder, or none alone, got \('encoder', 'neck'\)"):
        ModelConfig(checkpoint_activations=("encoder", "neck"))
    with pytest.raises(ConfigError, match="checkpoint_activations"):
        ModelConfig(checkpoint_activations=("none", "encoder"))


def _ddetr_train(data, out, *flags: str) -> list[dict]:
    result = subprocess.run(["ddetr", "train", *TINY_MODEL_FLAGS, *TINY_RUN_FLAGS, *data_flags(data), "--epochs",
                             "1", "--no_progress", "--print_freq", "0", "--output_dir", str(out), *flags],
                            capture_output=True, text=True, env=user_environment(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def test_ddetr_train_with_checkpoint_activations_gives_the_same_losses(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", num_train=6, num_val=2, image_size=64, seed=0)
    plain = _ddetr_train(data, tmp_path / "plain")
    checked = _ddetr_train(data, tmp_path / "checked", "--checkpoint_activations", "backbone", "encoder", "decoder")

    losses = {k: v for k, v in plain[-1].items() if k.startswith("train_loss")}
    assert len(losses) > 10 and losses["train_loss"] > 0  # weighted total, terms, auxiliary layers
    for key, value in losses.items():
        assert checked[-1][key] == pytest.approx(value, rel=1e-5), key
    # The setting travels with the checkpoint, and either setting's weights load into the other's model.
    runs = {name: read_checkpoint(tmp_path / name / "checkpoint.pth") for name in ("plain", "checked")}
    checked_model = stored_configs(runs["checked"], "checked").model
    assert checked_model.checkpoint_activations == ALL_PARTS
    assert stored_configs(runs["plain"], "plain").model.checkpoint_activations == ()
    plain_model = stored_configs(runs["plain"], "plain").model
    load_model_state(build_from_config(checked_model)[0], runs["plain"]["model"])
    load_model_state(build_from_config(plain_model)[0], runs["checked"]["model"])
