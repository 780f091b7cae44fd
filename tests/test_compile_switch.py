"""The compile switch (``Detector(..., compile=...)``, ``ddetr predict/eval/train --compile``): torch.compile of the
model gives the eager model's detections, and the first call's cost is printed once."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from helpers.tiny import user_environment

from deformable_detr.checkpoint import make_checkpoint, save_checkpoint
from deformable_detr.config import DataConfig, RunConfigs, TrainConfig, model_config
from deformable_detr.data import make_synthetic_dataset
from deformable_detr.inference.detector import Detector
from deformable_detr.model.build import build_from_config

# The smallest model: compiling on the CPU costs about a second per generated kernel.
TINY = model_config("single_scale", num_classes=5, backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1,
                    dec_layers=1, dim_feedforward=64, num_queries=8)


def _random_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_from_config(TINY)[0]
    # Random heads, so that scores and boxes differ between queries (the init gives every query the same score).
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def test_compiled_detector_equals_the_eager_one(capsys):
    """Dynamo's graph of the whole detector and AOTAutograd (the aot_eager backend: the compiler front end without
    code generation, seconds on the CPU); the inductor code generation is checked through ``ddetr predict``."""
    model = _random_model()
    images = [torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(1)),
              torch.rand(3, 90, 64, generator=torch.Generator().manual_seed(2))]
    eager = Detector(model, TINY, val_size=64, max_size=96, score_threshold=0.0)
    compiled = Detector(model, TINY, val_size=64, max_size=96, score_threshold=0.0, compile="aot_eager")
    expected = eager.predict(images, batch_size=2)
    capsys.readouterr()
    got = compiled.predict(images, batch_size=2)
    again = compiled.predict(images, batch_size=2)
    printed = capsys.readouterr().err
    assert printed.count("model compiled in") == 1, printed  # once, at the first call
    for want, have in ((expected, got), (expected, again)):
        for a, b in zip(want, have):
            assert len(a) == TINY.num_queries * TINY.num_classes  # all of them: fewer than the top 100
            torch.testing.assert_close(b.scores, a.scores, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b.boxes, a.boxes, rtol=1e-5, atol=1e-3)
            assert torch.equal(b.labels, a.labels)
    assert len(set(expected[0].scores.tolist())) > 10  # distinct scores: the comparison is not of constants


def test_ddetr_predict_compile_gives_the_eager_detections(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", num_train=1, num_val=2, image_size=64, seed=0)
    checkpoint = tmp_path / "tiny.pth"
    configs = RunConfigs(TINY, TrainConfig(), DataConfig(val_size=64, max_size=96))
    save_checkpoint(checkpoint, make_checkpoint(_random_model().state_dict(), configs,
                                                {label: f"class {label}" for label in range(5)}))
    result = subprocess.run(["ddetr", "predict", str(checkpoint), str(data.val_images), "--out", str(tmp_path / "out"),
                             "--score_threshold", "0", "--compile", "--no_progress"],
                            capture_output=True, text=True, env=user_environment(), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("model compiled in") == 1, result.stderr

    eager = Detector.from_checkpoint(checkpoint, score_threshold=0.0)
    files = sorted(data.val_images.iterdir())
    detections = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert len(detections) == 2 * min(100, TINY.num_queries * TINY.num_classes)
    for image_id, path in enumerate(files, start=1):
        # The eager detections in the file's format (scores to 5 decimals, boxes to 3).
        expected = eager.predict(str(path)).to_coco(image_id, file_name=str(path))
        got = [d for d in detections if d["image_id"] == image_id]
        assert [d["category_id"] for d in got] == [d["category_id"] for d in expected]
        assert [d["score"] for d in got] == pytest.approx([d["score"] for d in expected], abs=2e-5)
        assert [d["bbox"] for d in got] == [pytest.approx(d["bbox"], abs=2e-3) for d in expected]
        assert len({d["score"] for d in got}) > 10  # distinct scores: the comparison is not of constants
