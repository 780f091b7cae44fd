"""Inference: a trained checkpoint in, boxes in original-image pixels out.

>>> detector = Detector.from_checkpoint("exps/mine/checkpoint.pth")
>>> result = detector.predict("street.jpg")            # or a PIL image, an HWC uint8 array, a CHW tensor, a list
>>> result.boxes, result.scores, result.labels, result.label_names

Images are prepared by the evaluation transform (:class:`~deformable_detr.data.transforms.EvalTransform`: short side
``val_size``, long side at most ``max_size``, ImageNet normalisation), padded into batches with a mask, run through
the detector and the official post-processing of its architecture (:func:`~deformable_detr.model.build.build_decode`;
Deformable DETR: :func:`~deformable_detr.model.postprocess.decode_detections`, top 100
over queries x classes), and the detections scoring at least the threshold are kept. Image files are read upright
(their EXIF orientation applied, :func:`~deformable_detr.data.images.load_rgb_image`), so boxes are in the pixels of
the image as a viewer shows it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import Tensor, nn

from deformable_detr.box_ops import box_cxcywh_to_xyxy
from deformable_detr.checkpoint import (
    CheckpointError,
    load_model_state,
    model_weights,
    read_checkpoint,
    stored_configs,
)
from deformable_detr.checkpoint_config import config_from_checkpoint
from deformable_detr.compile import compile_model
from deformable_detr.config import OFFICIAL_MAX_SIZE, OFFICIAL_VAL_SIZE, ModelConfig
from deformable_detr.data.coco_names import COCO_CATEGORIES, COCO_NUM_CLASSES
from deformable_detr.data.collate import batch_images
from deformable_detr.data.images import load_rgb_image, to_rgb
from deformable_detr.data.transforms import EvalTransform, ImageSizeError
from deformable_detr.device import resolve_device
from deformable_detr.inference.rewrites import optimize_for_inference
from deformable_detr.inference.sampling_points import SamplingPointRecorder, SamplingPoints, to_image_pixels
from deformable_detr.model.build import build_decode, build_from_config
from deformable_detr.model.deformable_detr import DeformableDETR

ImageInput = str | Path | PIL.Image.Image | np.ndarray | Tensor
"""A file path, a PIL image, an (H, W, 3) / (H, W) uint8 array, or a (3, H, W) / (1, H, W) float tensor in [0, 1]."""

_HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class Detections:
    """The detections of one image, by decreasing score.

    boxes: (N, 4) float32 (x0, y0, x1, y1) in pixels of the original image; scores: (N,) sigmoid probabilities;
    labels: (N,) int64 class indices (= category ids for COCO-format data); label_names: N names;
    query_indices: (N,) int64, the decoder query each detection comes from (a query may give several labels);
    image_size: (height, width) of the original image; sampling_points: every query's last-layer sampling points
    when asked for (``predict(..., sampling_points=True)``).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    label_names: list[str]
    query_indices: Tensor
    image_size: tuple[int, int]
    sampling_points: SamplingPoints | None = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_coco(self, image_id: int | str, file_name: str | None = None) -> list[dict[str, Any]]:
        """COCO results: one ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` per detection (plus
        ``file_name`` when given)."""
        results = []
        for box, score, label in zip(self.boxes.tolist(), self.scores.tolist(), self.labels.tolist()):
            x0, y0, x1, y1 = box
            entry: dict[str, Any] = {"image_id": image_id, "category_id": int(label),
                                     "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)],
                                     "score": round(float(score), 5)}
            if file_name is not None:
                entry["file_name"] = file_name
            results.append(entry)
        return results


@dataclass
class PreparedImage:
    """image: (3, h, w) normalised, resized as the eval transform; original_size: (height, width) before that."""

    image: Tensor
    original_size: tuple[int, int]


def class_names_of(checkpoint: dict[str, Any], num_classes: int) -> dict[int, str]:
    """{label: name}: the checkpoint's ``categories`` (written by ``ddetr train``), else COCO's for a 91-logit model
    (the official checkpoints), else none (labels print as numbers)."""
    categories = checkpoint.get("categories")
    if isinstance(categories, dict) and categories:
        return {int(k): str(v) for k, v in categories.items()}
    if num_classes == COCO_NUM_CLASSES:
        return dict(COCO_CATEGORIES)
    return {}


def check_score_threshold(value: float, name: str = "score_threshold") -> float:
    """``value`` if it is a number in [0, 1] (scores are sigmoid probabilities), else ValueError naming ``name``
    (NaN, which would keep or drop every detection depending on the comparison, included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _as_image(image: ImageInput, position: int) -> PIL.Image.Image | Tensor:
    """A PIL RGB image, or a (3, H, W) float tensor in [0, 1]; errors name the input and what was expected."""
    if isinstance(image, (str, Path)):
        return load_rgb_image(image)
    if isinstance(image, PIL.Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
            raise ValueError(f"image {position}: numpy images must be uint8 (H, W, 3), (H, W, 4), (H, W, 1) or "
                             f"(H, W), got {image.dtype} {image.shape}")
        return to_rgb(PIL.Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image))
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3) or not image.is_floating_point():
            raise ValueError(f"image {position}: tensors must be float (3, H, W) or (1, H, W) in [0, 1] (a batch: "
                             f"(B, 3, H, W)), got {image.dtype} {tuple(image.shape)}")
        if image.numel() == 0:
            raise ImageSizeError(f"image {position}: the tensor has no pixels, shape {tuple(image.shape)}")
        finite = torch.isfinite(image)
        if not bool(finite.all()):
            raise ValueError(f"image {position}: the tensor holds {int((~finite).sum())} non-finite value(s) (NaN or "
                             f"inf) of {image.numel()}; pixels must be finite, in [0, 1]")
        low, high = float(image.min()), float(image.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"image {position}: tensor values must be in [0, 1] (un-normalised RGB), found "
                             f"[{low:.3g}, {high:.3g}]" + ("; divide by 255" if high > 1.0 else ""))
        return image.float().expand(3, -1, -1) if image.shape[0] == 1 else image.float()
    raise TypeError(f"image {position}: expected a path, PIL image, numpy uint8 array or float tensor, "
                    f"got {type(image).__name__}")


class Detector:
    """A Deformable DETR ready for inference: model, post-processing, class names and the eval resize.

    ``dtype``: float32 (default) or float64 run the model in that precision; float16 / bfloat16 run it under
    autocast (mixed precision; deformable attention and the box arithmetic stay float32). ``optimize`` runs an
    optimised copy (:func:`deformable_detr.inference.rewrites.optimize_for_inference`); without it, ``model`` itself
    is put in eval mode and moved to ``device``. ``compile``: run ``torch.compile`` of that model, True with its
    default backend (inductor), a string with the backend of that name (the first batch compiles, and its time is
    printed; ``model`` stays the eager module, which ``sampling_points`` runs).
    """

    def __init__(self, model: nn.Module, config: ModelConfig, class_names: dict[int, str] | None = None, *,
                 val_size: int = OFFICIAL_VAL_SIZE, max_size: int = OFFICIAL_MAX_SIZE,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, score_threshold: float = 0.5,
                 optimize: bool = True, compile: bool | str = False) -> None:
        if dtype not in (torch.float32, torch.float64, *_HALF_DTYPES):
            raise ValueError(f"dtype must be float32, float64, float16 or bfloat16, got {dtype}")
        check_score_threshold(score_threshold)
        if val_size < 1 or max_size < val_size:
            raise ValueError(f"need 1 <= val_size <= max_size, got val_size={val_size}, max_size={max_size}")
        self.config = config
        self.device = resolve_device(device)
        self.dtype = dtype
        model = model.eval()
        # Folding copies the model; the caller's module stays untouched.
        self.model = optimize_for_inference(model) if optimize else model
        self.optimized = optimize
        self.model.to(self.device, torch.float64 if dtype == torch.float64 else torch.float32)
        self.compiled_model = None
        if compile:
            self.compiled_model = compile_model(self.model, backend="inductor" if compile is True else compile)
        self.num_detections = config.num_detections
        # DETR: one detection per query (softmax, no-object dropped); Deformable DETR: top-k over queries x classes.
        self.decode = build_decode(config)
        # The same decode in the evaluation loop's format (a dict per image), for callers comparing with ddetr eval
        # (benchmarks/e2e.py); run_batch calls decode_detections itself, for the query indices.
        self.class_names = dict(class_names or {})
        self.val_size = val_size
        self.max_size = max_size
        self.score_threshold = score_threshold
        self.transform = EvalTransform(val_size, max_size)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        score_threshold: float = 0.5, *, variant: str | None = None, msda_backend: str = "auto",
                        val_size: int | None = None, max_size: int | None = None, optimize: bool = True,
                        trusted: bool = False, compile: bool | str = False, ema: bool = True) -> Detector:
        """A detector from a checkpoint of ``ddetr train`` or of the official code (or a bare state_dict), or from a
        Hugging Face folder (:mod:`deformable_detr.inference.hf_format`).

        The architecture comes from the checkpoint's stored settings when ``ddetr train`` wrote it, else from its
        weights (see :mod:`deformable_detr.checkpoint_config`; ``variant="single_scale_dc5"`` for a DC5 checkpoint
        without settings). Class names: the checkpoint's ``categories``, else COCO's for 91 classes. The eval
        resize: ``val_size`` / ``max_size`` if given, else the checkpoint's, else the official 800 / 1333.
        ``msda_backend``: the attention kernels to run here (``auto``: what this device runs fastest).
        ``optimize`` folds the frozen batch norms (:mod:`deformable_detr.inference.rewrites`); ``compile`` runs
        ``torch.compile`` of the model. ``ema``: the checkpoint's EMA weights when it has them (``ddetr train
        --ema``, whose evaluations were of them), else its trained weights; False: always the trained weights.
        """
        checkpoint = read_checkpoint(path, map_location="cpu", trusted=trusted)
        config = config_from_checkpoint(checkpoint, str(path), variant=variant, msda_backend=msda_backend)
        model, _, _ = build_from_config(config)
        try:
            load_model_state(model, model_weights(checkpoint, ema)[0])
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from error
        stored = stored_configs(checkpoint, str(path))
        return cls(model, config, class_names_of(checkpoint, config.num_classes),
                   val_size=val_size or (stored.data.val_size if stored else OFFICIAL_VAL_SIZE),
                   max_size=max_size or (stored.data.max_size if stored else OFFICIAL_MAX_SIZE),
                   device=device, dtype=dtype, score_threshold=score_threshold, optimize=optimize,
                   compile=compile)

    @classmethod
    def from_pretrained(cls, path: str | Path, **options: Any) -> Detector:
        """:meth:`from_checkpoint` under the name transformers users know: ``path`` is a local Hugging Face
        ``DeformableDetrForObjectDetection`` folder (``config.json`` + ``model.safetensors``; nothing is
        downloaded), or any checkpoint ``from_checkpoint`` reads; ``options`` are its keywords."""
        return cls.from_checkpoint(path, **options)

    def label_name(self, label: int) -> str:
        return self.class_names.get(int(label), str(int(label)))

    def prepare(self, image: ImageInput, position: int = 0, *, name: str | None = None) -> PreparedImage:
        """Loads / converts one image and applies the eval transform (PIL images exactly as ``ddetr eval``, tensors
        resized by torchvision, see :class:`EvalTransform`).

        Raises :class:`~deformable_detr.data.transforms.ImageSizeError` naming the image (``name``, else its path
        or ``image {position}``) for one the model cannot run: empty, too elongated for the resize (its short side
        would become 0 pixels), or, for a two-stage model, resized smaller than its queries need (see
        :meth:`DeformableDETR.input_size_problem`). Any other size runs, down to 1 x 1 feature maps.
        """
        name = name or (str(image) if isinstance(image, (str, Path)) else f"image {position}")
        image = _as_image(image, position)
        if isinstance(image, PIL.Image.Image):
            original = (image.height, image.width)
        else:
            original = (int(image.shape[1]), int(image.shape[2]))
        try:
            tensor, _ = self.transform(image, None)
        except ImageSizeError as error:
            raise ImageSizeError(f"{name}: {error}") from error
        height, width = int(tensor.shape[1]), int(tensor.shape[2])
        problem = self.model.input_size_problem(height, width) if isinstance(self.model, DeformableDETR) else None
        if problem is not None:
            raise ImageSizeError(f"{name}: {original[1]}x{original[0]} pixels, {width}x{height} after the eval resize "
                                 f"(val_size {self.val_size}, max_size {self.max_size}), is too small: {problem}")
        return PreparedImage(tensor, original)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype in _HALF_DTYPES:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def run_batch(self, prepared: Sequence[PreparedImage], score_threshold: float | None = None,
                  sampling_points: bool = False) -> list[Detections]:
        """Pads ``prepared`` images into one batch, runs the model and post-processing."""
        threshold = self.score_threshold if score_threshold is None else check_score_threshold(score_threshold)
        images, mask = batch_images([p.image for p in prepared])
        if self.device.type == "cuda":  # pinned, so that the copies below do not wait for the device
            images, mask = images.pin_memory(), mask.pin_memory()
        images = images.to(self.device, torch.float64 if self.dtype == torch.float64 else torch.float32,
                           memory_format=torch.channels_last if self.optimized else torch.contiguous_format,
                           non_blocking=True)
        mask = mask.to(self.device, non_blocking=True)
        recorder = SamplingPointRecorder(self.model) if sampling_points else contextlib.nullcontext()
        try:
            with recorder, self._autocast():
                # The recorder's hooks sit on the eager module's layers.
                model = self.model if sampling_points or self.compiled_model is None else self.compiled_model
                outputs = model(images, mask)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if isinstance(error, torch.OutOfMemoryError) or "alloc" in str(error).lower():
                raise MemoryError(
                    f"out of memory running {len(prepared)} image(s) padded to {tuple(images.shape[-2:])} on "
                    f"{self.device}: lower the batch size, or val_size / max_size (now {self.val_size} / "
                    f"{self.max_size})") from error
            raise
        logits, boxes = outputs.pred_logits.float(), outputs.pred_boxes.float()
        sizes = torch.tensor([p.original_size for p in prepared])
        if self.device.type == "cuda":  # a copy from pageable memory would wait for the device
            sizes = sizes.pin_memory()
        sizes = sizes.to(self.device, non_blocking=True)
        # (B, k) each, boxes (B, k, 4)
        decoded = self.decode(logits, boxes, sizes)
        # One device -> host transfer for everything (float64 holds the float32 values and the int64 indices, which
        # are below 2^53, exactly), then the threshold on the host: a boolean mask on the device would wait per use.
        scores, labels, detection_boxes, query_indices = decoded
        host = torch.cat([t.to(torch.float64) for t in (scores[..., None], labels[..., None], detection_boxes,
                                                         query_indices[..., None])], -1).cpu()  # (B, k, 7)
        scores, labels = host[..., 0].to(scores.dtype), host[..., 1].to(torch.int64)
        detection_boxes, query_indices = host[..., 2:6].to(detection_boxes.dtype), host[..., 6].to(torch.int64)
        record = recorder.pop() if sampling_points else None
        results = []
        for index, item in enumerate(prepared):
            keep = scores[index] >= threshold
            kept_labels = labels[index][keep]
            points = None
            if record is not None:
                height, width = item.original_size
                scale = torch.tensor([width, height, width, height], dtype=torch.float32)
                query_boxes = box_cxcywh_to_xyxy(boxes[index]).cpu() * scale
                points = to_image_pixels(record, index, tuple(images.shape[-2:]), tuple(item.image.shape[-2:]),
                                         item.original_size, query_boxes, logits[index].sigmoid().cpu())
            results.append(Detections(detection_boxes[index][keep], scores[index][keep], kept_labels,
                                      [self.label_name(label) for label in kept_labels.tolist()],
                                      query_indices[index][keep], item.original_size, points))
        return results

    def predict(self, images: ImageInput | Sequence[ImageInput], score_threshold: float | None = None,
                batch_size: int = 4, sampling_points: bool = False) -> Detections | list[Detections]:
        """Detections for one image (returns one :class:`Detections`) or a list / a (B, 3, H, W) tensor (returns a
        list), in batches of ``batch_size`` padded images. ``score_threshold`` (in [0, 1]) defaults to the
        detector's. Bad input raises ValueError naming the image by its position (or path): a tensor with NaN / inf
        or values outside [0, 1], an image the model cannot run (see :meth:`prepare`)."""
        single = not isinstance(images, (list, tuple)) and not (isinstance(images, Tensor) and images.dim() == 4)
        items = [images] if single else list(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if score_threshold is not None:
            check_score_threshold(score_threshold)
        results: list[Detections] = []
        for start in range(0, len(items), batch_size):
            prepared = [self.prepare(image, start + i) for i, image in enumerate(items[start:start + batch_size])]
            results += self.run_batch(prepared, score_threshold, sampling_points)
        return results[0] if single else results

    def __repr__(self) -> str:
        config = dataclasses.asdict(self.config)
        shape = {k: config[k] for k in ("backbone", "num_feature_levels", "with_box_refine", "two_stage",
                                        "num_classes", "num_queries", "msda_backend")}
        return (f"Detector({shape}, device={self.device}, dtype={self.dtype}, val_size={self.val_size}, "
                f"max_size={self.max_size}, score_threshold={self.score_threshold})")
