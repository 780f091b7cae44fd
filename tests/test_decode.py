"""The one decode of model outputs (decode_detections): hand-computed numbers, the same detections from PostProcess,
the Detector and the ONNX module, query indices that point at their boxes, and an ONNX export of the decode."""

from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn

from deformable_detr import build_model
from deformable_detr.config import model_config
from deformable_detr.data.collate import batch_images
from deformable_detr.inference.detector import Detector
from deformable_detr.inference.export_onnx import ExportableDetector
from deformable_detr.model.postprocess import PostProcess, decode_detections

TINY = dict(num_classes=5, backbone="resnet18", hidden_dim=32, nheads=8, enc_layers=1, dec_layers=2,
            dim_feedforward=64, num_queries=12)


def test_decode_gives_the_hand_computed_detections():
    # Probabilities sigmoid(logits): q0 (0.500, 0.881), q1 (0.953, 0.269), q2 (0.731, 0.622).
    logits = torch.tensor([[[0.0, 2.0], [3.0, -1.0], [1.0, 0.5]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5], [0.1, 0.1, 0.2, 0.2]]])  # cx, cy, w, h
    sizes = torch.tensor([[100, 200]])  # height 100, width 200
    scores, labels, pixels, queries = decode_detections(logits, boxes, sizes, num_detections=4)
    torch.testing.assert_close(scores, torch.sigmoid(torch.tensor([[3.0, 2.0, 1.0, 0.5]])))
    assert queries.tolist() == [[1, 0, 2, 2]] and labels.tolist() == [[0, 1, 0, 1]]
    assert queries.dtype == labels.dtype == torch.int64
    # q1: x 0..0.5, y 0.5..1; q0: x 0.4..0.6, y 0.3..0.7; q2: x 0..0.2, y 0..0.2; times (200, 100).
    expected = [[0.0, 50.0, 100.0, 100.0], [80.0, 30.0, 120.0, 70.0], [0.0, 0.0, 40.0, 20.0], [0.0, 0.0, 40.0, 20.0]]
    torch.testing.assert_close(pixels, torch.tensor([expected]))
    # More detections asked for than query x class pairs: all 6, by decreasing score.
    scores, _, _, queries = decode_detections(logits, boxes, sizes, num_detections=100)
    assert scores.shape == (1, 6) and bool((scores[0, :-1] >= scores[0, 1:]).all())


def test_decode_errors_say_what_was_expected():
    logits, boxes, sizes = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.tensor([[10, 20], [30, 40]])
    with pytest.raises(ValueError, match=r"pred_boxes must have shape \(batch, Q, 4\) = \(2, 3, 4\).*got \(2, 5, 4\)"):
        decode_detections(logits, torch.zeros(2, 5, 4), sizes)
    with pytest.raises(ValueError, match=r"target_sizes must have shape \(batch, 2\) = \(2, 2\).*got \(2,\)"):
        decode_detections(logits, boxes, sizes[0])
    with pytest.raises(ValueError, match="num_detections must be >= 1, got 0"):
        decode_detections(logits, boxes, sizes, num_detections=0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _, _ = build_model("box_refine", **TINY)
    # Spread the class scores (the focal-loss prior makes them all about 0.01), so that the ranking is exercised.
    with torch.no_grad():
        for head in model.class_embed:
            head.bias.normal_(0.0, 2.0)
    model.eval()
    config = model_config("box_refine", **TINY)
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((48, 72), (60, 40))]
    return model, config, images


def test_postprocess_detector_and_onnx_module_give_the_same_detections(tiny):
    model, config, images = tiny
    detector = Detector(model, config, {1: "one"}, val_size=64, max_size=96, score_threshold=0.0, optimize=False)
    prepared = [detector.prepare(image) for image in images]
    found = detector.run_batch(prepared)

    batch, mask = batch_images([p.image for p in prepared])
    sizes = torch.tensor([[image.height, image.width] for image in images])
    with torch.no_grad():
        outputs = model(batch, mask)
        evaluated = PostProcess(config.num_detections)(outputs, sizes)
        exported = ExportableDetector(model, config.num_detections)(batch, mask, sizes)
    k = min(config.num_detections, 12 * 5)
    for index, (detections, expected) in enumerate(zip(found, evaluated)):
        assert len(detections) == k
        for name, got in (("detector", (detections.scores, detections.labels, detections.boxes)),
                          ("onnx module", tuple(output[index] for output in exported))):
            assert torch.equal(got[0], expected["scores"]), name
            assert torch.equal(got[1], expected["labels"]), name
            assert torch.equal(got[2], expected["boxes"]), name

        # The query behind each detection: its box is that query's box, its score that query's probability.
        probabilities = outputs.pred_logits[index].sigmoid()
        queries = detections.query_indices
        assert torch.equal(detections.scores, probabilities[queries, detections.labels])
        height, width = images[index].height, images[index].width
        cx, cy, w, h = outputs.pred_boxes[index, queries].unbind(-1)
        query_boxes = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                                   (cy + h / 2) * height], -1)
        torch.testing.assert_close(detections.boxes, query_boxes, rtol=1e-6, atol=1e-4)
        # The top k of all Q x C probabilities, each (query, label) pair once: a brute-force ranking.
        ranked = np.sort(probabilities.flatten().numpy())[::-1][:k]
        np.testing.assert_array_equal(detections.scores.numpy(), ranked)
        assert len({(int(q), int(c)) for q, c in zip(queries, detections.labels)}) == k


class _Decode(nn.Module):
    def forward(self, logits: torch.Tensor, boxes: torch.Tensor, sizes: torch.Tensor):
        return decode_detections(logits, boxes, sizes, num_detections=7)


def test_decode_exports_to_onnx_with_a_dynamic_batch(tmp_path):
    import onnxruntime

    generator = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(2, 6, 3, generator=generator), torch.rand(2, 6, 4, generator=generator)
    sizes = torch.tensor([[480, 640], [333, 500]])
    path = tmp_path / "decode.onnx"
    names = ["logits", "boxes", "sizes"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(_Decode(), (logits, boxes, sizes), str(path), input_names=names,
                          output_names=["scores", "labels", "pixels", "queries"],
                          dynamic_axes={name: {0: "batch"} for name in names}, opset_version=17, dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Another batch size than at export.
    logits, boxes = torch.randn(3, 6, 3, generator=generator), torch.rand(3, 6, 4, generator=generator)
    sizes = torch.tensor([[480, 640], [333, 500], [64, 64]])
    got = session.run(None, {"logits": logits.numpy(), "boxes": boxes.numpy(), "sizes": sizes.numpy()})
    expected = decode_detections(logits, boxes, sizes, num_detections=7)
    for name, value, wanted in zip(("scores", "labels", "pixels", "queries"), got, expected):
        if wanted.is_floating_point():
            np.testing.assert_allclose(value, wanted.numpy(), rtol=1e-6, atol=1e-4, err_msg=name)
        else:
            np.testing.assert_array_equal(value, wanted.numpy(), err_msg=name)
