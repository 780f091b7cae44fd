"""ONNX export of the whole detector, post-processing included, checked against PyTorch with onnxruntime.

The exported graph takes a padded batch and returns the top detections of each image in its original pixels:

* inputs: ``images`` (B, 3, H, W) float32, ImageNet-normalised, each image resized as the eval transform (short
  side ``val_size``, long side at most ``max_size``) and zero-padded at the bottom and right to the export size;
  ``mask`` (B, H, W) bool, True on padding; ``original_sizes`` (B, 2) int64, each image's (height, width) before
  resizing.
* outputs: ``scores`` (B, K) float32, ``labels`` (B, K) int64, ``boxes`` (B, K, 4) float32 (x0, y0, x1, y1) in
  original-image pixels; K = min(num_detections, num_queries * num_classes), by decreasing score, no threshold.

The batch size is dynamic. The image size is fixed at export (``height``, ``width``; pad smaller images to it and
mark the padding in ``mask``, which the model is built for: the eval transform's output fits an 800 x 1333 canvas for
landscape images and 1333 x 800 for portrait ones), or, with ``dynamic=True``, any H x W from
:func:`min_dynamic_side` up: the feature-map sizes are Python ints in eager mode and symbolic under ``torch.export``,
so the graph computes the level shapes, masks, position encodings, valid ratios, reference points, level start
indices and the sampling from the input size. That needs the ``dynamo`` exporter: the TorchScript tracer records
``torch.tensor`` of the level shapes and ``Tensor.split``'s sizes as constants (its TracerWarnings say so), and its
graph then runs at other sizes with wrong numbers.

Deformable attention is exported with the ``reference`` backend (``grid_sample``, ONNX opset >= 16); the Numba and
Triton kernels are custom ops that ONNX does not know.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from deformable_detr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from deformable_detr.model.deformable_detr import feature_map_shapes
from deformable_detr.model.ms_deform_attn import MSDeformAttn
from deformable_detr.model.postprocess import decode_detections

EXPORTERS = ("dynamo", "torchscript")
MIN_OPSET = 16  # GridSample
INPUT_NAMES = ["images", "mask", "original_sizes"]
OUTPUT_NAMES = ["scores", "labels", "boxes"]


class ExportableDetector(nn.Module):
    """A DeformableDETR followed by the official post-processing, as tensors in and tensors out (see the module
    docstring for the shapes). Its outputs equal ``PostProcess(model(images, mask), original_sizes)`` stacked."""

    def __init__(self, model: nn.Module, num_detections: int = 100, decode: Callable | None = None) -> None:
        super().__init__()
        self.model = model
        self.num_detections = num_detections
        # The model's own post-processing (model.build.build_decode; DETR: one detection per query), else Deformable
        # DETR's top num_detections.
        self.decode = decode or functools.partial(decode_detections, num_detections=num_detections)

    def forward(self, images: Tensor, mask: Tensor, original_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images (B, 3, H, W), mask (B, H, W), original_sizes (B, 2) -> scores (B, K), labels (B, K), boxes
        (B, K, 4): :func:`deformable_detr.model.postprocess.decode_detections` of the model's outputs."""
        outputs = self.model(images, mask)
        scores, labels, boxes, _ = self.decode(outputs.pred_logits, outputs.pred_boxes, original_sizes)
        return scores, labels, boxes


def with_reference_attention(model: nn.Module) -> nn.Module:
    """Sets every MSDeformAttn of ``model`` (in place) to the pure-PyTorch backend, which ONNX can express."""
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.backend = "reference"
    return model


@dataclass
class ExportCheck:
    """Largest deviation of onnxruntime from PyTorch on the sample batches, relative to the largest |PyTorch| value
    of each output; ``labels_equal``: labels identical everywhere; the (height, width) of each batch."""

    relative_error: dict[str, float]
    labels_equal: bool
    batch_sizes: list[int]
    image_sizes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_error.values())

    def passed(self, tolerance: float) -> bool:
        return self.labels_equal and self.max_relative_error <= tolerance


def sample_inputs(batch: int, height: int, width: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """A reproducible batch: smooth random images (normalised), the odd ones padded on the right and bottom
    (mask True there, zero pixels), with original sizes of twice the valid extent."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(height // 8, 1), max(width // 8, 1), generator=generator)
    pixels = nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = (pixels - mean) / std
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    sizes = torch.tensor([[height * 2, width * 2]] * batch)
    for index in range(1, batch, 2):
        valid_height, valid_width = max(height * 3 // 4, 1), max(width * 5 // 8, 1)
        mask[index, valid_height:, :] = True
        mask[index, :, valid_width:] = True
        images[index, :, valid_height:, :] = 0
        images[index, :, :, valid_width:] = 0
        sizes[index] = torch.tensor([valid_height * 2, valid_width * 2])
    return images, mask, sizes


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12))


def check_onnx(path: str | Path, module: nn.Module, inputs: list[tuple[Tensor, Tensor, Tensor]]) -> ExportCheck:
    """Runs the ONNX file with onnxruntime on the CPU and ``module`` in PyTorch on each input batch."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError("checking the export needs onnxruntime: pip install 'deformable-detr[export]'") from error
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    errors = {name: 0.0 for name in ("scores", "boxes")}
    labels_equal = True
    for images, mask, sizes in inputs:
        with torch.inference_mode():
            expected = module(images, mask, sizes)
        got = session.run(OUTPUT_NAMES, {"images": images.numpy(), "mask": mask.numpy(),
                                         "original_sizes": sizes.numpy()})
        got = [torch.from_numpy(array) for array in got]
        errors["scores"] = max(errors["scores"], _relative(got[0], expected[0]))
        errors["boxes"] = max(errors["boxes"], _relative(got[2], expected[2]))
        labels_equal &= bool(torch.equal(got[1], expected[1]))
    return ExportCheck(errors, labels_equal, [int(images.shape[0]) for images, _, _ in inputs],
                       [(int(images.shape[2]), int(images.shape[3])) for images, _, _ in inputs])


def min_dynamic_side(model: nn.Module) -> int:
    """The smallest height and width that a dynamic-size export of ``model`` (a DeformableDETR) accepts.

    Every feature map must be at least 2 x 2: ``torch.export`` takes a symbolic size to be >= 2 (a size of 1 would
    broadcast), so the deepest level (stride 64 in the multi-scale models) needs more than one stride. A two-stage
    model also needs as many feature-map positions as it selects queries (``input_size_problem``).
    """
    side = 1
    while (min(min(shape) for shape in feature_map_shapes(side, side, model.backbone.strides,
                                                        model.num_feature_levels)) < 2
           or model.input_size_problem(side, side) is not None):
        side += 1
    return side


def second_check_size(height: int, width: int, minimum: int) -> tuple[int, int]:
    """A second size to check a dynamic export at: the other orientation, 3/4 of the size, odd sides (feature maps
    that do not divide evenly), at least ``minimum``."""
    return max(minimum, width * 3 // 4 + 1), max(minimum, height * 3 // 4 + 1)


def export_onnx(model: nn.Module, path: str | Path, height: int = 800, width: int = 1333, *,
                num_detections: int = 100, opset: int = 18, exporter: str = "dynamo", dynamic: bool = False,
                metadata: dict[str, str] | None = None, decode: Callable | None = None) -> ExportableDetector:
    """Writes ``model`` (a DeformableDETR, any backend; it is not modified) with post-processing to ``path``.

    Returns the PyTorch module that was exported (reference attention, eval mode), to check the file against.
    ``exporter``: ``dynamo`` (``torch.export``, the supported exporter) or ``torchscript`` (the legacy tracer,
    much faster to run, deprecated by PyTorch). ``dynamic``: the graph takes any H x W of at least
    :func:`min_dynamic_side` (``dynamo`` only), ``height`` x ``width`` is then the example traced. ``metadata`` is
    stored in the file's metadata_props. ``decode``: the post-processing of the model's architecture
    (``Detector.decode``); default: Deformable DETR's top ``num_detections``.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if dynamic and exporter != "dynamo":
        raise ValueError(f"a dynamic image size needs the dynamo exporter, got exporter {exporter!r} (the TorchScript "
                         "tracer records the feature-map sizes as constants)")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (GridSample, used by deformable attention), got {opset}")
    if height < 32 or width < 32:
        raise ValueError(f"the export size must be at least 32 x 32 (the backbone's stride), got {height} x {width}")
    try:
        import onnx
    except ImportError as error:
        raise ImportError("ONNX export needs onnx (and onnxscript for the dynamo exporter): "
                           "pip install 'deformable-detr[export]'") from error
    minimum = min_dynamic_side(model) if dynamic else None
    if minimum is not None and (height < minimum or width < minimum):
        raise ValueError(f"the example size of a dynamic export must be at least {minimum} x {minimum} (every "
                         f"feature map 2 x 2 or more), got {height} x {width}")
    module = ExportableDetector(with_reference_attention(copy.deepcopy(model)).eval(), num_detections,
                                decode).eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    example = sample_inputs(2, height, width)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # onnxscript's optimiser logs a line per multi-output op it leaves alone; nothing for a user to act on.
    optimiser_logger = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = optimiser_logger.level
    optimiser_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # The tracer warns about every shape turned into a Python int: that is what fixes the image size.
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1, max=1024)
                images_axes, mask_axes = {0: batch}, {0: batch}
                if minimum is not None:
                    image_height = torch.export.Dim("height", min=minimum)
                    image_width = torch.export.Dim("width", min=minimum)
                    images_axes.update({2: image_height, 3: image_width})
                    mask_axes.update({1: image_height, 2: image_width})
                shapes = {"images": images_axes, "mask": mask_axes, "original_sizes": {0: batch}}
                program = module
                if minimum is not None:
                    # torch.export first (as torch.onnx.export's first try: guards on symbolic sizes become runtime
                    # asserts, which ONNX drops), so that a size it cannot keep symbolic is an error: torch.onnx.export
                    # would retry with strategies that quietly fix it. The graph's inputs are checked below.
                    program = torch.export.export(module, example, dynamic_shapes=shapes, strict=False,
                                                  prefer_deferred_runtime_asserts_over_guards=True)
                torch.onnx.export(program, example, str(path), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                                  dynamic_shapes=shapes if minimum is None else None, opset_version=opset,
                                  dynamo=True, external_data=False, verbose=False)
            else:
                torch.onnx.export(module, example, str(path), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                                  dynamic_axes={name: {0: "batch"} for name in INPUT_NAMES + OUTPUT_NAMES},
                                  opset_version=opset, dynamo=False)
    finally:
        optimiser_logger.setLevel(level)
    proto = onnx.load(str(path))
    if minimum is not None:
        images_type = next(value for value in proto.graph.input if value.name == "images").type.tensor_type
        if not all(images_type.shape.dim[axis].dim_param for axis in (0, 2, 3)):
            raise RuntimeError(f"the exported graph's batch or image size is not dynamic: {images_type.shape}")
    size = f"{height}x{width}" if minimum is None else "dynamic"
    info = {"deformable_detr.input_size": size, "deformable_detr.mean": json.dumps(IMAGENET_MEAN),
            "deformable_detr.std": json.dumps(IMAGENET_STD), **(metadata or {})}
    if minimum is not None:
        info["deformable_detr.min_input_size"] = f"{minimum}x{minimum}"
    for key, value in info.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return module


def export_checkpoint(checkpoint: str | Path, out: str | Path, height: int = 800, width: int = 1333, *,
                      variant: str | None = None, opset: int = 18, exporter: str = "dynamo", dynamic: bool = False,
                      tolerance: float = 1e-4, check_batch_sizes: tuple[int, ...] = (2, 1),
                      log=print) -> ExportCheck:
    """``ddetr export onnx``: the checkpoint's detector (frozen batch norms folded) to ``out``, then checked
    against PyTorch with onnxruntime on sample batches of ``check_batch_sizes`` images (odd ones padded), at
    ``height`` x ``width``; when ``dynamic``, the second batch at :func:`second_check_size` instead."""
    from deformable_detr.inference.detector import Detector

    detector = Detector.from_checkpoint(checkpoint, variant=variant, msda_backend="reference")
    metadata = {"deformable_detr.class_names": json.dumps({str(k): v for k, v in detector.class_names.items()}),
                "deformable_detr.val_size": str(detector.val_size),
                "deformable_detr.max_size": str(detector.max_size),
                "deformable_detr.config": json.dumps(dataclasses.asdict(detector.config))}
    started = time.time()
    module = export_onnx(detector.model, out, height, width, num_detections=detector.config.num_detections,
                         opset=opset, exporter=exporter, dynamic=dynamic, metadata=metadata, decode=detector.decode)
    sizes = [(height, width)] * len(check_batch_sizes)
    if dynamic:
        minimum = min_dynamic_side(detector.model)
        sizes[1:] = [second_check_size(height, width, minimum)] * (len(sizes) - 1)
        shape = f"input any HxW from {minimum}x{minimum} (traced at {height}x{width})"
    else:
        shape = f"input {height}x{width}"
    log(f"exported {checkpoint} to {out} ({Path(out).stat().st_size / 2**20:.1f} MiB, {exporter} exporter, opset "
        f"{opset}, {shape}, dynamic batch) in {time.time() - started:.1f} s")
    inputs = [sample_inputs(batch, *size, seed=batch) for batch, size in zip(check_batch_sizes, sizes)]
    check = check_onnx(out, module, inputs)
    at = ", ".join(f"{b} at {h}x{w}" for b, (h, w) in zip(check.batch_sizes, check.image_sizes))
    log(f"onnxruntime vs PyTorch on batches of {at}: max relative error scores "
        f"{check.relative_error['scores']:.2e}, boxes {check.relative_error['boxes']:.2e}, labels "
        f"{'equal' if check.labels_equal else 'DIFFERENT'} (tolerance {tolerance:g})")
    return check
