"""ONNX export with a dynamic image size: one graph, exported once through ``ddetr export onnx --dynamic``, run by
onnxruntime at sizes it was not traced at (padded batches included) against the PyTorch model at those sizes; the
mask downsampling that makes it exact, against ``F.interpolate``; the minimum size, computed by hand."""

from __future__ import annotations

import subprocess

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from helpers.tiny import user_environment

from deformable_detr.checkpoint import make_checkpoint, save_checkpoint
from deformable_detr.config import DataConfig, RunConfigs, TrainConfig, model_config
from deformable_detr.data.collate import batch_images
from deformable_detr.inference.detector import Detector
from deformable_detr.inference.export_onnx import ExportableDetector, check_onnx, min_dynamic_side, sample_inputs
from deformable_detr.model.backbone import downsample_mask
from deformable_detr.model.build import build_from_config

TINY = dict(backbone="resnet18", hidden_dim=32, nheads=8, enc_layers=1, dec_layers=2, dim_feedforward=64,
            num_queries=12, enc_n_points=2, dec_n_points=2)
TOLERANCE = 1e-4  # as the fixed-size export tests (relative to the largest |PyTorch| value)


def _tiny(variant: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model, _, _ = build_from_config(model_config(variant, num_classes=5, **{**TINY, **overrides}))
    with torch.no_grad():  # spread the class scores, so that the ranking of the detections is not a tie
        for head in model.class_embed:
            head.bias.normal_(0.0, 2.0)
    return model.eval()


def test_downsampled_masks_are_the_pixels_f_interpolate_picks():
    """Legacy nearest: src = min(floor(dst * float32(in / out)), in - 1), for shrinking and growing, including
    sizes where dst * in / out is a whole number (120 -> 4: rows 0, 30, 60, 90), which ONNX Resize gets wrong when
    it divides by out / in."""
    generator = torch.Generator().manual_seed(0)
    pairs = [(height, -(-height // stride)) for height in [*range(1, 130), 333, 799, 800, 1066, 1333, 2047]
             for stride in (1, 2, 8, 16, 32, 64)] + [(3, 7), (5, 11), (10, 6), (120, 4)]
    for height, out in pairs:
        mask = torch.rand(2, height, 9, generator=generator) > 0.5
        expected = F.interpolate(mask[None].float(), size=(out, 4)).to(torch.bool)[0]
        assert torch.equal(downsample_mask(mask, (out, 4)), expected), (height, out)
    mask = torch.zeros(1, 120, 8, dtype=torch.bool)
    mask[:, 90:] = True
    assert downsample_mask(mask, (4, 8))[0, :, 0].tolist() == [False, False, False, True]


@pytest.mark.parametrize(("variant", "overrides", "side"), [
    ("single_scale", {}, 33),  # stride 32: ceil(33 / 32) = 2
    ("single_scale_dc5", {"backbone": "resnet50"}, 17),  # stride 16 (dilated layer4)
    ("deformable_detr", {}, 65),  # the fourth level, stride 64
    # 300 proposals: at 113, 15^2 + 8^2 + 4^2 + 2^2 = 309 positions; at 112, 14^2 + 7^2 + 4^2 + 2^2 = 265
    ("two_stage", {"num_queries": 300}, 113),
])
def test_the_smallest_dynamic_size_by_hand(variant, overrides, side):
    assert min_dynamic_side(_tiny(variant, **overrides)) == side


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = _tiny("single_scale")  # single-scale: torch.export takes half the time of four levels
    path = tmp_path_factory.mktemp("dynamic") / "checkpoint.pth"
    data = DataConfig(val_size=64, max_size=96)
    configs = RunConfigs(model_config("single_scale", num_classes=5, **TINY), TrainConfig(), data)
    save_checkpoint(path, make_checkpoint(model.state_dict(), configs, {0: "zero", 1: "circle", 2: "square",
                                                                         3: "star", 4: "cross"}, epoch=1))
    return path


@pytest.fixture(scope="module")
def exported(checkpoint):
    """``ddetr export onnx CHECKPOINT OUT --dynamic --size 96 128`` as a user types it."""
    out = checkpoint.parent / "dynamic.onnx"
    result = subprocess.run(["ddetr", "export", "onnx", str(checkpoint), str(out), "--dynamic", "--size", "96", "128"],
                            capture_output=True, text=True, env=user_environment(), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_the_command_exports_any_size_and_checks_two(exported):
    import onnx

    path, printed = exported
    assert "input any HxW from 33x33 (traced at 96x128)" in printed
    # The check ran at the traced size and at a second one (97 x 73: other orientation, odd sides).
    assert "batches of 2 at 96x128, 1 at 97x73" in printed and "labels equal" in printed
    assert "check passed" in printed
    error = float(printed.split("max relative error scores ")[1].split(",")[0])
    assert error < TOLERANCE
    proto = onnx.load(str(path))
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert metadata["deformable_detr.input_size"] == "dynamic"
    assert metadata["deformable_detr.min_input_size"] == "33x33"
    images = next(i for i in proto.graph.input if i.name == "images").type.tensor_type.shape.dim
    # batch, height and width are named dimensions of the graph; the channels are fixed
    assert [bool(d.dim_param) for d in images] == [True, False, True, True] and images[1].dim_value == 3


def test_the_dynamic_graph_equals_pytorch_at_other_sizes(checkpoint, exported):
    path, _ = exported
    detector = Detector.from_checkpoint(checkpoint, score_threshold=0.0)  # the backend a user gets (auto)
    module = ExportableDetector(detector.model, detector.config.num_detections).eval()
    # 96 x 128 (the traced size), 120 x 88 (padded images in a batch of 3), 65 x 200, 161 x 97: neither traced
    # nor multiples of the stride.
    inputs = [sample_inputs(2, 96, 128, seed=1), sample_inputs(3, 120, 88, seed=2), sample_inputs(1, 65, 200, seed=3),
              sample_inputs(2, 161, 97, seed=4)]
    check = check_onnx(path, module, inputs)
    assert check.image_sizes == [(96, 128), (120, 88), (65, 200), (161, 97)]
    assert check.labels_equal and check.max_relative_error < TOLERANCE, check


def test_the_dynamic_graph_runs_a_padded_batch_of_real_images_as_the_detector(checkpoint, exported):
    import onnxruntime

    path, _ = exported
    detector = Detector.from_checkpoint(checkpoint, score_threshold=0.0)
    rng = np.random.default_rng(0)
    pictures = [PIL.Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h))
                for h, w in ((150, 210), (200, 130))]
    prepared = [detector.prepare(picture) for picture in pictures]
    expected = detector.run_batch(prepared)
    images, mask = batch_images([p.image for p in prepared])
    # Two eval-resized sizes (landscape and portrait) padded to a third, none of them the traced 96 x 128.
    sizes = {tuple(p.image.shape[1:]) for p in prepared} | {tuple(images.shape[2:])}
    assert len(sizes) == 3 and (96, 128) not in sizes and bool(mask[0].any()) and bool(mask[1].any()), sizes
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sizes = np.array([[p.height, p.width] for p in pictures])
    scores, labels, boxes = session.run(None, {"images": images.numpy(), "mask": mask.numpy(), "original_sizes": sizes})
    for index, detections in enumerate(expected):
        np.testing.assert_allclose(scores[index], detections.scores.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(boxes[index], detections.boxes.numpy(), rtol=1e-4, atol=1e-3)
        np.testing.assert_array_equal(labels[index], detections.labels.numpy())


@pytest.mark.parametrize(("flags", "message"), [
    (["--exporter", "torchscript"], "a dynamic image size needs the dynamo exporter, got exporter 'torchscript'"),
    (["--size", "32", "128"], "the example size of a dynamic export must be at least 33 x 33 (every feature map "
                              "2 x 2 or more), got 32 x 128"),
])
def test_a_dynamic_export_that_cannot_work_is_one_line(checkpoint, tmp_path, capsys, flags, message):
    from deformable_detr.cli import main

    assert main(["export", "onnx", str(checkpoint), str(tmp_path / "m.onnx"), "--dynamic", *flags]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()
