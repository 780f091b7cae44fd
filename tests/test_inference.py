"""Inference and deployment: Detector on our and official-style checkpoints, every input type, ``ddetr predict``
as a user runs it, the sampling-point picture, ONNX export against onnxruntime, batch-norm folding."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from deformable_detr.checkpoint import CheckpointError, make_checkpoint, save_checkpoint
from deformable_detr.checkpoint_config import config_from_checkpoint
from deformable_detr.config import VARIANTS, DataConfig, ModelConfig, RunConfigs, TrainConfig, model_config
from deformable_detr.data.coco_names import COCO_CATEGORIES
from deformable_detr.data.collate import batch_images
from deformable_detr.data.transforms import make_coco_transforms
from deformable_detr.inference.detector import Detector
from deformable_detr.inference.rewrites import fold_frozen_batchnorm, optimize_for_inference
from deformable_detr.inference.sampling_points import SamplingPointRecorder, draw_sampling_points
from deformable_detr.model import ms_deform_attn as ms_deform_attn_module
from deformable_detr.model.build import build_from_config, build_model

TINY = dict(backbone="resnet18", hidden_dim=32, nheads=8, enc_layers=1, dec_layers=2, dim_feedforward=64,
            num_queries=12, enc_n_points=2, dec_n_points=2)
TINY_DATA = DataConfig(val_size=64, max_size=96)
CATEGORIES = {0: "zero", 1: "circle", 2: "square", 3: "star", 4: "cross"}


def _randomise_frozen_batchnorm(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial batch-norm statistics, so that folding them is actually tested."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            channels = module.weight.shape[0]
            module.weight.copy_(1 + 0.2 * torch.randn(channels, generator=generator))
            module.bias.copy_(0.1 * torch.randn(channels, generator=generator))
            module.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))


def _tiny(variant: str = "deformable_detr", num_classes: int = 5) -> tuple[torch.nn.Module, ModelConfig]:
    config = model_config(variant, num_classes=num_classes, **TINY)
    torch.manual_seed(0)
    model, _, _ = build_from_config(config)
    _randomise_frozen_batchnorm(model)
    # Spread the class scores, so that thresholds keep some detections and drop others.
    with torch.no_grad():
        for head in model.class_embed:
            head.bias.normal_(0.0, 2.0)
    return model.eval(), config


def _save_ours(path, model: torch.nn.Module, config: ModelConfig) -> None:
    """A checkpoint as ddetr train writes it."""
    save_checkpoint(path, make_checkpoint(model.state_dict(), RunConfigs(config, TrainConfig(), TINY_DATA),
                                          CATEGORIES, epoch=3))


def _image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.array(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BILINEAR))


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    model, config = _tiny("box_refine")
    path = tmp_path_factory.mktemp("ours") / "checkpoint.pth"
    _save_ours(path, model, config)
    return model, config, path


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """An official-style checkpoint: 91 COCO classes, the official Namespace (none of our flags), no names."""
    model, _ = _tiny(num_classes=91)
    recorded = json.loads((Path(__file__).parent / "data" / "official_main_defaults.json").read_text())
    official_args = argparse.Namespace(**{**recorded, **TINY, "_source": None})
    del official_args._source
    path = tmp_path_factory.mktemp("official") / "r50_deformable_detr-checkpoint.pth"
    save_checkpoint(path, {"model": model.state_dict(), "args": official_args})
    return model, path


def _by_hand(model, images: list[PIL.Image.Image], val_size: int = 64, max_size: int = 96):
    """The eval transform, padding, the model and PostProcess, as ddetr eval runs them."""
    transform = make_coco_transforms("val", val_size=val_size, max_size=max_size)
    batch, mask = batch_images([transform(image, None)[0] for image in images])
    sizes = torch.tensor([[image.height, image.width] for image in images])
    _, _, postprocessors = build_model("deformable_detr", num_classes=5)
    with torch.no_grad():
        return postprocessors["bbox"](model(batch, mask), sizes)


def _assert_same(detections, expected, threshold: float, exact: bool) -> None:
    keep = expected["scores"] >= threshold
    assert len(detections) == int(keep.sum())
    if exact:
        assert torch.equal(detections.scores, expected["scores"][keep])
        assert torch.equal(detections.boxes, expected["boxes"][keep])
    else:
        torch.testing.assert_close(detections.scores, expected["scores"][keep], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(detections.boxes, expected["boxes"][keep], rtol=1e-5, atol=1e-4)
    assert torch.equal(detections.labels, expected["labels"][keep])


def test_our_checkpoint_predicts_what_model_and_postprocess_give(ours):
    model, config, path = ours
    image = PIL.Image.fromarray(_image(48, 72, seed=0))
    expected = _by_hand(model, [image])[0]
    # Between the 21st and 22nd scores: keeps 21, away from float noise.
    threshold = float(expected["scores"][20:22].mean())

    exact = Detector.from_checkpoint(path, score_threshold=threshold, optimize=False)
    assert exact.config == config
    with pytest.raises(CheckpointError, match="variant 'two_stage' does not fit the checkpoint's settings: "
                                              "two_stage: variant True, settings False"):
        Detector.from_checkpoint(path, variant="two_stage")
    assert (exact.val_size, exact.max_size) == (64, 96)
    detections = exact.predict(image)
    _assert_same(detections, expected, threshold, exact=True)
    assert detections.label_names == [CATEGORIES[int(label)] for label in detections.labels]
    assert detections.image_size == (48, 72)
    # The query behind each detection: its box is that query's predicted box.
    with torch.no_grad():
        transform = make_coco_transforms("val", val_size=64, max_size=96)
        outputs = model(transform(image, None)[0][None])
    scale = torch.tensor([72, 48, 72, 48])
    query_boxes = outputs.pred_boxes[0, detections.query_indices]
    xyxy = torch.cat([query_boxes[:, :2] - query_boxes[:, 2:] / 2, query_boxes[:, :2] + query_boxes[:, 2:] / 2], -1)
    torch.testing.assert_close(xyxy * scale, detections.boxes)

    optimised = Detector.from_checkpoint(path, score_threshold=threshold)  # folded batch norms
    _assert_same(optimised.predict(image), expected, threshold, exact=False)
    # A threshold passed to predict overrides the detector's.
    assert len(optimised.predict(image, score_threshold=1.0)) == 0

    coco = detections.to_coco(7, file_name="a.png")
    x0, y0, x1, y1 = detections.boxes[0].tolist()
    assert coco[0]["image_id"] == 7 and coco[0]["file_name"] == "a.png"
    assert coco[0]["category_id"] == int(detections.labels[0])
    np.testing.assert_allclose(coco[0]["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=2e-3)


def test_official_style_checkpoint_is_rebuilt_from_its_weights(official):
    model, path = official
    detector = Detector.from_checkpoint(path, score_threshold=0.0, optimize=False)
    # No args of ours: the eval resize is the official one; 91 logits: COCO names.
    assert (detector.val_size, detector.max_size) == (800, 1333)
    image = PIL.Image.fromarray(_image(40, 56, seed=1))
    detector = Detector.from_checkpoint(path, score_threshold=0.0, optimize=False, val_size=64, max_size=96)
    expected = _by_hand(model, [image])[0]
    detections = detector.predict(image)
    _assert_same(detections, expected, 0.0, exact=True)
    assert detections.label_names == [COCO_CATEGORIES.get(int(label), str(int(label))) for label in detections.labels]

    # A bare state_dict: everything from the weights (nheads at the official 8).
    bare = path.with_name("bare.pth")
    torch.save(model.state_dict(), bare)
    bare_detector = Detector.from_checkpoint(bare, score_threshold=0.0, optimize=False, val_size=64, max_size=96)
    assert bare_detector.config == detector.config
    _assert_same(bare_detector.predict(image), expected, 0.0, exact=True)


@pytest.mark.parametrize("variant", [name for name, preset in VARIANTS.items()
                                     if preset["architecture"] == "deformable_detr"])  # DETR: tests/test_detr.py
def test_the_variant_is_read_off_the_weights(variant):
    extra = {"dilation": True} if variant == "single_scale_dc5" else {}
    model, _, _ = build_model(variant, num_classes=7, hidden_dim=64, enc_layers=1, dec_layers=2, dim_feedforward=96,
                              num_queries=9, enc_n_points=3, dec_n_points=2,
                              backbone="resnet50" if extra else "resnet18")
    checkpoint = {"model": model.state_dict()}
    config = config_from_checkpoint(checkpoint, "test", variant="single_scale_dc5" if extra else None)
    preset = {"num_feature_levels": 4, "with_box_refine": False, "two_stage": False, "dilation": False,
              **VARIANTS[variant]}
    for name, value in preset.items():
        assert getattr(config, name) == value, name
    assert (config.num_classes, config.hidden_dim, config.enc_layers, config.dec_layers, config.dim_feedforward,
            config.enc_n_points, config.dec_n_points) == (7, 64, 1, 2, 96, 3, 2)
    if not VARIANTS[variant].get("two_stage"):
        assert config.num_queries == 9
    wrong = "two_stage" if variant in ("single_scale", "single_scale_dc5") else "single_scale"
    with pytest.raises(CheckpointError, match="does not fit the checkpoint's weights"):
        config_from_checkpoint(checkpoint, "test", variant=wrong)


def test_settings_given_fill_in_what_the_weights_cannot_tell():
    """An official DC5 checkpoint without args: ``--dilation`` (the DC5 config script's flag) is taken as given,
    while a setting the weights do show is read off them whatever the hint."""
    model, _, _ = build_model("single_scale_dc5", num_classes=7, hidden_dim=64, enc_layers=1, dec_layers=1,
                              dim_feedforward=96, num_queries=9)
    checkpoint = {"model": model.state_dict()}
    assert not config_from_checkpoint(checkpoint, "test").dilation
    config = config_from_checkpoint(checkpoint, "test", hints={"dilation": True, "enc_layers": 6})
    assert config.dilation and config.enc_layers == 1
    # A checkpoint with stored settings ignores hints: its settings are the truth.
    stored = make_checkpoint(model.state_dict(), RunConfigs(dataclasses.replace(config, dilation=False),
                                                            TrainConfig(), DataConfig()), {})
    assert not config_from_checkpoint(stored, "test", hints={"dilation": True}).dilation


def test_every_input_type(ours, tmp_path):
    _, _, path = ours
    detector = Detector.from_checkpoint(path, score_threshold=0.0)
    array = _image(30, 44, seed=2)
    file = tmp_path / "image.png"
    PIL.Image.fromarray(array).save(file)
    reference = detector.predict(PIL.Image.fromarray(array))
    for same in (str(file), file, array, PIL.Image.fromarray(array).convert("RGBA")):
        result = detector.predict(same)
        assert torch.equal(result.boxes, reference.boxes) and torch.equal(result.scores, reference.scores)
    gray = detector.predict(array[..., 0])
    assert torch.equal(gray.boxes, detector.predict(PIL.Image.fromarray(array[..., 0]).convert("RGB")).boxes)

    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    from_tensor = detector.predict(tensor)
    assert from_tensor.image_size == (30, 44) and len(from_tensor) == len(reference)
    # Tensors are resized by torchvision (antialiased), PIL images by PIL: close, not bitwise equal.
    torch.testing.assert_close(from_tensor.scores, reference.scores, atol=0.05, rtol=0)

    # A list of mixed inputs of different sizes = one padded batch, as ddetr eval pads it.
    other = _image(52, 40, seed=3)
    batch = detector.predict([array, PIL.Image.fromarray(other), str(file)], batch_size=3)
    expected = _by_hand(detector.model, [PIL.Image.fromarray(array), PIL.Image.fromarray(other),
                                         PIL.Image.fromarray(array)])
    for detections, wanted in zip(batch, expected):
        _assert_same(detections, wanted, 0.0, exact=False)
    assert [d.image_size for d in batch] == [(30, 44), (52, 40), (30, 44)]
    assert len(detector.predict(tensor[None].expand(2, -1, -1, -1))) == 2  # a (B, 3, H, W) tensor is a list

    with pytest.raises(ValueError, match="image 0: numpy images must be uint8"):
        detector.predict(array.astype(np.float32))
    with pytest.raises(ValueError, match="divide by 255"):
        detector.predict(tensor * 255)
    with pytest.raises(TypeError, match="expected a path, PIL image"):
        detector.predict(42)
    with pytest.raises(OSError, match="missing.png"):
        detector.predict(tmp_path / "missing.png")


def test_a_huge_image_is_resized_and_an_out_of_memory_error_says_what_to_do(ours, monkeypatch):
    _, _, path = ours
    detector = Detector.from_checkpoint(path, score_threshold=0.0)
    huge = np.zeros((3000, 4500, 3), dtype=np.uint8)
    prepared = detector.prepare(huge)
    assert tuple(prepared.image.shape) == (3, 64, 96) and prepared.original_size == (3000, 4500)
    assert detector.predict(huge).image_size == (3000, 4500)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(detector.model, "forward", out_of_memory)
    with pytest.raises(MemoryError, match="lower the batch size, or val_size / max_size"):
        detector.predict(huge)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_precisions(ours, dtype):
    _, _, path = ours
    image = _image(40, 60, seed=7)
    expected = Detector.from_checkpoint(path, score_threshold=0.0).predict(image)
    got = Detector.from_checkpoint(path, dtype=dtype, score_threshold=0.0).predict(image)
    # bfloat16 autocast keeps 8 significant bits: compare the scores only, loosely.
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.scores[:5], expected.scores[:5], atol=tolerance, rtol=0)
    assert got.boxes.dtype == torch.float32


def test_a_file_that_is_not_a_checkpoint_is_refused_with_what_was_found(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pth: unreadable"):
        Detector.from_checkpoint(text)
    other = tmp_path / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(2, 3, 1, 1), "fc.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(CheckpointError, match=r"not a Deformable DETR checkpoint.*conv1\.weight.*lacks"):
        Detector.from_checkpoint(other)
    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    with pytest.raises(CheckpointError, match="found list"):
        Detector.from_checkpoint(listing)
    with pytest.raises(CheckpointError, match="no such file"):
        Detector.from_checkpoint(tmp_path / "absent.pth")


def test_sampling_points_are_the_ones_the_attention_used(ours, monkeypatch):
    model, _, _ = ours
    used = []
    original = ms_deform_attn_module.ms_deform_attn

    def spy(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, **kwargs):
        used.append((sampling_locations.clone(), attention_weights.clone()))
        return original(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, **kwargs)

    monkeypatch.setattr(ms_deform_attn_module, "ms_deform_attn", spy)
    images = torch.randn(2, 3, 64, 80)
    with SamplingPointRecorder(model) as recorder, torch.no_grad():
        model(images)
    # Calls: 1 encoder layer, then 2 decoder layers; the recorder hooks the last one.
    assert len(used) == 3 and len(recorder.records) == 1
    record = recorder.records[0]
    assert torch.equal(record.locations, used[-1][0]) and torch.equal(record.weights, used[-1][1])
    torch.testing.assert_close(record.weights.sum((-1, -2)), torch.ones(2, 12, 8))


def test_draw_sampling_points(ours):
    _, _, path = ours
    detector = Detector.from_checkpoint(path, score_threshold=0.0)
    image = PIL.Image.fromarray(_image(60, 90, seed=4))
    detections = detector.predict(image, sampling_points=True)
    points = detections.sampling_points
    assert points.locations.shape == (12, 8, 4, 2, 2) and points.boxes.shape == (12, 4)
    # The best query's box is the top detection's box (the same query and the same pixels).
    query = int(detections.query_indices[0])
    torch.testing.assert_close(points.boxes[query], detections.boxes[0])
    picture = draw_sampling_points(image, points, query, detector.class_names)
    assert picture.width == 90 * (512 // 90) and picture.height > 60 * (512 // 90)  # enlarged: a small image
    with pytest.raises(ValueError, match=r"query must be in \[0, 12\)"):
        draw_sampling_points(image, points, 12)


def _ddetr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deformable_detr", *args], capture_output=True, text=True,
                          timeout=300)


def test_predict_cli_skips_an_unreadable_file_and_processes_the_rest(ours, tmp_path):
    _, _, path = ours
    folder = tmp_path / "images"
    folder.mkdir()
    PIL.Image.fromarray(_image(40, 60, seed=5)).save(folder / "first.png")
    PIL.Image.fromarray(_image(50, 30, seed=6)).save(folder / "second.jpg")
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    (folder / "readme.txt").write_text("not an image suffix: ignored")
    out = tmp_path / "out"
    result = _ddetr("predict", str(path), str(folder), str(tmp_path / "absent.png"), "--out", str(out),
                    "--score-threshold", "0.05", "--batch-size", "2", "--no-progress", "--show_sampling_points")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "broken.jpg: cannot read the image" in result.stderr and "absent.png: no such file" in result.stderr
    assert "2 input(s) failed" in result.stderr
    results = json.loads((out / "detections.json").read_text())
    assert {r["file_name"] for r in results} == {str(folder / "first.png"), str(folder / "second.jpg")}
    assert {"image_id", "category_id", "bbox", "score"} <= set(results[0])
    assert all(r["score"] >= 0.05 and len(r["bbox"]) == 4 for r in results)
    for name in ("first_detections.png", "second_detections.png", "first_sampling_points.png",
                 "second_sampling_points.png"):
        assert PIL.Image.open(out / name).size[0] > 0
    assert not (out / "broken_detections.png").exists()



def test_predict_cli_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    from deformable_detr.cli import main

    notes = tmp_path / "readme.txt"
    notes.write_text("not a checkpoint")
    assert main(["predict", str(notes), str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "readme.txt: unreadable" in capsys.readouterr().err


def test_export_onnx_matches_pytorch(ours, tmp_path):
    from deformable_detr.inference.export_onnx import check_onnx, export_onnx, sample_inputs

    model, _, _ = ours
    onnx_path = tmp_path / "tiny.onnx"
    # The legacy exporter here (seconds); the command test below runs the default one (torch.export).
    exported = export_onnx(model, onnx_path, 64, 64, num_detections=30, exporter="torchscript")
    # Batches of 2 (with padding) and 3: the batch dimension is dynamic.
    check = check_onnx(onnx_path, exported, [sample_inputs(2, 64, 64, seed=0), sample_inputs(3, 64, 64, seed=1)])
    assert check.labels_equal and check.max_relative_error < 1e-4, check
    import onnx

    metadata = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert metadata["deformable_detr.input_size"] == "64x64"


def test_export_onnx_command(tmp_path, capsys):
    from deformable_detr.cli import main

    # Single-scale: torch.export takes about 15 s on this model, twice that with four levels.
    model, config = _tiny("single_scale")
    path = tmp_path / "single_scale.pth"
    _save_ours(path, model, config)
    out = tmp_path / "model.onnx"
    assert main(["export", "onnx", str(path), str(out), "--size", "64", "96"]) == 0
    printed = capsys.readouterr().out
    assert "dynamo exporter" in printed and "labels equal" in printed and "check passed" in printed
    error = float(printed.split("max relative error scores ")[1].split(",")[0])
    assert error < 1e-4
    # A check that fails (an impossible tolerance) is a non-zero exit.
    command = ["export", "onnx", str(path), str(out), "--size", "64", "96", "--exporter", "torchscript"]
    assert main(command + ["--tolerance", "-1"]) == 1
    assert "disagree" in capsys.readouterr().err


def test_folding_batch_norm_keeps_the_outputs(ours):
    model, _, _ = ours
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_frozen_batchnorm(model)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    images = torch.randn(2, 3, 64, 80)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 60:] = True
    with torch.no_grad():
        expected, got = model(images, mask), folded(images, mask)
        optimised = optimize_for_inference(model)(images.contiguous(memory_format=torch.channels_last), mask)
    for outputs in (got, optimised):
        for key in ("pred_logits", "pred_boxes"):
            error = (outputs[key] - expected[key]).abs().max() / expected[key].abs().max()
            assert error < 2e-5, (key, float(error))


def test_folding_keeps_the_official_reference_outputs(reference_path):
    """The optimised model on the official reference file: within ddetr verify's output tolerance."""
    from deformable_detr.verify.reference_init import apply_ddetr_init_v1

    reference = np.load(reference_path / "deformable_detr.npz")
    model, _, _ = build_model("deformable_detr", num_classes=91)
    apply_ddetr_init_v1(model)
    optimised = optimize_for_inference(model.eval())  # folded, in-place ReLUs, channels-last
    images = torch.from_numpy(reference["in.images"]).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        outputs = optimised(images, torch.from_numpy(reference["in.mask"]))
    for key in ("pred_logits", "pred_boxes"):
        expected = torch.from_numpy(reference[f"out.{key}"])
        error = (outputs[key] - expected).abs().max() / expected.abs().max()
        assert error <= 2e-5, (key, float(error))


def test_a_missing_optional_package_and_an_absent_gpu_are_one_line_errors(ours, tmp_path, monkeypatch, capsys):
    from deformable_detr.cli import main

    _, _, path = ours
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the export extra were not installed
    assert main(["export", "onnx", str(path), str(tmp_path / "m.onnx"), "--size", "64", "64"]) == 2
    assert "pip install 'deformable-detr[export]'" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["predict", str(path), str(tmp_path), "--out", str(tmp_path / "p"), "--device", "cuda"]) == 2
    assert "device 'cuda': CUDA is not available on this machine" in capsys.readouterr().err
