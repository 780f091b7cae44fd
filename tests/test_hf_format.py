"""Hugging Face format both ways, checked against transformers itself (its model, its loader, its saver).

HF -> ours: a transformers ``DeformableDetrForObjectDetection`` with random weights, saved by its own
``save_pretrained``, read by ``read_checkpoint`` into our model: the same logits and boxes to float32 noise.
Ours -> HF: ``export_hf`` of our checkpoint, loaded by ``from_pretrained`` with no missing, unexpected or mismatched
keys: the same outputs; read back: the very same state_dict. Every official variant, both of transformers' backbone
forms (its own ResNet, and timm's as in the SenseTime Hub checkpoints). Tiny sizes, random weights, no download.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny import TINY_MODEL_FLAGS, TINY_RUN_FLAGS, user_environment
from safetensors.torch import load_file, save_file
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

from deformable_detr.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_state,
    make_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from deformable_detr.checkpoint_config import config_from_checkpoint
from deformable_detr.cli import main
from deformable_detr.config import DataConfig, RunConfigs, TrainConfig, model_config
from deformable_detr.inference.detector import Detector
from deformable_detr.inference.hf_format import export_hf
from deformable_detr.model.build import build_from_config

# float32 noise: the two models add the same numbers in another order (measured: at most 5e-7)
ATOL = 1e-5
VARIANTS = {"deformable_detr": {}, "single_scale": {"num_feature_levels": 1},
            "box_refine": {"with_box_refine": True}, "two_stage": {"with_box_refine": True, "two_stage": True}}
FORMS = ("transformers", "timm")
TINY = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
            encoder_attention_heads=4, decoder_attention_heads=4, num_queries=10, two_stage_num_proposals=10)
TINY_OURS = dict(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
                 num_queries=10)
NAMES = {1: "circle", 3: "square"}


def hf_config(form: str, variant: str, backbone: str = "resnet18", num_labels: int = 5, **extra
              ) -> DeformableDetrConfig:
    """A tiny transformers config of ``variant`` with its ResNet in ``form``, no pretrained weights."""
    settings = {**TINY, **VARIANTS[variant], "num_labels": num_labels, **extra}
    if form == "timm":
        return DeformableDetrConfig(use_timm_backbone=True, backbone=backbone, use_pretrained_backbone=False,
                                    **settings)
    stages = ["stage2", "stage3", "stage4"] if settings.get("num_feature_levels", 4) > 1 else ["stage4"]
    resnet = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                          embedding_size=64, out_features=stages)
    return DeformableDetrConfig(backbone_config=resnet, use_timm_backbone=False, **settings)


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Noise on every weight and frozen batch-norm statistic (zero-initialised ones too, e.g. the sampling
    offsets), so that a tensor mapped to the wrong place shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    saved = set(module.state_dict())  # not the buffers a module computes itself (the sine encoding's frequencies)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if not tensor.is_floating_point() or name not in saved:
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images, the second padded at the bottom and right (True in the mask)."""
    images = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, 40:] = True
    mask[1, :, 56:] = True
    return images, mask


@torch.no_grad()
def assert_same_outputs(hf_model: DeformableDetrForObjectDetection, ours: torch.nn.Module) -> None:
    images, mask = inputs()
    theirs = hf_model.eval()(pixel_values=images, pixel_mask=(~mask).long())
    mine = ours.eval()(images, mask)
    assert theirs.logits.shape == mine.pred_logits.shape
    assert (theirs.logits - mine.pred_logits).abs().max() < ATOL
    assert (theirs.pred_boxes - mine.pred_boxes).abs().max() < ATOL
    assert mine.pred_logits.std() > 0.1  # not trivially equal (e.g. all logits at the prior)


def model_from(path: Path | str) -> torch.nn.Module:
    """Our model of a checkpoint or Hugging Face folder, through the public entry points."""
    checkpoint = read_checkpoint(path)
    model, _, _ = build_from_config(config_from_checkpoint(checkpoint, str(path)))
    load_model_state(model, checkpoint["model"])
    return model


def saved_hf_model(tmp_path: Path, form: str, variant: str, **extra) -> tuple[DeformableDetrForObjectDetection, Path]:
    torch.manual_seed(0)
    hf_model = DeformableDetrForObjectDetection(hf_config(form, variant, **extra))
    randomise(hf_model, seed=2)
    folder = tmp_path / "hf"
    hf_model.save_pretrained(folder)
    return hf_model, folder


def our_checkpoint(tmp_path: Path, variant: str, **overrides) -> tuple[torch.nn.Module, Path]:
    config = model_config(variant, num_classes=5, **{**TINY_OURS, **overrides})
    torch.manual_seed(0)
    model, _, _ = build_from_config(config)
    randomise(model, seed=3)  # also makes the box-refinement heads of the layers differ from one another
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, make_checkpoint(model.state_dict(), RunConfigs(config, TrainConfig(), DataConfig()), NAMES))
    return model, path


def load_hf(folder: Path) -> DeformableDetrForObjectDetection:
    """``from_pretrained``, failing on any key it did not expect, did not find, or found with another shape."""
    hf_model, info = DeformableDetrForObjectDetection.from_pretrained(folder, output_loading_info=True)
    problems = {kind: keys for kind, keys in info.items() if keys}
    assert not problems, problems
    return hf_model


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_model_gives_the_outputs_of_ours(tmp_path, form, variant):
    hf_model, folder = saved_hf_model(tmp_path, form, variant)
    assert_same_outputs(hf_model, model_from(folder))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_ours_to_hf_loads_in_transformers_and_comes_back_bit_exact(tmp_path, form, variant):
    model, path = our_checkpoint(tmp_path, variant)
    folder = export_hf(path, tmp_path / "hf", backbone_form=form)
    hf_model = load_hf(folder)
    assert_same_outputs(hf_model, model)
    assert hf_model.config.id2label == {0: "LABEL_0", 1: "circle", 2: "LABEL_2", 3: "square", 4: "LABEL_4"}

    back = read_checkpoint(folder)
    original = model.state_dict()
    assert list(back["model"]) == list(original)
    for key, tensor in original.items():
        assert back["model"][key].dtype == tensor.dtype and torch.equal(back["model"][key], tensor), key
    assert back["categories"] == NAMES
    assert config_from_checkpoint(back, "back") == config_from_checkpoint(read_checkpoint(path), "original")


def test_dc5_with_the_timm_backbone_both_ways(tmp_path):
    """DC5 (layer4 dilated) exists in transformers with timm's ResNet only; a bottleneck ResNet is needed."""
    hf_model, folder = saved_hf_model(tmp_path, "timm", "single_scale", backbone="resnet50", dilation=True)
    ours = model_from(folder)
    assert ours.backbone.strides == [16]
    assert_same_outputs(hf_model, ours)
    export_hf(folder, tmp_path / "again", backbone_form="timm")
    assert_same_outputs(load_hf(tmp_path / "again"), ours)
    with pytest.raises(ValueError, match="DC5 model .* needs the timm backbone form"):
        export_hf(folder, tmp_path / "no", backbone_form="transformers")


def test_transformers_5_names_legacy_names_and_pytorch_model_bin_read_alike(tmp_path):
    """save_pretrained writes legacy names (backbone.conv_encoder, self_attn.out_proj, fc1); transformers 5 holds
    renamed ones in memory (backbone.model, o_proj, mlp.fc1); old folders have pytorch_model.bin."""
    hf_model, folder = saved_hf_model(tmp_path, "timm", "two_stage")
    legacy = read_checkpoint(folder)["model"]
    in_memory = {k: v.clone().contiguous() for k, v in hf_model.state_dict().items()}
    assert any(".mlp.fc1." in k for k in in_memory) and any("o_proj" in k for k in in_memory)
    renamed = tmp_path / "renamed"
    shutil.copytree(folder, renamed)
    save_file(in_memory, renamed / "model.safetensors", metadata={"format": "pt"})
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(folder / "config.json", old)
    torch.save(load_file(folder / "model.safetensors"), old / "pytorch_model.bin")
    for other in (read_checkpoint(renamed)["model"], read_checkpoint(old)["model"],
                  read_checkpoint(old / "pytorch_model.bin")["model"], read_checkpoint(folder / "model.safetensors")
                  ["model"]):
        assert list(other) == list(legacy) and all(torch.equal(other[k], legacy[k]) for k in legacy)
    model = build_from_config(config_from_checkpoint(read_checkpoint(folder), "hf"))[0]
    load_checkpoint(model, old / "pytorch_model.bin")  # once "595 missing key(s)"
    assert_same_outputs(hf_model, model)


def test_detector_from_pretrained_reads_the_folder_and_its_class_names(tmp_path):
    _, folder = saved_hf_model(tmp_path, "transformers", "box_refine", num_labels=3,
                               id2label={0: "cat", 1: "dog", 2: "LABEL_2"})
    detector = Detector.from_pretrained(folder, score_threshold=0.0)
    assert detector.class_names == {0: "cat", 1: "dog"}
    assert detector.config.num_classes == 3 and detector.config.with_box_refine
    detections = detector.predict(torch.rand(3, 50, 70))
    assert len(detections) > 0 and set(detections.label_names) <= {"cat", "dog", "2"}


# ------------------------------------------------------------------------------------------------------ bad input


def test_a_folder_of_another_architecture_is_named(tmp_path, capsys):
    folder = tmp_path / "detr"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "conditional_detr", "architectures":
                                                    ["ConditionalDetrForObjectDetection"]}))
    with pytest.raises(CheckpointError, match=r"model_type 'conditional_detr' \(Conditional DETR\), not Deformable "
                                              r"DETR \(expected model_type 'deformable_detr'\)"):
        read_checkpoint(folder)
    assert main(["predict", str(folder), str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "'conditional_detr'" in error and "config.json" in error


def test_missing_and_extra_tensors_are_named_with_their_count(tmp_path):
    _, folder = saved_hf_model(tmp_path, "timm", "deformable_detr")
    tensors = load_file(folder / "model.safetensors")
    removed = sorted(k for k in tensors if k.startswith("model.encoder.layers.0.fc"))
    for key in removed:
        del tensors[key]
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(folder)
    message = str(error.value)
    assert ("4 tensor(s) ('model.encoder.layers.0.fc1.weight', 'model.encoder.layers.0.fc1.bias', "
            "'model.encoder.layers.0.fc2.weight', ...) missing") in message
    assert "1 tensor(s) ('model.extra.weight') unexpected" in message
    assert len(removed) == 4 and "\n" not in message


def test_hf_weights_without_their_config_name_the_format(tmp_path):
    _, folder = saved_hf_model(tmp_path, "timm", "deformable_detr")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(folder / "model.safetensors", alone)
    torch.save(load_file(folder / "model.safetensors"), alone / "weights.pth")
    model = build_from_config(config_from_checkpoint(read_checkpoint(folder), "hf"))[0]
    for path in (alone / "model.safetensors", alone / "weights.pth"):
        with pytest.raises(CheckpointError, match="Hugging Face transformers weights .* without the config.json"):
            load_checkpoint(model, path)


def test_official_names_in_safetensors_read_as_a_bare_state_dict(tmp_path):
    model, _ = our_checkpoint(tmp_path, "deformable_detr")
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, tmp_path / "weights.safetensors")
    again = build_from_config(config_from_checkpoint(read_checkpoint(tmp_path / "weights.safetensors"), "st"))[0]
    load_checkpoint(again, tmp_path / "weights.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


# --------------------------------------------------------------------------------------------- the user's path


def ddetr(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(["ddetr", *args], capture_output=True, text=True, env=user_environment(), cwd=cwd,
                            timeout=900)
    assert result.returncode == 0, f"ddetr {' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_export_hf_of_a_trained_checkpoint_predicts_and_evaluates_as_the_checkpoint(tmp_path):
    ddetr("make-synthetic", "--out", "data", "--num_train", "4", "--num_val", "4", "--image_size", "64",
          "--colour_by_class", cwd=tmp_path)
    data = ["--val_images", "data/val", "--val_json", "data/val.json"]
    ddetr("train", *TINY_MODEL_FLAGS, *TINY_RUN_FLAGS, "--train_images", "data/train", "--train_json",
          "data/train.json", *data, "--epochs", "1", "--output_dir", "run", "--no_progress", cwd=tmp_path)
    result = ddetr("export", "hf", "run/checkpoint.pth", "hf", "--backbone_form", "transformers", cwd=tmp_path)
    assert "wrote hf" in result.stdout
    load_hf(tmp_path / "hf")

    for source, out in (("run/checkpoint.pth", "from_checkpoint"), ("hf", "from_hf")):
        ddetr("predict", source, "data/val", "--out", out, "--score_threshold", "0", "--no_progress", cwd=tmp_path)
    expected = json.loads((tmp_path / "from_checkpoint" / "detections.json").read_text())
    num_classes = config_from_checkpoint(read_checkpoint(tmp_path / "run" / "checkpoint.pth"), "run").num_classes
    assert len(expected) == 4 * min(100, 10 * num_classes)  # the top 100 of each image's 10 queries x classes
    assert json.loads((tmp_path / "from_hf" / "detections.json").read_text()) == expected

    ddetr("eval", "hf", *data, "--output_dir", "eval", "--no_progress", cwd=tmp_path)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    stats = json.loads((tmp_path / "eval" / "eval.json").read_text())["test_coco_eval_bbox"]
    assert stats == pytest.approx(log[-1]["test_coco_eval_bbox"], abs=1e-12)



def test_export_hf_help_loads_no_torch_and_a_bad_checkpoint_is_one_line(tmp_path, capsys):
    code = ("import sys\nfrom deformable_detr.cli import main\ntry:\n    main(['export', 'hf', '--help'])\n"
            "except SystemExit as exit:\n    assert exit.code == 0\nassert 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--backbone_form {timm,transformers}" in result.stdout, result.stderr
    assert main(["export", "hf", str(tmp_path / "none.pth"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("ddetr export hf: checkpoint ") and "no such file" in error and "\n" not in error
    assert not (tmp_path / "out").exists()
