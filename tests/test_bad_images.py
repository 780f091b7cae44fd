"""Odd images lose no work: ``ddetr predict`` names an image it cannot run and goes on (batches included), the model
runs on 1 x 1 feature maps, datasets skip degenerate images, ``Detector.predict`` refuses non-finite pixels and
thresholds outside [0, 1], and a training set reports the images whose boxes are all dropped."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from helpers.tiny import TINY_MODEL_FLAGS, TINY_RUN_FLAGS, data_flags, user_environment
from torch import nn

from deformable_detr.checkpoint import make_checkpoint, save_checkpoint
from deformable_detr.cli import main
from deformable_detr.config import DataConfig, RunConfigs, TrainConfig, model_config
from deformable_detr.data import build_coco_dataset, make_coco_transforms, make_synthetic_dataset
from deformable_detr.data.coco import (
    CocoDetection,
    DegenerateImageError,
    images_with_all_boxes_dropped,
    load_coco_annotations,
    prepare_coco_target,
)
from deformable_detr.data.transforms import ImageSizeError, get_size_with_aspect_ratio
from deformable_detr.inference.detector import Detector
from deformable_detr.model.build import build_from_config
from deformable_detr.model.deformable_detr import GroupNorm

# hidden_dim 32 in GroupNorm's 32 groups: one channel per group, so a 1 x 1 feature map is one value per group.
TINY = dict(backbone="resnet18", hidden_dim=32, nheads=8, enc_layers=1, dec_layers=2, dim_feedforward=64,
            num_queries=12, enc_n_points=2, dec_n_points=2)


def _tiny_model(variant: str = "box_refine"):
    config = model_config(variant, num_classes=5, **TINY)
    torch.manual_seed(0)
    model, _, _ = build_from_config(config)
    with torch.no_grad():
        for head in model.class_embed:  # spread the scores
            head.bias.normal_(0.0, 2.0)
    return model.eval(), config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A ddetr train checkpoint of the tiny model; its eval resize is 64 / 96, so a square image becomes 64 x 64,
    whose last feature level is 1 x 1."""
    model, config = _tiny_model()
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    save_checkpoint(path, make_checkpoint(model.state_dict(),
                                          RunConfigs(config, TrainConfig(), DataConfig(val_size=64, max_size=96)),
                                          {i: f"c{i}" for i in range(5)}, epoch=0))
    return path


def _image(height: int, width: int, seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _written_names(out: Path) -> set[str]:
    return {Path(r["file_name"]).name for r in json.loads((out / "detections.json").read_text())}


# ----------------------------------------------------------------------------------------------- ddetr predict


def test_predict_names_an_image_it_cannot_run_and_goes_on(checkpoint, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    _image(40, 60, 1).save(folder / "a.png")
    _image(64, 64, 2).save(folder / "b_square.png")  # 1 x 1 last level: GroupNorm refused it, the run stopped
    _image(2, 4000, 3).save(folder / "c_wide.png")  # the eval resize makes its short side 0 pixels
    _image(50, 30, 4).save(folder / "d.png")
    out = tmp_path / "out"
    code = main(["predict", str(checkpoint), str(folder), "--out", str(out), "--score_threshold", "0",
                 "--no_progress"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert (f"ddetr predict: skipped {folder / 'c_wide.png'}: the image is 4000x2 pixels, too elongated for the "
            "resize (short side 64, long side at most 96): its short side would become 0 pixels; the long side must "
            "be less than 192 times the short side\n") in err
    assert "ddetr predict: 1 input(s) failed, 3 image(s) processed:" in err
    assert _written_names(out) == {"a.png", "b_square.png", "d.png"}
    assert (out / "b_square_detections.png").is_file() and not (out / "c_wide_detections.png").exists()


def test_a_batch_the_model_fails_on_is_rerun_image_by_image(checkpoint, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    for n, (height, width) in enumerate([(40, 60), (33, 77), (50, 30), (45, 45)]):
        _image(height, width, n).save(folder / f"{n}.png")
    run_batch = Detector.run_batch

    def failing_on_one_image(self, prepared, *args, **kwargs):  # a model error that only the 77x33 image causes
        if any(item.original_size == (33, 77) for item in prepared):
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCompile with "
                               "`TORCH_USE_CUDA_DSA` to enable device-side assertions.")
        return run_batch(self, prepared, *args, **kwargs)

    monkeypatch.setattr(Detector, "run_batch", failing_on_one_image)
    out = tmp_path / "out"
    code = main(["predict", str(checkpoint), str(folder), "--out", str(out), "--batch_size", "3",
                 "--score_threshold", "0", "--no_progress"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert ("ddetr predict: a batch of 3 images failed (RuntimeError: CUDA error: an illegal memory access was "
            "encountered Compile with") in err
    assert (f"ddetr predict: skipped {folder / '1.png'}: the model failed on this image (RuntimeError: CUDA error: "
            "an illegal memory access was encountered Compile with `TORCH_USE_CUDA_DSA` to enable device-side "
            "assertions.)\n") in err
    assert "1 input(s) failed, 3 image(s) processed" in err
    assert _written_names(out) == {"0.png", "2.png", "3.png"}
    ids = {Path(r["file_name"]).name: r["image_id"] for r in json.loads((out / "detections.json").read_text())}
    assert ids == {"0.png": 1, "2.png": 2, "3.png": 3}  # input order kept


@pytest.mark.parametrize("value", ["2", "-0.1", "nan"])
def test_predict_refuses_a_score_threshold_outside_0_1_before_reading_the_checkpoint(checkpoint, tmp_path, capsys,
                                                                                     value):
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(tmp_path), "--out", str(out), "--score_threshold", value]) == 2
    assert capsys.readouterr().err == (f"ddetr predict: --score_threshold must be a number in [0, 1], got "
                                       f"{float(value)}\n")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------- Detector


def test_detector_refuses_thresholds_outside_0_1_and_non_finite_pixels(checkpoint):
    detector = Detector.from_checkpoint(checkpoint)
    image = np.asarray(_image(40, 60, 0))
    for threshold in (2, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"^score_threshold must be a number in \[0, 1\], got {threshold}$"):
            detector.predict(image, score_threshold=threshold)
    with pytest.raises(ValueError, match=r"score_threshold must be a number in \[0, 1\], got nan"):
        Detector.from_checkpoint(checkpoint, score_threshold=float("nan"))
    assert len(detector.predict(image, score_threshold=1)) == 0

    pixels = torch.rand(3, 40, 60)
    for bad in (float("nan"), float("inf"), -float("inf")):
        spoilt = pixels.clone()
        spoilt[1, 5, 7] = bad
        with pytest.raises(ValueError, match=r"^image 1: the tensor holds 1 non-finite value\(s\) \(NaN or inf\) "
                                             r"of 7200; pixels must be finite, in \[0, 1\]$"):
            detector.predict([pixels, spoilt])


@pytest.mark.parametrize("empty", [np.zeros((0, 0, 3), np.uint8), np.zeros((5, 0, 3), np.uint8),
                                   PIL.Image.new("RGB", (0, 0)), torch.zeros(3, 0, 0), torch.zeros(3, 4, 0)],
                         ids=["array0x0", "array0x5", "pil0x0", "tensor0x0", "tensor0x4"])
def test_an_empty_image_is_a_clear_error_not_a_zero_division(checkpoint, empty):
    detector = Detector.from_checkpoint(checkpoint)
    with pytest.raises(ImageSizeError, match=r"^image 0: .*(an empty image cannot be resized|no pixels)"):
        detector.predict(empty)


def test_the_size_rule_refuses_empty_and_too_elongated_images_by_name_of_the_limit():
    with pytest.raises(ImageSizeError, match=r"^the image is 0x0 pixels: an empty image cannot be resized$"):
        get_size_with_aspect_ratio((0, 0), 800, 1333)
    with pytest.raises(ImageSizeError, match=r"4000x1 pixels, too elongated .* less than 2666 times"):
        get_size_with_aspect_ratio((4000, 1), 800, 1333)
    # The limit is exact: below 2 * max_size the short side is 1 pixel, as officially.
    assert get_size_with_aspect_ratio((2665, 1), 800, 1333) == (1, 2665)
    with pytest.raises(ImageSizeError):
        get_size_with_aspect_ratio((2666, 1), 800, 1333)
    with pytest.raises(ImageSizeError, match="empty image"):  # the training transforms too
        make_coco_transforms("train")(PIL.Image.new("RGB", (0, 0)), None)


# ----------------------------------------------------------------------------------------- small feature maps


def test_group_norm_normalises_a_single_value_per_group_and_is_bitwise_nn_group_norm_otherwise():
    torch.manual_seed(0)
    ours, reference = GroupNorm(32, 64), nn.GroupNorm(32, 64)
    weight, bias = torch.randn(64), torch.randn(64)
    with torch.no_grad():
        for module in (ours, reference):
            module.weight.copy_(weight)
            module.bias.copy_(bias)
    for shape in [(2, 64, 5, 7), (1, 64, 1, 1), (1, 64, 1, 3)]:
        x = torch.randn(shape)
        assert torch.equal(ours(x), reference(x))
    one_value = torch.randn(1, 32, 1, 1, requires_grad=True)
    narrow = GroupNorm(32, 32)
    with torch.no_grad():
        narrow.bias.copy_(torch.arange(32.0))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        nn.GroupNorm(32, 32)(one_value)  # what the model met before
    output = narrow(one_value)
    torch.testing.assert_close(output.flatten(), torch.arange(32.0), rtol=0, atol=1e-3)  # the bias (x - mean = 0)
    assert torch.equal(narrow(torch.cat([one_value, one_value])).detach()[0], output.detach()[0])  # as batched
    output.sum().backward()
    assert torch.isfinite(one_value.grad).all()


def test_the_model_runs_on_1x1_feature_maps_as_it_does_in_a_batch(checkpoint):
    detector = Detector.from_checkpoint(checkpoint, score_threshold=0.0)
    square = _image(64, 64, 7)  # 64 x 64 after the resize: levels 8x8, 4x4, 2x2, 1x1
    alone = detector.predict(square)
    together = detector.predict([square, square], batch_size=2)  # a batch of two passed GroupNorm's check before
    torch.testing.assert_close(alone.scores, together[0].scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone.boxes, together[0].boxes, rtol=1e-5, atol=1e-4)
    assert len(detector.predict(_image(1, 1, 8))) > 0  # a 1-pixel image, resized to 64 x 64

    model, _ = _tiny_model("deformable_detr")
    model.train()
    outputs = model(torch.randn(1, 3, 1, 1))  # every level 1 x 1, in training too
    outputs.pred_boxes.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_two_stage_model_names_the_smallest_input_it_can_run():
    model, config = _tiny_model("two_stage")  # 12 queries, taken from the feature-map positions
    with pytest.raises(ValueError, match=r"^an input of 8x8 pixels \(height x width\) is too small: its feature maps "
                                         r"\(1x1, 1x1, 1x1, 1x1\) have 4 positions, fewer than the 12 queries this "
                                         r"two-stage model selects among them; a square input needs at least 17x17 "
                                         r"pixels$"):
        model(torch.randn(1, 3, 8, 8))  # was: "selected index k out of range", from torch.topk
    with torch.no_grad():
        model(torch.randn(1, 3, 17, 17))
    detector = Detector(model, config, val_size=17, max_size=40)
    assert len(detector.predict(np.zeros((40, 40, 3), np.uint8), score_threshold=0)) > 0  # 17 x 17
    with pytest.raises(ImageSizeError, match=r"^image 1: 400x20 pixels, 40x2 after the eval resize \(val_size 17, "
                                             r"max_size 40\), is too small: its feature maps \(1x5, 1x3, 1x2, 1x1\) "
                                             r"have 11 positions, fewer than the 12 queries"):
        detector.predict([np.zeros((40, 40, 3), np.uint8), np.zeros((20, 400, 3), np.uint8)])


# ----------------------------------------------------------------------------------------------------- datasets


def _write(root: Path, images: dict[str, PIL.Image.Image], annotations: dict[str, list[dict]]) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries, boxes = [], []
    for image_id, (name, image) in enumerate(images.items(), start=1):
        image.save(root / "images" / name)
        entries.append({"id": image_id, "file_name": name, "width": image.width, "height": image.height})
        for annotation in annotations.get(name, []):
            boxes.append({"id": len(boxes) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0, **annotation})
    path = root / "anno.json"
    path.write_text(json.dumps({"images": entries, "annotations": boxes, "categories": [{"id": 1, "name": "x"}]}))
    return path


def test_a_dataset_skips_degenerate_images_with_a_warning_and_counts_them(tmp_path):
    path = _write(tmp_path, {"a.png": _image(24, 32, 0), "thin.png": _image(1, 200, 1), "dot.png": _image(1, 1, 2),
                             "long.png": _image(2, 300, 3), "b.png": _image(24, 32, 4)}, {})
    dataset = CocoDetection(tmp_path / "images", path, make_coco_transforms("val", val_size=24, max_size=40))
    with pytest.warns(UserWarning) as record:
        image, target = dataset[1]
    assert target["image_id"].item() == 5 and dataset.num_skipped == 3
    messages = [str(w.message) for w in record]
    folder = tmp_path / "images"
    assert messages == [
        f"{folder / 'thin.png'}: the image is 200x1 pixels; a side under 2 pixels is not a usable image; skipped (the "
        "next readable image is used instead)",
        f"{folder / 'dot.png'}: the image is 1x1 pixels; a side under 2 pixels is not a usable image; skipped (the "
        "next readable image is used instead)",
        f"{folder / 'long.png'}: the image is 300x2 pixels, too elongated for the resize (short side 24, long side at "
        "most 40): its short side would become 0 pixels; the long side must be less than 80 times the short side; "
        "skipped (the next readable image is used instead)"]
    strict = CocoDetection(folder, path, make_coco_transforms("val", val_size=24, max_size=40), strict=True)
    with pytest.raises(DegenerateImageError, match="thin.png: the image is 200x1 pixels"):
        strict[1]
    with pytest.raises(DegenerateImageError, match="long.png: the image is 300x2 pixels, too elongated"):
        strict[3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert strict[0][1]["image_id"].item() == 1


def test_the_boxes_all_dropped_scan_agrees_with_target_preparation(tmp_path):
    rng = np.random.default_rng(0)
    images = {f"{n}.png": _image(int(rng.integers(2, 30)), int(rng.integers(2, 30)), n) for n in range(60)}
    annotations = {}
    for name, image in images.items():
        annotations[name] = [{"bbox": [float(v) for v in rng.choice([-5.0, 0.0, 0.5, 3.0, 1e-9, 29.0, 40.0], 2)]
                              + [float(v) for v in rng.choice([-1.0, 0.0, 1e-9, 2.0, 10.0], 2)],
                              "iscrowd": int(rng.random() < 0.2)} for _ in range(int(rng.integers(0, 3)))]
    coco = load_coco_annotations(_write(tmp_path, images, annotations))
    dropped = images_with_all_boxes_dropped(coco)
    expected = {}
    for image_id, info in coco.imgs.items():
        anns = coco.imgToAnns.get(image_id, [])
        if anns and len(prepare_coco_target((info["width"], info["height"]), image_id, anns)["boxes"]) == 0:
            expected[image_id] = "crowd only" if all(a["iscrowd"] for a in anns) else "no box inside the image"
    assert dropped == expected and 5 < len(expected) < 50


def test_a_training_set_warns_once_about_images_whose_boxes_are_all_dropped(tmp_path):
    images = {f"{n}.png": _image(20, 30, n) for n in range(1, 10)}
    normal = [{"bbox": [2, 3, 10, 8]}]
    annotations = {"1.png": normal, "2.png": [{"bbox": [40, 3, 10, 8]}, {"bbox": [2, 3, 0, 8]}],  # outside, no width
                   "3.png": [{"bbox": [2, 3, 10, 8], "iscrowd": 1}], "4.png": normal + [{"bbox": [50, 50, 5, 5]}],
                   "5.png": [{"bbox": [2, 25, 10, 8]}], "6.png": [{"bbox": [-12, 3, 10, 8]}],
                   "7.png": [{"bbox": [3, 3, 5, -2]}], "8.png": [],
                   "9.png": [{"bbox": [2, 3, 10, 8], "iscrowd": 1}, {"bbox": [100, 3, 5, 5]}]}
    path = _write(tmp_path, images, annotations)
    with pytest.warns(UserWarning) as record:
        train = build_coco_dataset("train", images=tmp_path / "images", annotations=path)
    assert [str(w.message) for w in record] == [
        f"{path}: 6 of 8 annotated image(s) have no box left once their targets are prepared (1 crowd only, 5 no box "
        "inside the image), so they train as background only: image ids 2 (2.png: no box inside the image), 3 (3.png: "
        "crowd only), 5 (5.png: no box inside the image), 6 (6.png: no box inside the image), 7 (7.png: no box "
        "inside the image), and 1 more"]
    assert list(train.images_with_all_boxes_dropped) == [2, 3, 5, 6, 7, 9]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_coco_dataset("val", images=tmp_path / "images", annotations=path)  # evaluation uses the JSON itself
        train[0]  # nor per item: the augmentation's crops drop boxes as they should
    clean = _write(tmp_path / "clean", {"1.png": _image(20, 30, 1), "2.png": _image(20, 30, 2)}, {"1.png": normal})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_coco_dataset("train", images=tmp_path / "clean" / "images", annotations=clean)


def test_ddetr_train_skips_a_degenerate_image_and_reports_background_only_images(tmp_path):
    """A 200x1 image stopped training mid-epoch ("height and width must be > 0"); now it is skipped, by name."""
    data = make_synthetic_dataset(tmp_path / "data", num_train=4, num_val=2, image_size=64, seed=0)
    coco = json.loads(data.train_json.read_text())
    _image(1, 200, 0).save(data.train_images / "thin.png")
    coco["images"].append({"id": 99, "file_name": "thin.png", "width": 200, "height": 1})
    coco["annotations"].append({"id": 999, "image_id": 99, "category_id": 1, "bbox": [10, 0, 20, 1], "area": 20,
                                "iscrowd": 0})
    first = coco["images"][0]["id"]
    for annotation in coco["annotations"]:
        if annotation["image_id"] == first:
            annotation["bbox"][0] += 500  # outside the image
    data.train_json.write_text(json.dumps(coco))
    annotated = len({a["image_id"] for a in coco["annotations"]})
    command = [sys.executable, "-m", "deformable_detr", "train", *TINY_MODEL_FLAGS, *TINY_RUN_FLAGS, *data_flags(data),
               "--epochs", "1", "--no_progress", "--print_freq", "0"]
    run = subprocess.run([*command, "--output_dir", str(tmp_path / "run")], capture_output=True, text=True,
                         env=user_environment(), timeout=600)
    assert run.returncode == 0, run.stderr
    assert (f"{data.train_images / 'thin.png'}: the image is 200x1 pixels; a side under 2 pixels is not a usable "
            "image; skipped (the next readable image is used instead)") in run.stderr
    assert (f"{data.train_json}: 1 of {annotated} annotated image(s) have no box left once their targets are "
            f"prepared (1 no box inside the image), so they train as background only: image ids {first} "
            f"({coco['images'][0]['file_name']}: no box inside the image)") in run.stderr
    assert (tmp_path / "run" / "checkpoint.pth").is_file()
    strict = subprocess.run([*command, "--output_dir", str(tmp_path / "strict"), "--strict"], capture_output=True,
                            text=True, env=user_environment(), timeout=600)
    assert strict.returncode == 2, strict.stderr
    assert strict.stderr.strip().endswith(f"ddetr train: {data.train_images / 'thin.png'}: the image is 200x1 "
                                          "pixels; a side under 2 pixels is not a usable image")
