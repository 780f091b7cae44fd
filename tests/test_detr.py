"""DETR (Carion et al. 2020) in the framework: the official layout and parameter counts, the official numbers
(``ddetr verify`` on tests/reference/detr*.npz), the matcher and loss on hand-computed cases, the post-processing,
the recipe, the command-line journey (train -> eval -> predict -> export) and the architecture mix-up errors."""

from __future__ import annotations

import argparse
import json
import math
import subprocess

import numpy as np
import pytest
import torch
from helpers.tiny import REPO_ROOT, TINY_MODEL_FLAGS, data_flags, user_environment

from deformable_detr.checkpoint import CheckpointError, load_checkpoint
from deformable_detr.checkpoint_config import config_from_checkpoint
from deformable_detr.config import TRAIN_PRESETS, ConfigError, ModelConfig, model_config
from deformable_detr.data import make_synthetic_dataset
from deformable_detr.inference.detector import Detector
from deformable_detr.loss.matcher import HungarianMatcher, SoftmaxClassCost
from deformable_detr.model.build import build_model
from deformable_detr.model.detr import DETR, DETRPostProcess, decode_detr_detections
from deformable_detr.verify.detr import _match_checks, assignment_margin
from deformable_detr.verify.reference_init import apply_ddetr_init_v1

REFERENCE = REPO_ROOT / "tests" / "reference"
TINY_DETR = dict(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
                 num_queries=10)
# The tiny run flags of tests/helpers/tiny.py without its --lr_backbone, so that the DETR recipe's shows.
RUN_FLAGS = ["--pretrained_backbone", "none", "--device", "cpu", "--num_workers", "0", "--batch_size", "2",
             "--train_scales", "64", "--crop_resize_sizes", "64", "--crop_size", "48", "64", "--val_size", "64",
             "--max_size", "80", "--no_progress"]


def _ddetr(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(["ddetr", *args], capture_output=True, text=True, timeout=600, env=user_environment(),
                          cwd=cwd)


# ------------------------------------------------------------------------------------ the official layout


@pytest.mark.parametrize("variant", ["detr", "detr_dc5"])
def test_state_dict_keys_shapes_counts_and_init_equal_the_official(variant):
    listing = json.loads((REFERENCE / f"state_dict_keys_{variant}.json").read_text())
    model, _, _ = build_model(variant, num_classes=91)
    assert isinstance(model, DETR)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert [(k, list(v.shape)) for k, v in state.items()] == [(e["name"], e["shape"]) for e in listing["keys"]]
    counts = listing["param_counts"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == counts["trainable"] == 41_302_368
    assert sum(p.numel() for p in model.parameters()) == counts["total_params"]
    assert sum(b.numel() for n, b in model.named_buffers() if n in state) == counts["buffers"]
    # ddetr-init-v1 gives every key the official draw: the float64 sums of the listing.
    apply_ddetr_init_v1(model)
    state = model.state_dict()
    for entry in listing["keys"]:
        assert state[entry["name"]].double().sum().item() == pytest.approx(entry["sum"], rel=1e-9, abs=1e-9)


def test_detr_presets_are_the_official_main_py_defaults():
    config = model_config("detr", num_classes=91)
    assert (config.architecture, config.num_feature_levels, config.dim_feedforward, config.num_queries,
            config.hidden_dim, config.nheads, config.enc_layers, config.dec_layers, config.dropout) == \
        ("detr", 1, 2048, 100, 256, 8, 6, 6, 0.1)
    assert (config.set_cost_class, config.set_cost_bbox, config.set_cost_giou) == (1.0, 5.0, 2.0)
    assert (config.cls_loss_coef, config.bbox_loss_coef, config.giou_loss_coef, config.eos_coef) == (1, 5, 2, 0.1)
    assert model_config("detr_dc5").dilation
    assert TRAIN_PRESETS["detr"] == {"lr": 1e-4, "lr_backbone": 1e-5, "weight_decay": 1e-4, "clip_max_norm": 0.1,
                                     "epochs": 300, "lr_drop": 200}
    with pytest.raises(ConfigError, match="architecture detr is single-scale.*num_feature_levels 4"):
        ModelConfig(architecture="detr")
    with pytest.raises(ConfigError, match="architecture must be one of deformable_detr, detr"):
        ModelConfig(architecture="yolo")


# ------------------------------------------------------------------------------------ the official numbers


def test_ddetr_verify_passes_on_the_detr_reference_files():
    """Every check group of both files: forward (out, dbg), losses, gradients, matching, post-processing."""
    result = _ddetr("verify", str(REFERENCE / "detr.npz"), str(REFERENCE / "detr_dc5.npz"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "verify: all checks passed" in result.stdout
    for name in ("detr.npz", "detr_dc5.npz"):
        assert f"{name}: 353 passed, 0 failed" in result.stdout
    for group in ("out.pred_logits", "dbg.hs.q0", "loss.total", "loss.class_error", "grad.query_embed.weight",
                  "gradnorm.total", "match.aux.4.0.src", "match.aux.4.0.tgt", "post.1.labels", "post.1.scores",
                  "post.1.boxes"):
        assert f"PASS  {group}" in result.stdout, group


def test_a_near_tie_may_take_another_assignment_of_the_same_cost():
    # Hand-built: queries 0 and 1 cost 1.0 and 1.0 + 4e-6 for target 0: a margin of 4e-6.
    cost = np.array([[1.0, 5.0], [1.0 + 4e-6, 5.0], [9.0, 2.0]])
    assert assignment_margin(cost) == pytest.approx(4e-6, rel=1e-6)
    reference = {"match.0.cost": cost, "match.0.src": np.array([0, 2]), "match.0.tgt": np.array([0, 1])}
    swapped = {"match.0.src": np.array([1, 2]), "match.0.tgt": np.array([0, 1])}
    checks = _match_checks("match.0", swapped, reference)
    assert [c.name.split(" ")[0] for c in checks] == ["match.0.src", "match.0.tgt"]
    assert all(c.passed and c.error == pytest.approx(4e-6, rel=1e-6) for c in checks)
    # The same swap where the margin is large is a failure.
    wide = {**reference, "match.0.cost": np.array([[1.0, 5.0], [1.5, 5.0], [9.0, 2.0]])}
    assert not any(c.passed for c in _match_checks("match.0", swapped, wide))
    assert "margin 5.00e-01" in _match_checks("match.0", swapped, wide)[0].name


# ------------------------------------------------------------------------------------ matcher and loss


def test_softmax_class_cost_is_minus_the_target_probability():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 4.0]]])  # (1, 2 queries, 2 classes + no-object)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    matcher = HungarianMatcher(1.0, 0.0, 0.0, class_cost=SoftmaxClassCost())
    (cost,) = matcher.cost_matrices({"pred_logits": logits, "pred_boxes": boxes}, targets)
    expected = [-math.exp(0.0) / (math.exp(2) + 1 + math.exp(-1)), -math.exp(1.0) / (1 + math.e + math.exp(4))]
    assert cost[:, 0].tolist() == pytest.approx(expected, rel=1e-6)
    # P(class 1) is 0.114 for query 0 and 0.047 for query 1 (whose no-object logit dominates): query 0 is matched.
    assert [t.tolist() for t in matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)[0]] == [[0], [0]]
    # The no-object index is no target class.
    bad = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must be in \[0, 2\)"):
        matcher({"pred_logits": logits, "pred_boxes": boxes}, bad)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    src, tgt = matcher({"pred_logits": logits, "pred_boxes": boxes}, empty)[0]
    assert src.numel() == tgt.numel() == 0


def _criterion(eos_coef: float = 0.1):
    _, criterion, _ = build_model("detr", num_classes=2, eos_coef=eos_coef, aux_loss=False, **TINY_DETR)
    return criterion


def test_loss_ce_weights_no_object_by_eos_coef_in_the_mean():
    """loss_ce against a float64 hand computation: sum_i w[y_i] * CE_i / sum_i w[y_i], no-object weight 0.1."""
    logits = torch.tensor([[[2.0, 0.5, 0.1], [0.3, -1.0, 2.5], [1.0, 1.0, 1.0]]])  # 3 queries, 2 classes + no-object
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]]])
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    losses = _criterion()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    # Query 0 (closest box, class 0 likeliest) is matched to the target: classes (0, 2, 2), weights (1, .1, .1).
    rows = logits[0].double().tolist()
    ce = [math.log(sum(math.exp(v) for v in row)) - row[label] for row, label in zip(rows, (0, 2, 2))]
    weights = (1.0, 0.1, 0.1)
    expected = sum(w * c for w, c in zip(weights, ce)) / sum(weights)
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(sum(ce) / 3, rel=1e-3)  # the weighting matters in this case
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-7)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["class_error"].item() == 0.0
    # argmax per query: 0, 2 (no-object), all equal -> 0: two queries predict an object, one target.
    assert losses["cardinality_error"].item() == 1.0
    # eos_coef 1: the plain mean.
    plain = _criterion(1.0)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert plain["loss_ce"].item() == pytest.approx(sum(ce) / 3, rel=1e-6)


def test_loss_without_targets():
    """No target: every query targets no-object (the weights cancel in the mean), box losses 0, class_error 100
    (the official accuracy of no rows is 0)."""
    logits = torch.tensor([[[2.0, 0.5, 0.1], [0.3, -1.0, 2.5]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    losses = _criterion()({"pred_logits": logits, "pred_boxes": boxes}, empty)
    rows = logits[0].double().tolist()
    expected = sum(math.log(sum(math.exp(v) for v in row)) - row[2] for row in rows) / 2
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-6)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    assert losses["class_error"].item() == 100.0
    assert losses["cardinality_error"].item() == 1.0  # query 0 predicts class 0


def test_postprocess_drops_no_object_after_the_softmax_one_detection_per_query():
    logits = torch.tensor([[[1.0, 2.0, 5.0], [3.0, 0.0, 1.0]]])  # query 0: no-object likeliest
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.5, 0.5, 1.0]]])
    sizes = torch.tensor([[100, 200]])  # (height, width)
    (result,) = DETRPostProcess()({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    denominators = [math.exp(1) + math.exp(2) + math.exp(5), math.exp(3) + 1 + math.e]
    assert result["labels"].tolist() == [1, 0]
    assert result["scores"].tolist() == pytest.approx([math.exp(2) / denominators[0], math.exp(3) / denominators[1]],
                                                      rel=1e-6)
    assert result["boxes"].tolist() == [[50.0, 25.0, 150.0, 75.0], [0.0, 0.0, 100.0, 100.0]]
    scores, labels, decoded_boxes, queries = decode_detr_detections(logits, boxes, sizes)
    assert queries.tolist() == [[1, 0]] and labels.tolist() == [[0, 1]]  # by decreasing score, for inference
    assert decoded_boxes[0, 0].tolist() == [0.0, 0.0, 100.0, 100.0]


# ------------------------------------------------------------------------------------ journeys and bad input


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("detr")
    data = make_synthetic_dataset(folder / "data", num_train=4, num_val=2, image_size=64, seed=0)
    result = _ddetr("train", "--variant", "detr", *TINY_MODEL_FLAGS, *RUN_FLAGS, *data_flags(data), "--epochs", "1",
                    "--output_dir", str(folder / "run"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder, data


def test_train_eval_predict_export_journey(trained):
    folder, data = trained
    log = json.loads((folder / "run" / "log.txt").read_text().splitlines()[0])
    assert log["train_lr"] == 1e-4  # the DETR recipe
    assert {"train_loss_ce", "train_loss_ce_0", "train_cardinality_error_unscaled", "test_coco_eval_bbox"} <= set(log)
    checkpoint = torch.load(folder / "run" / "checkpoint.pth", map_location="cpu", weights_only=False)
    recipe = checkpoint["config"]["train"]
    assert (recipe["lr"], recipe["lr_backbone"], recipe["clip_max_norm"], recipe["lr_drop"]) == (1e-4, 1e-5, 0.1, 200)
    assert checkpoint["config"]["model"]["architecture"] == "detr"
    assert checkpoint["model"]["class_embed.weight"].shape[0] == checkpoint["config"]["model"]["num_classes"] + 1

    result = _ddetr("eval", str(folder / "run" / "checkpoint.pth"), "--device", "cpu", "--num_workers", "0",
                    "--no_progress", "--output_dir", str(folder / "eval"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((folder / "eval" / "eval.json").read_text())
    # DETR's PostProcess: one detection per query (10) for each of the 2 images.
    assert report["num_images"] == 2 and report["num_detections"] == 20

    result = _ddetr("predict", str(folder / "run" / "checkpoint.pth"), str(data.val_images), "--out",
                    str(folder / "pred"), "--score_threshold", "0", "--device", "cpu", "--no_progress")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    detections = json.loads((folder / "pred" / "detections.json").read_text())
    assert len(detections) == 20
    detector = Detector.from_checkpoint(folder / "run" / "checkpoint.pth", score_threshold=0.0, optimize=False)
    first = detector.predict(str(data.val_images / "000001.png"))
    ours = sorted((d["score"], d["category_id"]) for d in detections if d["image_id"] == 1)
    assert [round(s, 5) for s, _ in ours] == pytest.approx(sorted(first.scores.tolist()), abs=2e-5)
    assert first.scores.tolist() == sorted(first.scores.tolist(), reverse=True)


def test_export_onnx_of_detr_matches_pytorch(trained):
    folder, _ = trained
    result = _ddetr("export", "onnx", str(folder / "run" / "checkpoint.pth"), str(folder / "detr.onnx"), "--size",
                    "64", "64", "--exporter", "torchscript")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "labels equal" in result.stdout and "check passed" in result.stdout


def _official_detr_checkpoint(path, **overrides):
    """A checkpoint in the layout of the released DETR ones: {"model": state_dict, "args": Namespace}."""
    model, _, _ = build_model("detr", num_classes=5, **{**TINY_DETR, **overrides})
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(dilation=False, nheads=TINY_DETR["nheads"])},
               path)
    return model


def test_an_official_layout_detr_checkpoint_loads_strictly_and_predicts(tmp_path, trained):
    _, data = trained
    model = _official_detr_checkpoint(tmp_path / "detr.pth")
    detector = Detector.from_checkpoint(tmp_path / "detr.pth", score_threshold=0.0, optimize=False)
    assert detector.config.architecture == "detr" and detector.config.num_classes == 5
    assert detector.config.num_queries == 10 and detector.config.nheads == 4
    for key, tensor in model.state_dict().items():
        assert torch.equal(detector.model.state_dict()[key], tensor), key
    result = _ddetr("predict", str(tmp_path / "detr.pth"), str(data.val_images / "000001.png"), "--out",
                    str(tmp_path / "pred"), "--score_threshold", "0", "--device", "cpu", "--no_progress")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(json.loads((tmp_path / "pred" / "detections.json").read_text())) == 10


def test_detr_weights_for_a_deformable_variant_and_the_reverse_say_which_architecture(tmp_path, trained):
    folder, data = trained
    _official_detr_checkpoint(tmp_path / "detr.pth")
    result = _ddetr("predict", str(tmp_path / "detr.pth"), str(data.val_images / "000001.png"), "--out",
                    str(tmp_path / "pred"), "--variant", "single_scale", "--device", "cpu")
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert "variant 'single_scale' is Deformable DETR, but the checkpoint holds DETR weights" in error
    assert "'query_embed.weight' (10, 32)" in error and "(6, 32) = 5 classes + no-object" in error
    assert "--variant detr or detr_dc5" in error
    result = _ddetr("predict", str(tmp_path / "detr.pth"), str(data.val_images / "000001.png"), "--out",
                    str(tmp_path / "pred"), "--show_sampling_points", "--device", "cpu")
    assert result.returncode == 2 and "the model is detr, whose attention samples no points" in result.stderr

    deformable, _, _ = build_model("single_scale", num_classes=5, **TINY_DETR)
    torch.save({"model": deformable.state_dict()}, tmp_path / "deformable.pth")
    with pytest.raises(CheckpointError, match="the checkpoint holds DETR weights and the model is Deformable DETR: "
                                              r"build_model\('detr'\)"):
        load_checkpoint(deformable, tmp_path / "detr.pth")
    with pytest.raises(CheckpointError, match=r"variant 'detr' is DETR, but the checkpoint holds Deformable DETR "
                                              r"weights \('transformer.level_embed'"):
        config_from_checkpoint(torch.load(tmp_path / "deformable.pth"), "deformable.pth", variant="detr")
    # Our own DETR checkpoint (stored settings) given to a Deformable DETR variant, and a fine-tune across.
    with pytest.raises(CheckpointError, match="variant 'box_refine' is Deformable DETR, but the checkpoint holds "
                                              "DETR weights"):
        Detector.from_checkpoint(folder / "run" / "checkpoint.pth", variant="box_refine")
    result = _ddetr("train", "--variant", "detr", "--finetune", str(tmp_path / "deformable.pth"), *RUN_FLAGS,
                    *data_flags(data), "--epochs", "1")
    assert result.returncode == 2
    assert ("the checkpoint holds Deformable DETR weights (architecture 'deformable_detr'), the model asked for is "
            "DETR (architecture 'detr'): use --variant deformable_detr or single_scale") in result.stderr
