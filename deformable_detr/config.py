"""Typed configuration: the model, the training recipe and the data, with the official ``main.py`` defaults.

Three frozen dataclasses carry every setting from the command line (or from Python) into training, into the
checkpoint (as plain data, :func:`to_dict`) and back out into evaluation, inference and resumed training
(:func:`from_dict`). Field names are the official ``main.py`` flag names wherever the official code has the setting,
each field's docstring is the help text of its ``ddetr`` flag, and the flags are derived from the fields
(``deformable_detr.cli``), so no default is written twice. The official flags that are not settings of ours (fixed
values such as ``--position_embedding sine``, or launcher bookkeeping such as ``--world_size``) are listed once, in
:data:`OFFICIAL_FIXED_FLAGS` and :data:`OFFICIAL_IGNORED_FLAGS`.

This module imports nothing heavy (no torch), so that ``ddetr --help`` answers at once.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
MSDA_BACKENDS = ("auto", "reference", "cpu", "triton")
AMP_MODES = ("bf16", "fp16")
# COCO evaluation backends: pycocotools (the official one) or faster-coco-eval (the same numbers, faster; optional).
EVALUATORS = ("pycocotools", "faster-coco-eval")
# Parts of the model whose activations --checkpoint_activations recomputes in the backward ("none": no part).
CHECKPOINT_PARTS = ("none", "backbone", "encoder", "decoder")
# Detectors: Deformable DETR (Zhu et al. 2020) and DETR (Carion et al. 2020), each with its own transformer, loss and
# post-processing, chosen by the builder (deformable_detr.model.build).
ARCHITECTURES = ("deformable_detr", "detr")

# The official data pipeline's sizes (datasets/coco.py make_coco_transforms).
OFFICIAL_TRAIN_SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
OFFICIAL_VAL_SIZE = 800
OFFICIAL_MAX_SIZE = 1333
OFFICIAL_CROP_RESIZE_SIZES = (400, 500, 600)
OFFICIAL_CROP_SIZE = (384, 600)


class ConfigError(ValueError):
    """A setting is out of range, contradicts another one, or contradicts a checkpoint; the message names it."""


def _fail(name: str, expected: str, value: Any) -> None:
    raise ConfigError(f"{name} must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_ints(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not _is_int(value) or value < 1:
            _fail(name, "a positive int", value)


def _check_non_negative_numbers(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not _is_number(value) or value < 0:
            _fail(name, "a finite number >= 0", value)


@dataclass(frozen=True)
class ModelConfig:
    """Every setting of the official ``main.py`` that shapes the model, the loss or the post-processing."""

    architecture: str = "deformable_detr"
    """Detector: deformable_detr (Zhu et al. 2020) or detr (Carion et al. 2020: post-norm transformer, softmax classes
    with a no-object class; single-scale, no deformable attention). --variant detr / detr_dc5 set it with DETR's
    other settings."""
    num_classes: int | None = None
    """Number of classes (labels are the category ids; DETR adds one no-object logit); default: 91 for --coco_path,
    else the largest category id + 1."""
    backbone: str = "resnet50"
    """ResNet of the backbone."""
    dilation: bool = False
    """Replace layer4's stride by a dilation (the DC5 variants)."""
    train_backbone: bool = True
    """Train layer2..layer4 (the official lr_backbone > 0); the stem and layer1 are always frozen."""
    position_embedding_scale: float = 2 * math.pi
    """Sine position embedding: position / size * scale."""
    num_feature_levels: int = 4
    """Feature levels of the deformable attention (1: single-scale)."""
    enc_layers: int = 6
    """Encoder layers."""
    dec_layers: int = 6
    """Decoder layers."""
    dim_feedforward: int = 1024
    """Hidden size of the feed-forward blocks."""
    hidden_dim: int = 256
    """Width of the transformer (a multiple of 32)."""
    dropout: float = 0.1
    """Dropout in the transformer."""
    nheads: int = 8
    """Attention heads."""
    num_queries: int = 300
    """Object queries (two-stage: proposals kept from the encoder)."""
    dec_n_points: int = 4
    """Sampling points per head and level in the decoder."""
    enc_n_points: int = 4
    """Sampling points per head and level in the encoder."""
    with_box_refine: bool = False
    """Iterative bounding-box refinement."""
    two_stage: bool = False
    """Two-stage Deformable DETR (queries from encoder proposals)."""
    aux_loss: bool = True
    """Losses at every decoder layer (--no_aux_loss: the last one only)."""
    set_cost_class: float = 2.0
    """Class cost of the Hungarian matcher."""
    set_cost_bbox: float = 5.0
    """L1 box cost of the Hungarian matcher."""
    set_cost_giou: float = 2.0
    """GIoU cost of the Hungarian matcher."""
    cls_loss_coef: float = 2.0
    """Weight of the focal classification loss."""
    bbox_loss_coef: float = 5.0
    """Weight of the L1 box loss."""
    giou_loss_coef: float = 2.0
    """Weight of the GIoU loss."""
    focal_alpha: float = 0.25
    """Alpha of the focal loss."""
    eos_coef: float = 0.1
    """DETR: weight of the no-object class in the cross-entropy (Deformable DETR has no such class)."""
    num_detections: int = 100
    """Detections kept per image by post-processing (top-k over queries x classes; DETR keeps one per query)."""
    msda_backend: str = "auto"
    """Deformable attention kernels: auto (triton on CUDA, cpu on the CPU), reference (pure PyTorch), cpu, triton."""
    checkpoint_activations: tuple[str, ...] = ()
    """Save memory in training: recompute the activations of these parts in the backward instead of keeping them
    (encoder, decoder: each layer; backbone: each residual block of the trained stages); same numbers, more time.
    none: no part (to turn it off when resuming)."""

    def __post_init__(self) -> None:
        _check_positive_ints(self, ("num_feature_levels", "enc_layers", "dec_layers", "dim_feedforward", "hidden_dim",
                                    "nheads", "num_queries", "dec_n_points", "enc_n_points", "num_detections"))
        if self.num_classes is not None and (not _is_int(self.num_classes) or self.num_classes < 1):
            _fail("num_classes", "a positive int (or None: from the data)", self.num_classes)
        _check_non_negative_numbers(self, ("set_cost_class", "set_cost_bbox", "set_cost_giou", "cls_loss_coef",
                                           "bbox_loss_coef", "giou_loss_coef"))
        if self.backbone not in RESNETS:
            _fail("backbone", f"one of {', '.join(RESNETS)}", self.backbone)
        if self.msda_backend not in MSDA_BACKENDS:
            _fail("msda_backend", f"one of {', '.join(MSDA_BACKENDS)}", self.msda_backend)
        parts = self.checkpoint_activations
        if (not isinstance(parts, tuple) or any(part not in CHECKPOINT_PARTS for part in parts)
                or len(set(parts)) != len(parts) or ("none" in parts and len(parts) > 1)):
            _fail("checkpoint_activations", f"distinct parts of {', '.join(CHECKPOINT_PARTS[1:])}, or none alone",
                  parts)
        if self.dilation and self.backbone in ("resnet18", "resnet34"):
            raise ConfigError(f"dilation (DC5) needs a bottleneck ResNet (resnet50, resnet101), got {self.backbone}")
        if self.hidden_dim % self.nheads:
            raise ConfigError(f"hidden_dim ({self.hidden_dim}) must be divisible by nheads ({self.nheads})")
        if self.hidden_dim % 32:
            raise ConfigError(f"hidden_dim must be a multiple of 32 (GroupNorm(32) on the input projections), "
                              f"got {self.hidden_dim}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            _fail("dropout", "in [0, 1)", self.dropout)
        if not _is_number(self.focal_alpha) or not 0.0 <= self.focal_alpha <= 1.0:
            _fail("focal_alpha", "in [0, 1]", self.focal_alpha)
        if not _is_number(self.position_embedding_scale) or self.position_embedding_scale <= 0:
            _fail("position_embedding_scale", "a finite number > 0", self.position_embedding_scale)
        if not (self.set_cost_class or self.set_cost_bbox or self.set_cost_giou):
            raise ConfigError("set_cost_class, set_cost_bbox and set_cost_giou are all 0")
        if self.architecture not in ARCHITECTURES:
            _fail("architecture", f"one of {', '.join(ARCHITECTURES)}", self.architecture)
        if not _is_number(self.eos_coef) or not 0.0 < self.eos_coef <= 1.0:
            _fail("eos_coef", "in (0, 1]", self.eos_coef)
        if self.architecture == "detr":
            # DETR reads layer4 alone and has no deformable attention, box refinement or encoder proposals.
            unsupported = [f"{name} {getattr(self, name)!r}" for name, ok in (
                ("num_feature_levels", self.num_feature_levels == 1), ("with_box_refine", not self.with_box_refine),
                ("two_stage", not self.two_stage),
                ("checkpoint_activations", not {"encoder", "decoder"} & set(self.checkpoint_activations))) if not ok]
            if unsupported:
                raise ConfigError(f"architecture detr is single-scale without box refinement or two-stage: got "
                                  f"{', '.join(unsupported)} (expected num_feature_levels 1, with_box_refine False, "
                                  "two_stage False, checkpoint_activations of the backbone at most; --variant detr "
                                  "sets DETR's settings)")

    @property
    def backbone_levels(self) -> int:
        """Feature maps taken from the backbone: layer2..4 when multi-scale, layer4 alone otherwise."""
        return 3 if self.num_feature_levels > 1 else 1


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe and run settings of the official ``main.py`` (same names and defaults), plus ours."""

    lr: float = 2e-4
    """Learning rate of the transformer and the heads."""
    lr_backbone: float = 2e-5
    """Learning rate of the ResNet (layer2..layer4); 0 freezes the whole backbone."""
    lr_linear_proj_mult: float = 0.1
    """The sampling-offset and reference-point projections learn at lr times this."""
    weight_decay: float = 1e-4
    """Weight decay of AdamW (or SGD)."""
    batch_size: int = 2
    """Images per process and step (the official recipe: 2 on each of 16 GPUs)."""
    epochs: int = 50
    """Train until this many epochs are done."""
    lr_drop: int = 40
    """Divide every learning rate by 10 each lr_drop epochs."""
    lr_drop_epochs: tuple[int, ...] | None = None
    """Divide by 10 at these epochs instead of every lr_drop."""
    clip_max_norm: float = 0.1
    """Clip the gradient norm to this (0: no clipping)."""
    sgd: bool = False
    """SGD with momentum 0.9 instead of AdamW."""
    amp: str | None = None
    """Mixed precision: bf16 or fp16 autocast (fp16 with a gradient scaler); default: float32."""
    compile: bool = False
    """torch.compile the model (not the loss): the first call compiles (its time is printed), a new input size may
    compile again; the same numbers to float32 rounding."""
    seed: int = 42
    """Random seed (each epoch reseeds from seed, epoch and rank, so a resumed run replays an uninterrupted one)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms for the run, so that it repeats bit for bit on a GPU: the attention backward
    sums in a fixed order instead of with atomic adds (slower), torch's ops use their deterministic kernels."""
    device: str = "auto"
    """Torch device; auto: cuda when available, else cpu (the official default is cuda)."""
    pretrained_backbone: str = "torchvision"
    """ImageNet weights of the ResNet: torchvision (downloaded once), a local ResNet state_dict file, or none."""
    resume: str = ""
    """Continue from this checkpoint: model, optimizer, lr schedule, epoch, and its settings unless flags say
    otherwise."""
    finetune: str = ""
    """Start from this checkpoint's weights (not its optimizer or epoch); the model is rebuilt from it."""
    drop_class_heads: bool = False
    """With --finetune: start the class heads afresh, for another set of classes."""
    start_epoch: int = 0
    """First epoch (set from the checkpoint by --resume)."""
    output_dir: str = ""
    """Where checkpoint.pth and log.txt are written; empty: nowhere."""
    eval_every: int = 1
    """Evaluate every N epochs, and after the last."""
    print_freq: int = 10
    """Print a plain progress line every N iterations when the output is no terminal, or with --no_progress;
    0: never."""
    progress: bool = True
    """Progress bars on a terminal (--no_progress: plain lines only)."""
    tensorboard: bool = False
    """Also write TensorBoard logs to OUTPUT_DIR/tb."""
    dist_url: str = "env://"
    """How the processes of a distributed run meet (torchrun and SLURM set the environment)."""
    dist_timeout: float = 600.0
    """Seconds a process waits for the others at a collective (a stalled or dead rank) before stopping with an
    error."""
    divergence_factor: float = 1000.0
    """Stop before a step whose loss is more than this many times the median loss of the run's first 10 steps (a
    divergence whose numbers stay finite); 0: never. nan/inf losses, predictions and gradients always stop."""
    ema: bool = False
    """Keep an exponential moving average of the weights (updated after every applied step), evaluate it and save it
    in the checkpoints (ddetr eval, predict and export then use it; ddetr eval --raw_weights: the trained ones)."""
    ema_decay: float = 0.9998
    """--ema: the average's decay after its warm-up (mmdetection's 1 - momentum, YOLOX's decay)."""
    ema_tau: float = 2000.0
    """--ema: warm-up time constant in steps: the n-th update's decay is ema_decay * (1 - exp(-n / ema_tau)); 0: no
    warm-up (detrex's constant decay)."""
    evaluator: str = "pycocotools"
    """COCO evaluation: pycocotools (the official) or faster-coco-eval (the same numbers, faster; pip install
    faster-coco-eval). It runs once, on the main process."""

    def __post_init__(self) -> None:
        _check_positive_ints(self, ("batch_size", "epochs", "lr_drop", "eval_every"))
        if not isinstance(self.dist_timeout, (int, float)) or not 0 < self.dist_timeout < math.inf:
            _fail("dist_timeout", "a finite number of seconds > 0", self.dist_timeout)
        if not isinstance(self.divergence_factor, (int, float)) or not (
                self.divergence_factor == 0 or 1 < self.divergence_factor < math.inf):
            _fail("divergence_factor", "0 (off) or a finite number > 1", self.divergence_factor)
        if not _is_number(self.ema_decay) or not 0 <= self.ema_decay < 1:
            _fail("ema_decay", "a number in [0, 1)", self.ema_decay)
        if not _is_number(self.ema_tau) or self.ema_tau < 0:
            _fail("ema_tau", "a finite number of steps >= 0", self.ema_tau)
        for name in ("seed", "start_epoch", "print_freq"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                _fail(name, "an int >= 0", value)
        _check_non_negative_numbers(self, ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay",
                                           "clip_max_norm"))
        if self.lr == 0:
            _fail("lr", "> 0", self.lr)
        if self.lr_drop_epochs is not None and (
                not self.lr_drop_epochs or not all(_is_int(e) and e > 0 for e in self.lr_drop_epochs)):
            _fail("lr_drop_epochs", "positive ints", self.lr_drop_epochs)
        if self.amp is not None and self.amp not in AMP_MODES:
            _fail("amp", f"one of {', '.join(AMP_MODES)} (or None)", self.amp)
        if self.evaluator not in EVALUATORS:
            _fail("evaluator", f"one of {', '.join(EVALUATORS)}", self.evaluator)
        if self.drop_class_heads and not self.finetune:
            raise ConfigError("drop_class_heads applies to --finetune CHECKPOINT, and no finetune checkpoint is given")
        if self.resume and self.finetune:
            raise ConfigError("give either resume (continue a run) or finetune (start a new run from its weights)")


@dataclass(frozen=True)
class DataConfig:
    """Where the images and annotations are, and how they are loaded and resized (the official sizes)."""

    coco_path: str | None = None
    """COCO in the official layout: train2017/, val2017/, annotations/instances_{train,val}2017.json."""
    train_images: str | None = None
    """Any COCO-format data: the training image folder."""
    train_json: str | None = None
    """Any COCO-format data: the training annotations."""
    val_images: str | None = None
    """Any COCO-format data: the validation image folder."""
    val_json: str | None = None
    """Any COCO-format data: the validation annotations."""
    val_size: int = OFFICIAL_VAL_SIZE
    """Shorter side of evaluation (and inference) images."""
    max_size: int = OFFICIAL_MAX_SIZE
    """Longest side after resizing."""
    train_scales: tuple[int, ...] = OFFICIAL_TRAIN_SCALES
    """Shorter sides drawn for training images."""
    crop_resize_sizes: tuple[int, ...] = OFFICIAL_CROP_RESIZE_SIZES
    """Training crop branch: shorter sides drawn before the random crop."""
    crop_size: tuple[int, int] = OFFICIAL_CROP_SIZE
    """Training crop branch: smallest and largest crop side."""
    num_workers: int = 2
    """Data-loading worker processes."""
    cache_mode: bool = False
    """Read the image files into memory first (each process its share, as the official code)."""
    strict: bool = False
    """Stop at an unreadable image instead of skipping it."""

    def __post_init__(self) -> None:
        _check_positive_ints(self, ("val_size", "max_size"))
        if self.val_size > self.max_size:
            raise ConfigError(f"val_size ({self.val_size}) must not exceed max_size ({self.max_size})")
        for name in ("train_scales", "crop_resize_sizes", "crop_size"):
            value = getattr(self, name)
            if not value or not all(_is_int(v) and v > 0 for v in value):
                _fail(name, "positive ints", value)
        if len(self.crop_size) != 2 or self.crop_size[0] > self.crop_size[1]:
            _fail("crop_size", "two ints MIN <= MAX", self.crop_size)
        if not _is_int(self.num_workers) or self.num_workers < 0:
            _fail("num_workers", "an int >= 0", self.num_workers)
        custom = [name for name in ("train_images", "train_json", "val_images", "val_json") if getattr(self, name)]
        if self.coco_path and custom:
            raise ConfigError(f"give either coco_path (the official layout) or {', '.join(custom)} (any COCO-format "
                              "data), not both")

    def has_val_data(self) -> bool:
        return bool(self.coco_path or (self.val_images and self.val_json))

    def has_train_data(self) -> bool:
        return bool(self.coco_path or (self.train_images and self.train_json))


@dataclass(frozen=True)
class DemoConfig:
    """``ddetr demo``: the synthetic dataset, and how long to train the small model on it."""

    output_dir: str = "demo_output"
    """Dataset, checkpoints, log.txt and pictures go here."""
    epochs: int = 9
    """Training epochs."""
    lr_drop: int = 7
    """Divide the learning rates by 10 after this many epochs."""
    num_train: int = 1000
    """Synthetic training images."""
    num_val: int = 200
    """Synthetic validation images."""
    image_size: int = 128
    """Side of the synthetic images (each side drawn in [3/4, 1] of it)."""
    shape_only: bool = False
    """Colours independent of the class: the class must be read from the shape alone (harder; far more than the
    demo's minutes from scratch)."""
    num_workers: int = 0
    """Data-loading worker processes. 0: in the training process, which on 2 cores was 9% faster per epoch than one
    worker (61 s against 67 s): a worker competes with the two compute threads for the same cores."""
    device: str = "cpu"
    """Torch device."""
    seed: int = 42
    """Random seed of the training run."""
    num_pictures: int = 8
    """Validation images drawn with their detections."""
    progress: bool = True
    """Progress bars on a terminal (--no_progress: plain lines only)."""

    def __post_init__(self) -> None:
        _check_positive_ints(self, ("epochs", "lr_drop", "num_train", "num_val"))
        if not _is_int(self.image_size) or self.image_size < 32:
            _fail("image_size", "an int >= 32", self.image_size)
        if not _is_int(self.num_pictures) or self.num_pictures < 0:
            _fail("num_pictures", "an int >= 0", self.num_pictures)


STUDY_DEFAULT_VARIANTS = ("deformable_detr", "single_scale", "detr")


@dataclass(frozen=True)
class StudyConfig:
    """``ddetr study convergence``: which detectors, the synthetic data they all train on, the small model size they
    share, and how long. Saved as OUTPUT_DIR/study.json; a rerun resumes it and must agree with it (the fields in
    ``STUDY_RUN_FIELDS`` and ``epochs``/``variants`` may differ)."""

    output_dir: str = "study_output"
    """The study folder: data/, one training folder per detector, summary.json, summary.md, convergence.png."""
    variants: tuple[str, ...] = STUDY_DEFAULT_VARIANTS
    """Detectors to train (the names of --variant; each with its own recipe: lr, loss, matcher costs)."""
    epochs: int = 12
    """Training epochs of each detector (a rerun with more continues the study)."""
    eval_every: int = 1
    """Evaluate every this many epochs (and after the last)."""
    num_train: int = 1000
    """Synthetic training images."""
    num_val: int = 200
    """Synthetic validation images."""
    image_size: int = 192
    """Side of the synthetic images (each side drawn in [3/4, 1] of it)."""
    max_objects: int = 6
    """At most this many objects per image (1..max_objects, a tenth of the images empty)."""
    small_fraction: float = 0.0
    """Share of the objects drawn at 8 to 24 pixels, COCO-small (visible area under 32x32 pixels) at any image
    size. At 192 pixels two thirds of the others are COCO-small by area already (thin shapes, stars, occlusion)."""
    clutter: int = 2
    """Up to this many unannotated distractor marks per image, in the objects' colours."""
    min_visible: float = 0.5
    """Occlusion: an object is placed only where every earlier one keeps this share of its pixels visible."""
    colour_by_class: bool = True
    """Tie each class to one hue: colour tells an object's class, not whether a mark is an object (the clutter
    marks share the class colours) nor its box. --no_colour_by_class: only the shape tells the class (far slower to
    learn from scratch: AP 0.013 after 5 epochs for Deformable DETR here)."""
    data_seed: int = 0
    """Seed of the synthetic data."""
    backbone: str = "resnet18"
    """The backbone every detector uses, from random weights."""
    hidden_dim: int = 128
    """Transformer width of every detector."""
    nheads: int = 8
    """Attention heads of every detector."""
    enc_layers: int = 2
    """Encoder layers of every detector."""
    dec_layers: int = 3
    """Decoder layers of every detector."""
    dim_feedforward: int = 256
    """Feed-forward width of every detector."""
    num_queries: int = 30
    """Object queries of every detector."""
    batch_size: int = 8
    """Images per step, for every detector."""
    seed: int = 42
    """Random seed of every training run."""
    num_workers: int = 0
    """Data-loading worker processes (0: in the training process, the fastest on 2 cores)."""
    device: str = "cpu"
    """Torch device."""
    estimate_only: bool = False
    """Print the time estimate and stop, without training."""
    progress: bool = True
    """Progress bars on a terminal (--no_progress: plain lines only)."""

    def __post_init__(self) -> None:
        if isinstance(self.variants, str) or not self.variants:
            _fail("variants", "one or more variant names", self.variants)
        unknown = [name for name in self.variants if name not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown variant(s) {', '.join(map(repr, unknown))} in variants; valid variants: "
                              f"{', '.join(VARIANTS)}")
        if len(set(self.variants)) != len(self.variants):
            _fail("variants", "distinct names", self.variants)
        _check_positive_ints(self, ("epochs", "eval_every", "num_train", "num_val", "max_objects", "hidden_dim",
                                    "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries",
                                    "batch_size"))
        if not _is_int(self.image_size) or self.image_size < 32:
            _fail("image_size", "an int >= 32", self.image_size)
        if not _is_number(self.small_fraction) or not 0 <= self.small_fraction <= 1:
            _fail("small_fraction", "a number in [0, 1]", self.small_fraction)
        if not _is_int(self.clutter) or self.clutter < 0:
            _fail("clutter", "an int >= 0", self.clutter)
        if not _is_number(self.min_visible) or not 0 < self.min_visible <= 1:
            _fail("min_visible", "a number in (0, 1]", self.min_visible)
        if not _is_int(self.num_workers) or self.num_workers < 0:
            _fail("num_workers", "an int >= 0", self.num_workers)


# Settings of how a study runs, not of what it measures: a resumed study may change them.
STUDY_RUN_FIELDS = ("output_dir", "num_workers", "device", "estimate_only", "progress")


CONFIG_CLASSES: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}
DATA_SOURCE_FIELDS = ("coco_path", "train_images", "train_json", "val_images", "val_json")

# Fields that the weights depend on: a checkpoint's value of these cannot be overridden.
ARCHITECTURE_FIELDS = ("architecture", "num_classes", "backbone", "num_feature_levels", "enc_layers", "dec_layers",
                       "dim_feedforward", "hidden_dim", "nheads", "num_queries", "dec_n_points", "enc_n_points",
                       "with_box_refine", "two_stage", "dilation")


VARIANTS: dict[str, dict[str, object]] = {
    # configs/r50_deformable_detr.sh
    "deformable_detr": {"architecture": "deformable_detr"},
    # configs/r50_deformable_detr_single_scale.sh
    "single_scale": {"architecture": "deformable_detr", "num_feature_levels": 1},
    # configs/r50_deformable_detr_single_scale_dc5.sh
    "single_scale_dc5": {"architecture": "deformable_detr", "num_feature_levels": 1, "dilation": True},
    # configs/r50_deformable_detr_plus_iterative_bbox_refinement.sh
    "box_refine": {"architecture": "deformable_detr", "with_box_refine": True},
    # configs/r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.sh
    "two_stage": {"architecture": "deformable_detr", "with_box_refine": True, "two_stage": True},
    # facebookresearch/detr main.py defaults (detr_resnet50); DETR's loss: softmax CE 1 / L1 5 / GIoU 2, eos_coef 0.1
    "detr": {"architecture": "detr", "num_feature_levels": 1, "dim_feedforward": 2048, "num_queries": 100,
             "set_cost_class": 1.0, "cls_loss_coef": 1.0},
    # main.py --dilation (detr_resnet50_dc5)
    "detr_dc5": {"architecture": "detr", "num_feature_levels": 1, "dim_feedforward": 2048, "num_queries": 100,
                 "set_cost_class": 1.0, "cls_loss_coef": 1.0, "dilation": True},
}

# The training recipe of a variant where it differs from TrainConfig's defaults (the Deformable DETR recipe):
# facebookresearch/detr main.py (lr 1e-4, lr_backbone 1e-5, weight_decay 1e-4, clip_max_norm 0.1, 300 epochs,
# lr_drop 200); the 500-epoch schedule of the paper's best models drops at 400.
TRAIN_PRESETS: dict[str, dict[str, object]] = {
    "detr": {"lr": 1e-4, "lr_backbone": 1e-5, "weight_decay": 1e-4, "clip_max_norm": 0.1, "epochs": 300,
             "lr_drop": 200},
    "detr_dc5": {"lr": 1e-4, "lr_backbone": 1e-5, "weight_decay": 1e-4, "clip_max_norm": 0.1, "epochs": 300,
                 "lr_drop": 200},
}


def model_config(variant: str, **overrides: object) -> ModelConfig:
    """The preset of ``variant`` with ``overrides`` applied (any field of :class:`ModelConfig`); overrides win."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown model option(s) {unknown}; valid options: {', '.join(sorted(fields))}")
    return ModelConfig(**{**VARIANTS[variant], **overrides})


# ------------------------------------------------------------------------------------------ plain data and docs


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain data (str/int/float/bool/None/list), for checkpoints and JSON."""
    return {name: list(value) if isinstance(value, tuple) else value
            for name, value in ((f.name, getattr(config, f.name)) for f in dataclasses.fields(config))}


def from_dict(cls: type, values: dict[str, Any], source: str = "config") -> Any:
    """The config of class ``cls`` from :func:`to_dict`'s data; fields it lacks (written by an older version) take
    their defaults, fields it does not know (a newer version) are an error naming them."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a dict of {cls.__name__} fields, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown {cls.__name__} field(s) {unknown} (written by a newer version of "
                          "deformable-detr?)")
    hints = field_types(cls)
    converted = {name: tuple(value) if isinstance(value, list) and _is_tuple_type(hints[name]) else value
                 for name, value in values.items()}
    try:
        return cls(**converted)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from error


def _is_tuple_type(annotation: Any) -> bool:
    return any(typing.get_origin(arg) is tuple for arg in (annotation, *typing.get_args(annotation)))


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The evaluated type annotation of each field of a config class."""
    return typing.get_type_hints(cls)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal written under it in this file), on one line."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    docs: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            for field_node, next_node in zip(node.body, node.body[1:]):
                if (isinstance(field_node, ast.AnnAssign) and isinstance(field_node.target, ast.Name)
                        and isinstance(next_node, ast.Expr) and isinstance(next_node.value, ast.Constant)
                        and isinstance(next_node.value.value, str)):
                    docs[field_node.target.id] = " ".join(next_node.value.value.split())
    return docs


# ------------------------------------------------------------------------------------------ the official flags

# Official main.py flags whose setting is fixed here: (the one value supported, why).
OFFICIAL_FIXED_FLAGS: dict[str, tuple[Any, str]] = {
    "position_embedding": ("sine", "the official models use the sine embedding"),
    "dataset_file": ("coco", "give COCO-format data with --coco_path or --train_images/--train_json/..."),
    "masks": (False, "Deformable DETR has no segmentation head"),
    "frozen_weights": (None, "it only serves segmentation training"),
    "coco_panoptic_path": (None, "panoptic segmentation is not supported"),
    "remove_difficult": (False, "it only applies to Pascal VOC, which the official code does not ship either"),
    "lr_backbone_names": (["backbone.0"], "parameter groups are collected from module references"),
    "lr_linear_proj_names": (["reference_points", "sampling_offsets"],
                             "parameter groups are collected from module references"),
}
# Official flags accepted so that the official scripts run, with no effect here: why.
OFFICIAL_IGNORED_FLAGS: dict[str, str] = {
    "mask_loss_coef": "segmentation only",
    "dice_loss_coef": "segmentation only",
    "world_size": "torchrun or SLURM set the number of processes",
}
# Settings the official Namespace (and ours, before checkpoints held configs) carried that are no config field:
# the mode flag and what init_distributed_mode adds.
_NAMESPACE_EXTRAS = ("eval", "distributed", "gpu", "rank", "dist_backend", "handler", "command",
                     "override_resumed_lr_drop")


def check_official_flag(name: str, value: Any) -> None:
    """Raises :class:`ConfigError` when an official flag of :data:`OFFICIAL_FIXED_FLAGS` has another value."""
    supported, reason = OFFICIAL_FIXED_FLAGS[name]
    if value != supported and not (isinstance(supported, list) and list(value or []) == supported):
        raise ConfigError(f"--{name} {value!r} is not supported (only {supported!r}): {reason}")


def settings_from_namespace(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The settings of an official ``main.py`` Namespace (as a dict) per config: {"model": {...}, "train": {...},
    "data": {...}}. Fixed official flags are checked, ignored ones dropped; ``lr_backbone`` 0 also freezes the
    backbone (``train_backbone``), as in the official code."""
    settings: dict[str, dict[str, Any]] = {kind: {} for kind in CONFIG_CLASSES}
    owner = {f.name: kind for kind, cls in CONFIG_CLASSES.items() for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name in OFFICIAL_FIXED_FLAGS:
            check_official_flag(name, value)
        elif name in owner:
            settings[owner[name]][name] = tuple(value) if isinstance(value, list) else value
        elif name not in OFFICIAL_IGNORED_FLAGS and name not in _NAMESPACE_EXTRAS:
            raise ConfigError(f"unknown setting {name!r}")
    if "lr_backbone" in settings["train"]:
        settings["model"]["train_backbone"] = settings["train"]["lr_backbone"] > 0
    return settings


# ------------------------------------------------------------------------------------- settings from a checkpoint


@dataclass(frozen=True)
class RunConfigs:
    """The three configs of a run, as stored in a checkpoint."""

    model: ModelConfig
    train: TrainConfig
    data: DataConfig


def check_architecture(wanted: ModelConfig, stored: ModelConfig, source: str, *,
                       allow_num_classes: bool = False) -> None:
    """Raises :class:`ConfigError` naming both values when ``wanted`` differs from the checkpoint's model
    (``stored``) in a field its weights depend on."""
    if wanted.architecture != stored.architecture:
        names = {"deformable_detr": "Deformable DETR", "detr": "DETR"}
        variants = [name for name, preset in VARIANTS.items()
                    if preset.get("architecture") == stored.architecture]
        raise ConfigError(f"{source}: the checkpoint holds {names[stored.architecture]} weights (architecture "
                          f"{stored.architecture!r}), the model asked for is {names[wanted.architecture]} "
                          f"(architecture {wanted.architecture!r}): use --variant {' or '.join(variants)}, or none")
    clashes = [(name, getattr(wanted, name), getattr(stored, name)) for name in ARCHITECTURE_FIELDS
               if getattr(wanted, name) != getattr(stored, name)
               and not (name == "num_classes" and (allow_num_classes or wanted.num_classes is None))]
    if clashes:
        details = "; ".join(f"{name} {mine!r} here, {theirs!r} in the checkpoint" for name, mine, theirs in clashes)
        hint = (" (another number of classes: fine-tune with --finetune CHECKPOINT --drop_class_heads)"
                if any(name == "num_classes" for name, _, _ in clashes) else "")
        raise ConfigError(f"{source}: the model asked for does not fit the checkpoint's weights: {details}; drop "
                          f"those settings to use the checkpoint's{hint}")


def merge_model(stored: ModelConfig, explicit: dict[str, Any], source: str, *,
                allow_num_classes: bool = False) -> ModelConfig:
    """The checkpoint's model with the settings given explicitly; an architecture setting that contradicts the
    checkpoint is an error naming both values."""
    wanted = dataclasses.replace(stored, **explicit)
    check_architecture(wanted, stored, source, allow_num_classes=allow_num_classes)
    return wanted


def merge_data(stored: DataConfig, explicit: dict[str, Any]) -> DataConfig:
    """The checkpoint's data settings with those given explicitly; data given explicitly (a COCO folder or
    COCO-format files) replaces the stored data source as a whole."""
    if any(name in explicit for name in DATA_SOURCE_FIELDS):
        stored = dataclasses.replace(stored, **{name: None for name in DATA_SOURCE_FIELDS})
    return dataclasses.replace(stored, **explicit)
