"""The user's journey, through the real ``ddetr`` entry point as typed in a shell, each step reading what the step
before wrote: make-synthetic -> train -> eval (no model flags) -> predict (with sampling points, ids of the ground
truth) -> export onnx -> train --resume -> fine-tune on another class count.

Each step's output is checked against numbers someone else produced: the eval AP against the training log,
predict's JSON scored by pycocotools, the ONNX file run by onnxruntime against PyTorch.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from helpers.tiny import TINY_MODEL_FLAGS, TINY_RUN_FLAGS, user_environment


def ddetr(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``ddetr ARGS`` in a shell whose virtual environment is active; fails the test on a non-zero exit."""
    result = subprocess.run(["ddetr", *args], capture_output=True, text=True, env=user_environment(), cwd=cwd,
                            timeout=900)
    assert result.returncode == 0, f"ddetr {' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]


def _coco_stats(ground_truth: Path, detections: list[dict]) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(ground_truth))
        evaluation = COCOeval(truth, truth.loadRes(detections), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats.tolist()


@pytest.fixture(scope="module")
def journey(tmp_path_factory) -> Path:
    """make-synthetic, then a 2-epoch training run of a tiny model (the steps below read what these wrote)."""
    home = tmp_path_factory.mktemp("journey")
    ddetr("make-synthetic", "--out", "data", "--num_train", "8", "--num_val", "6", "--image_size", "64",
          "--colour_by_class", cwd=home)
    ddetr("train", *TINY_MODEL_FLAGS, *TINY_RUN_FLAGS, "--train_images", "data/train", "--train_json",
          "data/train.json", "--val_images", "data/val", "--val_json", "data/val.json", "--epochs", "2",
          "--lr", "1e-3", "--output_dir", "run", "--no_progress", cwd=home)
    return home


def test_train_writes_what_the_other_commands_read(journey):
    log = _log(journey / "run")
    assert [entry["epoch"] for entry in log] == [0, 1] and len(log[-1]["test_coco_eval_bbox"]) == 12
    checkpoint = torch.load(journey / "run" / "checkpoint.pth", weights_only=True)  # plain data only
    assert checkpoint["epoch"] == 1 and checkpoint["config"]["model"]["num_classes"] == 6


def test_eval_needs_no_model_or_data_flags_and_gives_the_training_numbers(journey):
    # From another folder: the checkpoint stores the data's absolute paths.
    elsewhere = journey / "elsewhere"
    elsewhere.mkdir()
    result = ddetr("eval", str(journey / "run" / "checkpoint.pth"), "--output_dir", "eval", "--no_progress",
                   cwd=elsewhere)
    stats = json.loads((elsewhere / "eval" / "eval.json").read_text())
    assert stats["test_coco_eval_bbox"] == _log(journey / "run")[-1]["test_coco_eval_bbox"]
    assert "Average Precision" in result.stdout


def test_predict_writes_detections_pycocotools_scores_against_the_ground_truth(journey):
    result = ddetr("predict", "run/checkpoint.pth", "data/val", "--out", "predictions", "--score_threshold", "0",
                   "--batch_size", "2", "--coco_json", "data/val.json", "--show_sampling_points", "--no_progress",
                   cwd=journey)
    assert "6 image(s)" in result.stdout
    detections = json.loads((journey / "predictions" / "detections.json").read_text())
    truth = json.loads((journey / "data" / "val.json").read_text())
    ids = {image["file_name"]: image["id"] for image in truth["images"]}
    assert {Path(d["file_name"]).name for d in detections} == set(ids)
    assert all(ids[Path(d["file_name"]).name] == d["image_id"] for d in detections)
    # Scored by pycocotools directly: the same images, the same padded batches and the same top-100 as ddetr eval,
    # so the same COCO numbers up to the rounding of the JSON (boxes to 1e-3 px, scores to 1e-5).
    stats = _coco_stats(journey / "data" / "val.json", detections)
    expected = _log(journey / "run")[-1]["test_coco_eval_bbox"]
    # All-zero numbers would prove nothing; a wrong image id would lose the matches that make these non-zero.
    assert max(expected) > 0, expected
    np.testing.assert_allclose(stats, expected, rtol=1e-3, atol=1e-6)
    for name in sorted(ids)[:2]:
        stem = Path(name).stem
        for suffix in ("detections", "sampling_points"):
            picture = PIL.Image.open(journey / "predictions" / f"{stem}_{suffix}.png")
            assert max(picture.size) >= 256  # small images are enlarged, so the labels do not cover them


def test_export_onnx_equals_pytorch_on_a_real_image(journey):
    # 80 x 80: every image the checkpoint's eval resize (short side 64, long side at most 80) makes fits.
    result = ddetr("export", "onnx", "run/checkpoint.pth", "detector.onnx", "--size", "80", "80", "--exporter",
                   "torchscript", cwd=journey)
    assert "check passed" in result.stdout

    import onnxruntime

    from deformable_detr.data.collate import batch_images
    from deformable_detr.inference.detector import Detector, PreparedImage

    detector = Detector.from_checkpoint(journey / "run" / "checkpoint.pth", score_threshold=0.0)
    image = PIL.Image.open(sorted((journey / "data" / "val").iterdir())[0]).convert("RGB")
    prepared = detector.prepare(image)
    # The export size is fixed: the image padded to it, its padding marked in the mask. The detector sees the same
    # padding when batched with an image of the export size.
    canvas = PreparedImage(torch.zeros(3, 80, 80), (80, 80))
    expected = detector.run_batch([prepared, canvas])[0]
    images, mask = batch_images([prepared.image, canvas.image])
    session = onnxruntime.InferenceSession(str(journey / "detector.onnx"), providers=["CPUExecutionProvider"])
    scores, labels, boxes = session.run(None, {"images": images[:1].numpy(), "mask": mask[:1].numpy(),
                                               "original_sizes": np.array([[image.height, image.width]])})
    np.testing.assert_allclose(scores[0], expected.scores.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(boxes[0], expected.boxes.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(labels[0], expected.labels.numpy())


def test_resume_continues_with_the_stored_settings(journey):
    before = torch.load(journey / "run" / "checkpoint.pth", weights_only=True)
    result = ddetr("train", "--resume", "run/checkpoint.pth", "--epochs", "3", "--no_progress", cwd=journey)
    assert "epochs 2..2" in result.stdout
    log = _log(journey / "run")
    assert [entry["epoch"] for entry in log] == [0, 1, 2]
    after = torch.load(journey / "run" / "checkpoint.pth", weights_only=True)
    assert after["epoch"] == 2 and after["config"]["model"] == before["config"]["model"]
    assert after["config"]["data"] == before["config"]["data"] and after["config"]["train"]["epochs"] == 3


def test_finetune_on_another_class_count(journey):
    ddetr("train", "--finetune", "run/checkpoint.pth", "--drop_class_heads", "--num_classes", "9",
          "--train_images", "data/train", "--train_json", "data/train.json", "--val_images", "data/val",
          "--val_json", "data/val.json", "--epochs", "1", "--output_dir", "finetuned", "--pretrained_backbone", "none",
          "--device", "cpu", "--num_workers", "0", "--val_size", "64", "--max_size", "80", "--train_scales", "64",
          "--crop_resize_sizes", "64", "--crop_size", "48", "64", "--no_progress", cwd=journey)
    source = torch.load(journey / "run" / "checkpoint.pth", weights_only=True)
    tuned = torch.load(journey / "finetuned" / "checkpoint.pth", weights_only=True)
    assert tuned["model"]["class_embed.0.weight"].shape == (9, 32)
    # No model flag but the class count: the architecture is the checkpoint's.
    assert {**source["config"]["model"], "num_classes": 9} == tuned["config"]["model"]
    # A contradicting flag is refused with both values, and nothing is written.
    result = subprocess.run(["ddetr", "train", "--finetune", "run/checkpoint.pth", "--enc_layers", "3",
                             "--output_dir", "refused", "--train_images", "data/train", "--train_json",
                             "data/train.json", "--val_images", "data/val", "--val_json", "data/val.json"],
                            capture_output=True, text=True, env=user_environment(), cwd=journey, timeout=300)
    assert result.returncode == 2 and "enc_layers 3 here, 1 in the checkpoint" in result.stderr
    assert not (journey / "refused").exists()
